"""LoHa and LoKr (peft's ``LoHaConfig`` / ``LoKrConfig``) in LyCORIS's kohya key layout, both ways.

Written by hand: peft saves LoHa/LoKr only in its own adapter layout, and diffusers has no LyCORIS writer. The
module names are the kohya ones (:func:`lora_scripts.export.kohya.kohya_module_name`); per module, as
``lycoris/modules/loha.py`` and ``lokr.py`` store them (and ComfyUI's ``comfy/weight_adapter`` and A1111's
``extensions-builtin/Lora`` read them):

- LoHa: ``.hada_w1_a`` ``(out, r)``, ``.hada_w1_b`` ``(r, in)``, ``.hada_w2_a``, ``.hada_w2_b``, ``.alpha``;
  ``dW = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r``. peft's tensors have the same shapes and meaning (3x3 convs as
  ``(r, in * k * k)``: no Tucker ``hada_t1/t2``, which peft calls ``use_effective_conv2d``).
- LoKr: ``.lokr_w1`` or ``.lokr_w1_a``/``.lokr_w1_b``, ``.lokr_w2`` or ``.lokr_w2_a``/``.lokr_w2_b``, ``.alpha``;
  ``dW = kron(w1, w2) * scale``. LyCORIS takes the rank from ``w1_a``/``w2_a`` and uses scale 1 when neither factor
  is low-rank, whatever ``alpha`` says; peft always scales by ``alpha / r``. So a LoKr file carries peft's scale
  folded into ``lokr_w1`` (``lokr_w1_a``) and ``alpha`` = the rank LyCORIS infers: every reader then applies
  exactly the trained update.

``ss_network_module`` is ``lycoris.kohya`` and ``ss_network_args`` holds ``{"algo": "loha" | "lokr", ...}``, as
LyCORIS's own trainer records them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError

LOHA_KINDS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR_KINDS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
TUCKER_KINDS = ("hada_t1", "hada_t2", "lokr_t2")
KINDS = LOHA_KINDS + LOKR_KINDS
ALGOS = {"loha": LOHA_KINDS, "lokr": LOKR_KINDS}
_SHOW = 3


def split_lycoris_key(key: str) -> tuple[str, str] | None:
    """``<module>.hada_w1_a`` -> (``<module>``, ``hada_w1_a``); None for keys of other kinds."""
    module, _, kind = key.rpartition(".")
    return (module, kind) if kind in KINDS + TUCKER_KINDS else None


def algo_of(kinds: set[str] | list[str]) -> str | None:
    """``loha``, ``lokr`` or None, from the tensor kinds of a module or file."""
    kinds = set(kinds)
    if kinds & set(LOHA_KINDS):
        return "loha"
    if kinds & set(LOKR_KINDS):
        return "lokr"
    return None


def lokr_rank(tensors: Mapping[str, torch.Tensor]) -> int | None:
    """The rank LyCORIS infers for a LoKr module (``w1_a``'s, else ``w2_a``'s columns); None: no low-rank factor
    (full matrices, scale 1)."""
    for kind in ("lokr_w1_a", "lokr_w2_a"):
        if kind in tensors:
            return int(tensors[kind].shape[1])
    return None


def lycoris_scale(tensors: Mapping[str, torch.Tensor], alpha: float | None) -> float:
    """The factor LyCORIS applies to one module's product: ``alpha / rank`` (LoHa; LoKr with a low-rank factor);
    1 for LoKr without one. ``alpha`` None: alpha = rank."""
    if "hada_w1_b" in tensors:
        rank = int(tensors["hada_w1_b"].shape[0])
    else:
        rank = lokr_rank(tensors)
        if rank is None:
            return 1.0
    return (alpha if alpha is not None else rank) / rank


def lycoris_state_dict(parts: Mapping[str, Mapping[str, torch.Tensor]], scales: Mapping[str, Mapping[str, float]],
                       *, family: str, unet_config: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """LyCORIS-layout tensors from peft LoHa/LoKr state dicts.

    ``parts`` maps ``unet`` / ``text_encoder`` / ``text_encoder_2`` to ``get_peft_model_state_dict(module)``;
    ``scales`` maps the same parts to ``{peft module name: (alpha, rank)}`` of the trained adapter (peft's
    ``layer.alpha`` / ``layer.r``), from :func:`adapter_scales`. LoHa modules keep their alpha; LoKr modules get
    the scale folded in (module docstring).
    """
    from .kohya import kohya_module_name

    out: dict[str, torch.Tensor] = {}
    for part, state in parts.items():
        modules: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in state.items():
            split = split_lycoris_key(key)
            if split is None or split[1] in TUCKER_KINDS:
                raise ValueError(f"{key}: not a plain LoHa/LoKr tensor (Tucker factors are not exported)")
            modules.setdefault(split[0], {})[split[1]] = tensor.detach().to("cpu", torch.float32).contiguous()
        for module, tensors in modules.items():
            name = kohya_module_name(part, module, family=family, unet_config=unet_config)
            alpha, rank = scales[part][module]
            if algo_of(list(tensors)) == "lokr":
                first = "lokr_w1" if "lokr_w1" in tensors else "lokr_w1_a"
                tensors = {**tensors, first: tensors[first] * (alpha / rank)}
                alpha = float(lokr_rank(tensors) or 1)
            for kind, tensor in tensors.items():
                out[f"{name}.{kind}"] = tensor
            out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


def adapter_scales(modules: Mapping[str, torch.nn.Module], adapter: str = "default") -> dict[str, dict[str, tuple]]:
    """part -> peft module name -> (alpha, rank) of every LoHa/LoKr layer in ``modules``."""
    from peft.tuners.lycoris_utils import LycorisLayer

    out: dict[str, dict[str, tuple]] = {}
    for part, root in modules.items():
        out[part] = {name: (float(layer.alpha[adapter]), int(layer.r[adapter])) for name, layer in root.named_modules()
                     if isinstance(layer, LycorisLayer) and adapter in layer.r}
    return out


def lycoris_network_args(algo: str, *, conv_rank: int | None = None, conv_alpha: float | None = None,
                         factor: int = -1, decompose_both: bool = False) -> dict[str, str]:
    """``ss_network_args`` as LyCORIS's kohya network records them (string values)."""
    args = {"algo": algo}
    if conv_rank is not None:
        args["conv_dim"] = str(conv_rank)
        args["conv_alpha"] = str(conv_alpha if conv_alpha is not None else conv_rank)
    if algo == "lokr":
        args["factor"] = str(factor)
        args["decompose_both"] = str(decompose_both)
    return args


# ---------------------------------------------------------------------------------------------------------------
# Reading a LyCORIS file into a run's peft LoHa/LoKr adapter (network_weights)


def load_lycoris_weights(path: Path, tensors: Mapping[str, torch.Tensor], modules: Mapping[str, torch.nn.Module],
                         *, family: str, adapter: str = "default") -> dict[str, dict[str, torch.Tensor]]:
    """The LyCORIS-layout ``tensors`` (read from ``path``) as peft state dicts for ``modules``' LoHa/LoKr adapters,
    each module's update kept (the file's LyCORIS scale over the run's peft scale folded into ``w1``). The run's
    algorithm, modules, ranks and factor shapes must match the file: else a one-line ConfigError saying what to set."""
    from peft.utils import get_peft_model_state_dict

    from .kohya import kohya_module_name

    unet = modules.get("unet")
    unet_config = unet.config if unet is not None else None
    expected: dict[str, tuple[str, str, str]] = {}  # kohya name -> (part, peft module, peft key prefix)
    shapes: dict[str, torch.Size] = {}
    run_algo = None
    scales = adapter_scales(modules, adapter)
    for part, root in modules.items():
        for key, tensor in get_peft_model_state_dict(root, adapter_name=adapter).items():
            module, kind = split_lycoris_key(key) or (key, "")
            run_algo = run_algo or algo_of([kind])
            names = {kohya_module_name(part, module, family=family, unet_config=unet_config)}
            if part != "unet":  # with or without text_model_ (sd-scripts and LyCORIS write both)
                names |= {n.replace("_text_model_", "_", 1) for n in names}
            for name in names:
                expected[name] = (part, module, key[: -len(kind)])
            shapes[key] = tensor.shape
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    for key, tensor in tensors.items():
        name, _, kind = key.partition(".")
        if kind == "alpha":
            alphas[name] = float(tensor.item())
        elif kind in KINDS:
            by_module.setdefault(name, {})[kind] = tensor.float()
        else:
            raise ConfigError(f"network_weights: '{path}' holds '{key}', which this run's {run_algo} adapter cannot "
                              "take (Tucker factors, DoRA and other LyCORIS types do not continue here)")
    file_algo = algo_of({k for t in by_module.values() for k in t})
    if file_algo != run_algo:
        raise ConfigError(f"network_weights: '{path}' is a {file_algo or 'plain LoRA'} file but this run trains "
                          f"{run_algo}; set network_type: {file_algo or 'lora'}")
    extra = sorted(set(by_module) - set(expected))
    if extra:
        raise ConfigError(f"network_weights: '{path}' has weights for {len(extra)} modules this run does not train "
                          f"(e.g. {', '.join(extra[:_SHOW])}); match target_modules, conv_rank and train_text_encoder "
                          "to the file")
    seen = {expected[name][:2] for name in by_module}
    missing = [f"{part}.{module}" for part, names in scales.items() for module in names if (part, module) not in seen]
    if missing:
        raise ConfigError(f"network_weights: this run trains {len(missing)} modules that '{path}' has no weights for "
                          f"(e.g. {', '.join(missing[:_SHOW])}); match target_modules, conv_rank and "
                          "train_text_encoder to the file")
    out: dict[str, dict[str, torch.Tensor]] = {part: {} for part in modules}
    for name, found in by_module.items():
        part, module, prefix = expected[name]
        alpha, rank = scales[part][module]
        ratio = lycoris_scale(found, alphas.get(name)) / (alpha / rank)
        wanted = {k.removeprefix(prefix) for k in shapes if k.startswith(prefix) and split_lycoris_key(k)}
        if set(found) != wanted:
            raise ConfigError(f"network_weights: '{path}' {name} holds {', '.join(sorted(found))} but this run's "
                              f"adapter has {', '.join(sorted(wanted))}; match lora_rank, lokr_factor and "
                              "lokr_decompose_both to the file")
        first = "hada_w1_a" if file_algo == "loha" else ("lokr_w1" if "lokr_w1" in found else "lokr_w1_a")
        for kind, tensor in found.items():
            if tuple(tensor.shape) != tuple(shapes[prefix + kind]):
                raise ConfigError(f"network_weights: '{path}' {name}.{kind} has shape {tuple(tensor.shape)}, this run "
                                  f"needs {tuple(shapes[prefix + kind])}; set lora_rank (and lokr_factor) as the "
                                  "file was trained")
            out[part][prefix + kind] = (tensor * ratio if kind == first else tensor).contiguous()
    return out

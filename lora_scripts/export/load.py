"""``network_weights``: start a run from an existing LoRA in kohya, diffusers or PEFT format.

The file is read into peft state dicts for the run's own adapter-carrying modules, so the names are exact: kohya names
are matched against the names this run's modules would be written under (both the diffusers-path and the LDM-path
spelling of every UNet module, with or without ``text_model_`` for text encoders) instead of guessed back from
underscores, which is where diffusers' kohya converter has to guess. Diffusers-format names are converted with
diffusers' own ``convert_unet_state_dict_to_peft`` / ``convert_state_dict_to_peft``.

Each module's LoRA effect ``scale * B @ A`` is kept: when the file's scale (its ``alpha / rank``; rsLoRA
``alpha / sqrt(rank)`` for PEFT files that say so) differs from the run's (peft's ``scaling`` of that module),
``lora_B`` is rescaled. The rank cannot change; a different rank, a module in the file that the run does not train,
or one the run trains that the file lacks, is a ConfigError that says what to set.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from .kohya import FAMILIES, PART_PREFIXES, kohya_module_name, split_peft_key

PARTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
_KOHYA_KINDS = ("lora_down.weight", "lora_up.weight", "alpha", "dora_scale")
_SHOW = 3  # how many module names an error lists


@dataclass
class _Target:
    """One module of the run that carries the adapter, and the peft keys it expects."""

    layer: Any
    adapter: str
    keys: dict[str, str]  # kind ("lora_down.weight", "lora_up.weight", "dora_scale") -> peft key
    shapes: dict[str, torch.Size]


@dataclass
class _Found:
    """One module's LoRA as read from the file."""

    name: str  # as the file spells it, for messages
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None
    alpha: float | None = None  # the file's alpha (None: alpha = rank)
    rslora: bool = False
    kohya: bool = False  # DoRA magnitude as kohya's dora_scale (out, 1[, 1, 1]) rather than peft's shape

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        alpha = self.alpha if self.alpha is not None else float(self.rank)
        return alpha / math.sqrt(self.rank) if self.rslora else alpha / self.rank


def load_network_weights(
    path: str | Path,
    modules: Mapping[str, torch.nn.Module],
    *,
    family: str,
    adapter_name: str = "default",
    tensors: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """Read the LoRA at ``path`` as peft state dicts for ``modules``, ready for
    ``peft.set_peft_model_state_dict(modules[part], result[part], adapter_name=...)``.

    ``modules`` maps ``"unet"``, ``"text_encoder"``, ``"text_encoder_2"`` (those the run trains) to the modules that
    already carry the run's adapter (``unet.add_adapter(make_unet_lora_config(cfg, ...))``): their adapter decides the
    expected modules, ranks, scales and DoRA. ``family`` is ``sd1``, ``sd2`` or ``sdxl``. ``path`` is a kohya
    ``.safetensors`` file (SD1 diffusers-path or SDXL LDM-path UNet names, ``lora_te_``/``lora_te1_``/``lora_te2_``),
    a diffusers LoRA (``pytorch_lora_weights.safetensors`` from ``save_lora_weights``, or its folder), or a PEFT adapter
    folder (``adapter_model.safetensors`` + ``adapter_config.json``; or ``unet/``, ``text_encoder/``,
    ``text_encoder_2/`` subfolders of those). ``tensors``: diffusers-named tensors already converted from another
    layout by a pipeline's ``lora_state_dict`` (``path`` is then only named in messages). Raises
    :class:`ConfigError` with one line for anything that does not fit.
    """
    path = Path(path).expanduser()
    targets = {part: _run_targets(module, adapter_name) for part, module in modules.items()}
    unet = modules.get("unet")
    unet_config = unet.config if unet is not None else None
    if tensors is not None:
        found = _read_diffusers(path, tensors, {}, targets)
    else:
        found = _read(path, targets, family, unet_config)
    return _to_peft(path, found, targets)


def apply_network_weights(
    path: str | Path,
    modules: Mapping[str, torch.nn.Module],
    *,
    family: str,
    adapter_name: str = "default",
    tensors: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """:func:`load_network_weights` and set the result into ``modules``' adapters (peft's
    ``set_peft_model_state_dict``), checking that every tensor landed."""
    from peft import set_peft_model_state_dict

    if _is_lycoris_run(modules, adapter_name):  # LoHa / LoKr: LyCORIS-layout files only
        from .lycoris import load_lycoris_weights

        path = Path(path).expanduser()
        if not path.is_file():
            raise ConfigError(f"network_weights: '{path}' is not a file; a LoHa/LoKr run continues from a LyCORIS "
                              ".safetensors file")
        states = load_lycoris_weights(path, _read_tensors(path)[0], modules, family=family, adapter=adapter_name)
    else:
        states = load_network_weights(path, modules, family=family, adapter_name=adapter_name, tensors=tensors)
    for part, state in states.items():
        result = set_peft_model_state_dict(modules[part], state, adapter_name=adapter_name)
        unexpected = getattr(result, "unexpected_keys", None) or []
        if unexpected:
            raise RuntimeError(f"{part}: peft did not take {len(unexpected)} tensors, e.g. {unexpected[:_SHOW]}")


def _is_lycoris_run(modules: Mapping[str, torch.nn.Module], adapter_name: str) -> bool:
    configs = [getattr(m, "peft_config", {}).get(adapter_name) for m in modules.values()]
    return any(c is not None and str(getattr(c, "peft_type", "")).endswith(("LOHA", "LOKR")) for c in configs)


# ---------------------------------------------------------------------------------------------------------------
# What the run expects


def _run_targets(module: torch.nn.Module, adapter_name: str) -> dict[str, _Target]:
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(module, adapter_name=adapter_name)
    targets: dict[str, _Target] = {}
    for key, tensor in state.items():
        name, kind = split_peft_key(key)
        if name not in targets:
            targets[name] = _Target(layer=module.get_submodule(name), adapter=adapter_name, keys={}, shapes={})
        targets[name].keys[kind] = key
        targets[name].shapes[kind] = tensor.shape
    if not targets:
        raise ValueError(f"{type(module).__name__} carries no adapter named {adapter_name!r}; add it first")
    return targets


# ---------------------------------------------------------------------------------------------------------------
# Reading the three formats


def _read(path: Path, targets: Mapping[str, Mapping[str, _Target]], family: str,
          unet_config: Any) -> dict[str, dict[str, _Found]]:
    """part -> peft module name -> what the file holds; module names the run does not have go under part ``?``."""
    if not path.exists():
        raise ConfigError(f"network_weights: '{path}' not found; point it at a LoRA .safetensors file or adapter folder")
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            return _read_peft_folder(path, targets, None)
        subfolders = [p for p in PARTS if (path / p / "adapter_config.json").is_file()]
        if subfolders:
            found: dict[str, dict[str, _Found]] = {}
            for part in subfolders:
                for key, value in _read_peft_folder(path / part, targets, part).items():
                    found.setdefault(key, {}).update(value)
            return found
        if (path / "pytorch_lora_weights.safetensors").is_file():
            path = path / "pytorch_lora_weights.safetensors"
        else:
            raise ConfigError(f"network_weights: folder '{path}' holds no adapter_config.json (PEFT) and no "
                              "pytorch_lora_weights.safetensors (diffusers); point it at the LoRA file or adapter folder")
    tensors, metadata = _read_tensors(path)
    keys = list(tensors)
    if keys and all(k.startswith(_KOHYA_PREFIXES) for k in keys):
        return _read_kohya(path, tensors, targets, family, unet_config)
    if keys and all(k.split(".", 1)[0] in PARTS for k in keys):
        return _read_diffusers(path, tensors, metadata, targets)
    first = keys[0] if keys else "(no tensors)"
    raise ConfigError(f"network_weights: '{path}' is not a LoRA in kohya (lora_unet_*, lora_te*_*), diffusers "
                      f"(unet.*, text_encoder.*) or PEFT format (first key: {first}); export it in one of those")


def read_lora_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor and the metadata of a LoRA file (``.safetensors`` or a weights-only torch file)."""
    return _read_tensors(Path(path))


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as handle:
                return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError("not a flat dict of tensors")
        return state, {}
    except Exception as exc:  # safetensors and torch raise many types for a damaged or foreign file
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise ConfigError(f"network_weights: cannot read '{path}' ({reason}); is it a complete LoRA "
                          ".safetensors file?") from None


def _read_kohya(path: Path, tensors: Mapping[str, torch.Tensor], targets: Mapping[str, Mapping[str, _Target]],
                family: str, unet_config: Any) -> dict[str, dict[str, _Found]]:
    if family not in FAMILIES:
        raise ConfigError(f"network_weights: '{path}' is a kohya-format LoRA for a UNet model; a {family} LoRA "
                          "continues from its own exports")
    names = {k.split(".", 1)[0] for k in tensors}
    sdxl_file = any(n.startswith(("lora_te1_", "lora_te2_")) for n in names)
    sd_file = any(n.startswith("lora_te_") for n in names)
    if sdxl_file and family != "sdxl":
        raise ConfigError(f"network_weights: '{path}' is an SDXL LoRA (lora_te1_/lora_te2_ keys) but base_model is "
                          f"{family}; use an SDXL base_model or a LoRA made for {family}")
    if sd_file and family == "sdxl":
        raise ConfigError(f"network_weights: '{path}' is an SD 1.x/2.x LoRA (lora_te_ keys) but base_model is SDXL; "
                          "use a LoRA made for SDXL")
    lookup = _kohya_lookup(targets, family, unet_config)
    found: dict[str, dict[str, _Found]] = {}
    for key, tensor in tensors.items():
        name, _, kind = key.partition(".")
        if kind not in _KOHYA_KINDS:
            hint = {"hada_": "set network_type: loha", "lokr_": "set network_type: lokr"}
            fix = next((v for k, v in hint.items() if kind.startswith(k)), "other LyCORIS types cannot continue here")
            raise ConfigError(f"network_weights: '{path}' holds '{key}', which is not plain LoRA/LoCon/DoRA; {fix}")
        part, module = lookup.get(name, ("?", name))
        entry = found.setdefault(part, {}).setdefault(module, _Found(name=name, kohya=True))
        if kind == "lora_down.weight":
            entry.down = tensor
        elif kind == "lora_up.weight":
            entry.up = tensor
        elif kind == "dora_scale":
            entry.magnitude = tensor
        else:
            entry.alpha = float(tensor.item())
    return found


def kohya_spellings(part: str, path: str, family: str, unet_config: Any, prefix: str | None = None) -> list[str]:
    """Every kohya name the module at ``path`` of ``part`` may carry in a file, ours (sd-scripts') first: for the
    UNet also the diffusers-path and the LDM-path names (A1111 and ComfyUI accept both for SD1 too), for a text
    encoder also the path without ``text_model.``."""
    from ..models.ldm import unet_module_to_ldm

    first = kohya_module_name(part, path, family=family, unet_config=unet_config)
    prefix = prefix or "_".join(first.split("_", 2)[:2])
    spellings = [first]
    if part == "unet":
        spellings.append(f"{prefix}_{path.replace('.', '_')}")
        try:
            spellings.append(f"{prefix}_{unet_module_to_ldm(path, unet_config).replace('.', '_')}")
        except ValueError:
            pass
    else:
        spellings.append(f"{prefix}_{path.removeprefix('text_model.').replace('.', '_')}")
    return spellings


def _kohya_lookup(targets: Mapping[str, Mapping[str, _Target]], family: str,
                  unet_config: Any) -> dict[str, tuple[str, str]]:
    """Every kohya spelling of every module the run trains -> (part, peft module name)."""
    lookup: dict[str, tuple[str, str]] = {}
    for part, modules in targets.items():
        if part not in PART_PREFIXES[family]:
            raise ValueError(f"a {family} model has no part {part!r}")
        for name in modules:
            path = name.removeprefix("base_model.model.")
            for spelling in kohya_spellings(part, path, family, unet_config, PART_PREFIXES[family][part]):
                lookup[spelling] = (part, name)
    return lookup


def _read_diffusers(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                    targets: Mapping[str, Mapping[str, _Target]]) -> dict[str, dict[str, _Found]]:
    """``unet.<module>.lora.down.weight`` / ``.lora_A.weight`` (+ ``lora_adapter_metadata``) via diffusers' converters."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    adapter_meta: dict[str, Any] = {}
    if metadata.get("lora_adapter_metadata"):
        try:
            adapter_meta = json.loads(metadata["lora_adapter_metadata"])
        except json.JSONDecodeError:
            adapter_meta = {}
    found: dict[str, dict[str, _Found]] = {}
    for part in PARTS:
        state = {k[len(part) + 1:]: v for k, v in tensors.items() if k.startswith(part + ".")}
        if not state:
            continue
        alphas = {k.removesuffix(".alpha"): float(v.item()) for k, v in state.items() if k.endswith(".alpha")}
        state = {k: v for k, v in state.items() if not k.endswith(".alpha")}
        if part in ("unet", "transformer"):
            state = convert_unet_state_dict_to_peft(state)
        else:
            state = convert_state_dict_to_peft(convert_state_dict_to_diffusers(state))
        config = {k[len(part) + 1:]: v for k, v in adapter_meta.items() if k.startswith(part + ".")}
        found.update(_group_peft(state, targets, part, config, alphas, path))
    return found


def _read_peft_folder(folder: Path, targets: Mapping[str, Mapping[str, _Target]],
                      part: str | None) -> dict[str, dict[str, _Found]]:
    """A PEFT adapter folder: ``adapter_config.json`` + ``adapter_model.safetensors`` (or ``.bin``)."""
    try:
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"network_weights: cannot read '{folder / 'adapter_config.json'}' ({exc}); "
                          "is the adapter folder complete?") from None
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        weights = folder / "adapter_model.bin"
    if not weights.is_file():
        raise ConfigError(f"network_weights: '{folder}' has adapter_config.json but no adapter_model.safetensors")
    if config.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"network_weights: '{folder}' is a {config.get('peft_type')} adapter; only LoRA (and "
                          "DoRA) adapters can continue here")
    tensors, _ = _read_tensors(weights)
    state = {k.removeprefix("base_model.model."): v for k, v in tensors.items()}
    if part is None:  # one adapter: it belongs to the part whose modules it names most
        names = {_module_of(k) for k in state}
        part = max(targets, key=lambda p: len({_norm_te(n, p, targets) for n in names} & set(targets[p])),
                   default="unet")
    return _group_peft(state, targets, part, config, {}, folder)


def _module_of(key: str) -> str:
    try:
        return split_peft_key(key)[0]
    except ValueError:
        return key


def _norm_te(name: str, part: str, targets: Mapping[str, Mapping[str, _Target]]) -> str:
    """A text-encoder module name with or without ``text_model.``, whichever the run's module uses."""
    if part in ("unet", "transformer") or part not in targets or name in targets[part]:
        return name
    other = name.removeprefix("text_model.") if name.startswith("text_model.") else f"text_model.{name}"
    return other if other in targets[part] else name


def _group_peft(state: Mapping[str, torch.Tensor], targets: Mapping[str, Mapping[str, _Target]], part: str,
                config: Mapping[str, Any], alphas: Mapping[str, float], source: Path) -> dict[str, dict[str, _Found]]:
    """peft-named tensors of one part -> _Found per module, with the file's alpha from ``config`` (r, lora_alpha,
    alpha_pattern, use_rslora) or per-module ``alphas``; neither: alpha = rank (diffusers' convention)."""
    from peft.utils.other import get_pattern_key

    found: dict[str, dict[str, _Found]] = {}
    alpha_pattern = dict(config.get("alpha_pattern") or {})
    for key, tensor in state.items():
        try:
            name, kind = split_peft_key(key)
        except ValueError:
            raise ConfigError(f"network_weights: '{source}' holds '{key}', which is not a LoRA tensor (lora_A, "
                              "lora_B, lora_magnitude_vector)") from None
        module = _norm_te(name, part, targets)
        in_run = part in targets and module in targets[part]
        entry = found.setdefault(part if in_run else "?", {}).setdefault(module, _Found(name=f"{part}.{name}"))
        if kind == "lora_down.weight":
            entry.down = tensor
        elif kind == "lora_up.weight":
            entry.up = tensor
        else:
            entry.magnitude = tensor
        if name in alphas:
            entry.alpha = alphas[name]
        elif "lora_alpha" in config:
            pattern = get_pattern_key(list(alpha_pattern), name)
            entry.alpha = float(alpha_pattern.get(pattern, config["lora_alpha"]))
            entry.rslora = bool(config.get("use_rslora", False))
    return found


# ---------------------------------------------------------------------------------------------------------------
# Checks and conversion to the run's adapter


def _to_peft(path: Path, found: Mapping[str, Mapping[str, _Found]],
             targets: Mapping[str, Mapping[str, _Target]]) -> dict[str, dict[str, torch.Tensor]]:
    extra = [entry.name for part, entries in found.items() for module, entry in entries.items()
             if part not in targets or module not in targets[part]]
    if extra:
        hint = _target_hint(extra)
        raise ConfigError(f"network_weights: '{path}' has LoRA weights for {len(extra)} modules this run does not "
                          f"train (e.g. {', '.join(sorted(extra)[:_SHOW])}); match target_modules, conv_rank and the "
                          f"text-encoder training to the file{hint}")
    missing = [f"{part}.{module}" for part, modules in targets.items() for module in modules
               if module not in found.get(part, {})]
    if missing:
        raise ConfigError(f"network_weights: this run trains {len(missing)} modules that '{path}' has no weights for "
                          f"(e.g. {', '.join(missing[:_SHOW])}); match target_modules, conv_rank and the "
                          "text-encoder training to the file")
    out: dict[str, dict[str, torch.Tensor]] = {}
    for part, modules in targets.items():
        state: dict[str, torch.Tensor] = {}
        for module, target in modules.items():
            entry = found[part][module]
            state.update(_module_state(path, part, module, entry, target))
        out[part] = state
    return out


# Module-name endings (kohya spelling, then peft spelling) -> what to set so a run trains them. sd-scripts trains
# every Linear/1x1 conv of the UNet's transformer blocks, and with conv_dim also the ResNet blocks' time_emb_proj and
# conv_shortcut at network_dim; its text-encoder LoRA covers attention and MLP.
_TARGET_HINTS = [
    (("_proj_in", ".proj_in"), "proj_in"), (("_proj_out", ".proj_out"), "proj_out"),
    (("_ff_net_0_proj", ".ff.net.0.proj"), "ff.net.0.proj"), (("_ff_net_2", ".ff.net.2"), "ff.net.2"),
    (("_time_emb_proj", "_emb_layers_1", ".time_emb_proj"), "time_emb_proj"),
    (("_conv_shortcut", "_skip_connection", ".conv_shortcut"), "conv_shortcut"),
    (("_to_q", ".to_q"), "to_q"), (("_to_k", ".to_k"), "to_k"), (("_to_v", ".to_v"), "to_v"),
    (("_to_out_0", ".to_out.0"), "to_out.0"),
    (("_conv1", "_conv2", "_in_layers_2", "_out_layers_3", "_op", "_downsamplers_0_conv", "_upsamplers_0_conv",
      "_2_conv", "_1_conv", ".conv1", ".conv2", ".conv"), "conv_rank"),
    (("_q_proj", "_k_proj", "_v_proj", "_out_proj", "_fc1", "_fc2", ".q_proj", ".k_proj", ".v_proj", ".out_proj",
      ".fc1", ".fc2"), "text encoder"),
]


def _target_hint(names: list[str]) -> str:
    wanted = []
    for endings, what in _TARGET_HINTS:
        if what not in wanted and any(name.endswith(endings) for name in names):
            wanted.append(what)
    targets = [w for w in wanted if w not in ("conv_rank", "text encoder")]
    parts = [f"target_modules needs {', '.join(targets)}"] if targets else []
    parts += [f"the file has {w} modules" for w in wanted if w in ("conv_rank", "text encoder")]
    return f" ({'; '.join(parts)})" if parts else ""


def _module_state(path: Path, part: str, module: str, entry: _Found, target: _Target) -> dict[str, torch.Tensor]:
    if entry.down is None or entry.up is None:
        raise ConfigError(f"network_weights: '{path}' has an incomplete LoRA for {entry.name} (lora_down and lora_up "
                          "are both needed); re-export the file")
    layer, adapter, keys = target.layer, target.adapter, target.keys
    run_rank = int(layer.r[adapter])
    if entry.rank != run_rank:
        conv = entry.down.dim() == 4 and tuple(entry.down.shape[2:]) != (1, 1)
        key = "conv_rank" if conv else "lora_rank"
        raise ConfigError(f"network_weights: '{path}' has rank {entry.rank} but this run uses {key} {run_rank} "
                          f"(module {entry.name}); set {key}: {entry.rank}")
    down, up = entry.down.float(), entry.up.float()
    for kind, tensor in (("lora_down.weight", down), ("lora_up.weight", up)):
        if tuple(tensor.shape) != tuple(target.shapes[kind]):
            raise ConfigError(f"network_weights: '{path}' {entry.name}.{kind} has shape {tuple(tensor.shape)}, this "
                              f"run's {part} needs {tuple(target.shapes[kind])}; the LoRA was made for another base model")
    run_dora = "dora_scale" in keys
    if (entry.magnitude is not None) != run_dora:
        fix = "set use_dora: true" if entry.magnitude is not None else "set use_dora: false (the file is plain LoRA)"
        raise ConfigError(f"network_weights: '{path}' {'is' if entry.magnitude is not None else 'is not'} a DoRA "
                          f"LoRA but this run {'is not' if entry.magnitude is not None else 'is'}; {fix}")
    run_scale = float(layer.scaling[adapter])
    state = {keys["lora_down.weight"]: down.contiguous(),
             keys["lora_up.weight"]: (up * (entry.scale / run_scale)).contiguous()}
    if run_dora:
        magnitude = entry.magnitude.float()
        shape = target.shapes["dora_scale"]
        out_channels = math.prod(shape)
        on_output_axis = magnitude.shape[0] == out_channels if entry.kohya else True
        if magnitude.numel() != out_channels or not on_output_axis:
            raise ConfigError(f"network_weights: '{path}' {entry.name}.dora_scale has shape "
                              f"{tuple(magnitude.shape)}: DoRA on the input axis cannot continue as peft DoRA (output "
                              "axis); re-export it with the magnitude per output channel")
        state[keys["dora_scale"]] = magnitude.reshape(shape).contiguous()
    return state

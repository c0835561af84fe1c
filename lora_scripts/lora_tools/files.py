"""Any LoRA file we write or read, as one in-memory form, and back out in the kohya, diffusers or PEFT layout.

The in-memory form is the kohya / LyCORIS one (module names ``lora_unet_…``, ``lora_te_…``, ``lora_te1_…``,
``lora_te2_…``; per module its tensors by kohya kind and its ``alpha``): that layout holds every variant we train
(LoRA, LoCon, DoRA's ``dora_scale``, LoHa's ``hada_*``, LoKr's ``lokr_*``) with per-module ranks and alphas.
Diffusers and PEFT files are renamed into it; going back out, the dotted module paths come from the family's module
names (:mod:`.names`), never guessed from underscores. Written by hand: diffusers and peft convert kohya files on
load but write none, and neither reads a PEFT folder as a whole pipeline's LoRA.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..export.lycoris import KINDS as LYCORIS_KINDS, TUCKER_KINDS, algo_of, lycoris_scale

KOHYA_KINDS = ("lora_down.weight", "lora_up.weight", "dora_scale")
PART_PREFIXES = {"lora_unet": "unet", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2",
                 "lora_te": "text_encoder"}
DIFFUSERS_PARTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
_PEFT_KINDS = {".lora_A.weight": "lora_down.weight", ".lora_B.weight": "lora_up.weight",
               ".lora.down.weight": "lora_down.weight", ".lora.up.weight": "lora_up.weight",
               ".lora_magnitude_vector": "dora_scale", ".lora_magnitude_vector.weight": "dora_scale",
               ".lora.magnitude_vector": "dora_scale", ".lora_linear_layer.down.weight": "lora_down.weight",
               ".lora_linear_layer.up.weight": "lora_up.weight"}


@dataclass
class Module:
    """One adapted module: its kohya name, tensors by kohya kind and alpha (None: alpha = rank)."""

    name: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    alpha: float | None = None

    @property
    def algo(self) -> str:
        return algo_of(list(self.tensors)) or "lora"

    @property
    def part(self) -> str:
        """``unet`` (the denoiser, also a transformer's), ``te``, ``te1`` or ``te2``."""
        prefix = self.name.split("_", 2)[1]
        return "unet" if prefix == "unet" else prefix

    @property
    def rank(self) -> int:
        if self.algo == "lora":
            return int(self.tensors["lora_down.weight"].shape[0])
        if self.algo == "loha":
            return int(self.tensors["hada_w1_b"].shape[0])
        from ..export.lycoris import lokr_rank

        return lokr_rank(self.tensors) or 0

    @property
    def scale(self) -> float:
        """The factor applied to the module's product (classic ``alpha / rank``; LyCORIS's rule for LoHa/LoKr)."""
        if self.algo != "lora":
            return lycoris_scale(self.tensors, self.alpha)
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    @property
    def is_conv(self) -> bool:
        down = self.tensors.get("lora_down.weight")
        return down is not None and down.dim() == 4 and tuple(down.shape[2:]) != (1, 1)


@dataclass
class LoraFile:
    """A LoRA as read: ``format`` is ``kohya``, ``lycoris``, ``diffusers`` or ``peft``."""

    path: Path
    format: str
    modules: dict[str, Module]
    metadata: dict[str, str]
    family: str  # sd1, sd2, sdxl, or a transformer family's name; "" when the file does not tell

    def algos(self) -> Counter:
        return Counter(m.algo for m in self.modules.values())

    def has_dora(self) -> bool:
        return any("dora_scale" in m.tensors for m in self.modules.values())


def read_lora(path: str | Path, what: str = "FILE") -> LoraFile:
    """Read a kohya / LyCORIS / diffusers ``.safetensors`` LoRA or a PEFT adapter folder (or a folder of ``unet/``,
    ``text_encoder/`` … adapters, or one holding ``pytorch_lora_weights.safetensors``). Anything else is a
    one-line :class:`ConfigError` naming ``what`` (the argument) and the file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"{what}: '{path}' not found; give a LoRA .safetensors file or a PEFT adapter folder")
    if path.is_dir():
        if (path / "pytorch_lora_weights.safetensors").is_file():
            return read_lora(path / "pytorch_lora_weights.safetensors", what)
        folders = [(None, path)] if (path / "adapter_config.json").is_file() else [
            (part, path / part) for part in DIFFUSERS_PARTS if (path / part / "adapter_config.json").is_file()]
        if not folders:
            raise ConfigError(f"{what}: folder '{path}' holds no adapter_config.json (PEFT) and no "
                              "pytorch_lora_weights.safetensors (diffusers); give the LoRA file or adapter folder")
        tensors: dict[str, torch.Tensor] = {}
        configs: dict[str, Any] = {}
        for part, folder in folders:
            state, config = _read_peft_folder(folder, what)
            part = part or _guess_part(state)
            tensors.update({f"{part}.{k}": v for k, v in state.items()})
            configs.update({f"{part}.{k}": v for k, v in config.items()})
        return _from_diffusers(path, "peft", tensors, {"lora_adapter_metadata": json.dumps(configs)}, what)
    tensors, metadata = _read_safetensors(path, what)
    if not tensors:
        raise ConfigError(f"{what}: '{path}' holds no tensors; it is not a LoRA")
    keys = list(tensors)
    if all(k.startswith("lora_") for k in keys):
        return _from_kohya(path, tensors, metadata, what)
    if all(k.split(".", 1)[0] in DIFFUSERS_PARTS for k in keys):
        return _from_diffusers(path, "diffusers", tensors, metadata, what)
    raise ConfigError(f"{what}: '{path}' is not a LoRA in kohya/LyCORIS (lora_unet_*, lora_te*_*), diffusers "
                      f"(unet.*, text_encoder.*, transformer.*) or PEFT layout (first key: {keys[0]}); is it a model "
                      "checkpoint?")


def _read_safetensors(path: Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    if path.suffix != ".safetensors":
        raise ConfigError(f"{what}: '{path}' is not a .safetensors file; LoRA tools read safetensors LoRAs and PEFT "
                          "adapter folders")
    try:
        with safe_open(str(path), "pt") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})
    except Exception as exc:  # safetensors raises several types for a damaged or foreign file
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise ConfigError(f"{what}: cannot read '{path}' ({reason}); is it a complete .safetensors file?") from None


def _read_peft_folder(folder: Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{what}: cannot read '{folder / 'adapter_config.json'}' ({exc})") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"{what}: '{folder}' is a {config.get('peft_type')} adapter; the LoRA tools read LoRA "
                          "(and DoRA) PEFT adapters")
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise ConfigError(f"{what}: '{folder}' has adapter_config.json but no adapter_model.safetensors")
    tensors, _ = _read_safetensors(weights, what)
    return {k.removeprefix("base_model.model."): v for k, v in tensors.items()}, config


def _guess_part(state: Mapping[str, torch.Tensor]) -> str:
    text = sum(1 for k in state if ".self_attn." in k or k.startswith(("text_model.", "encoder.layers.")))
    return "text_encoder" if text > len(state) / 2 else "unet"


def _from_kohya(path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str], what: str) -> LoraFile:
    modules: dict[str, Module] = {}
    for key, tensor in tensors.items():
        name, _, kind = key.partition(".")
        module = modules.setdefault(name, Module(name))
        if kind == "alpha":
            module.alpha = float(tensor.float().item())
        elif kind in KOHYA_KINDS or kind in LYCORIS_KINDS:
            module.tensors[kind] = tensor.float()
        elif kind in TUCKER_KINDS:
            raise ConfigError(f"{what}: '{path}' holds Tucker factors ({key}), which the LoRA tools do not handle")
        else:
            raise ConfigError(f"{what}: '{path}' holds '{key}', which is not a LoRA, LoHa or LoKr tensor")
    for module in modules.values():
        _check_module(path, module, what)
    lycoris = metadata.get("ss_network_module", "").startswith("lycoris") or any(
        m.algo != "lora" for m in modules.values())
    return LoraFile(path, "lycoris" if lycoris else "kohya", modules, metadata, _family(metadata, modules))


def _check_module(path: Path, module: Module, what: str) -> None:
    kinds = set(module.tensors)
    complete = ({"lora_down.weight", "lora_up.weight"} <= kinds if module.algo == "lora" else
                set(("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")) <= kinds if module.algo == "loha" else
                bool(kinds & {"lokr_w1", "lokr_w1_a"}) and bool(kinds & {"lokr_w2", "lokr_w2_a"}))
    if not complete:
        raise ConfigError(f"{what}: '{path}' has an incomplete {module.algo} module {module.name} (only "
                          f"{', '.join(sorted(kinds)) or 'alpha'}); re-export the file")


def _from_diffusers(path: Path, fmt: str, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str],
                    what: str) -> LoraFile:
    from peft.utils.other import get_pattern_key

    try:
        adapter_meta = json.loads(metadata.get("lora_adapter_metadata") or "{}")
    except ValueError:
        adapter_meta = {}
    family = _family(metadata, {})
    sdxl = family == "sdxl" or any(k.startswith("text_encoder_2.") for k in tensors)
    prefixes = {"unet": "lora_unet", "transformer": "lora_unet", "text_encoder": "lora_te1" if sdxl else "lora_te",
                "text_encoder_2": "lora_te2", "text_encoder_3": "lora_te3"}
    modules: dict[str, Module] = {}
    paths: dict[str, tuple[str, str]] = {}
    for key, tensor in tensors.items():
        part, _, rest = key.partition(".")
        if rest.endswith(".alpha"):
            module_path, kind = rest[: -len(".alpha")], "alpha"
        else:
            suffix = next((s for s in _PEFT_KINDS if rest.endswith(s)), None)
            if suffix is None:
                raise ConfigError(f"{what}: '{path}' holds '{key}', which is not a LoRA tensor (lora_A/lora_B, "
                                  "lora.down/lora.up, lora_magnitude_vector)")
            module_path, kind = rest[: -len(suffix)], _PEFT_KINDS[suffix]
        name = _kohya_name(part, module_path, "sdxl" if sdxl else family or "sd1") or \
            f"{prefixes[part]}_{module_path.replace('.', '_')}"
        module = modules.setdefault(name, Module(name))
        paths[name] = (part, module_path)
        if kind == "alpha":
            module.alpha = float(tensor.item())
        else:
            module.tensors[kind] = tensor.float()
    for name, module in modules.items():
        _check_module(path, module, what)
        part, module_path = paths[name]
        config = {k[len(part) + 1:]: v for k, v in adapter_meta.items() if k.startswith(part + ".")}
        if module.alpha is None and "lora_alpha" in config:
            pattern = get_pattern_key(list(config.get("alpha_pattern") or {}), module_path)
            alpha = float((config.get("alpha_pattern") or {}).get(pattern, config["lora_alpha"]))
            module.alpha = alpha * math.sqrt(module.rank) if config.get("use_rslora") else alpha
        if "dora_scale" in module.tensors:  # peft's magnitude (out,) / (1, out, 1, 1) -> kohya's (out, 1[, 1, 1])
            magnitude = module.tensors["dora_scale"]
            dims = module.tensors["lora_down.weight"].dim()
            module.tensors["dora_scale"] = magnitude.reshape(-1, *([1] * (dims - 1)))
    return LoraFile(path, fmt, modules, metadata, family or ("sdxl" if sdxl else _family({}, modules)))


def _kohya_name(part: str, module_path: str, family: str) -> str | None:
    """sd-scripts' name of a diffusers module path (SDXL UNets by the shipped SDXL config's LDM blocks); None for
    the transformer families, whose kohya names are written by their own export."""
    from ..export.kohya import FAMILIES, kohya_module_name

    if family not in FAMILIES or part not in ("unet", "text_encoder", "text_encoder_2"):
        return None
    config = None
    if family == "sdxl" and part == "unet":
        config = json.loads((Path(__file__).resolve().parents[1] / "models" / "configs" / "sdxl" / "unet" /
                             "config.json").read_text(encoding="utf-8"))
    try:
        return kohya_module_name(part, module_path, family=family, unet_config=config)
    except ValueError:
        return None


def _family(metadata: Mapping[str, str], modules: Mapping[str, Module]) -> str:
    """The model family a LoRA is for: our own metadata, kohya's ``ss_base_model_version``, modelspec, or the
    module names and cross-attention width."""
    if metadata.get("lora_scripts_model_family"):
        return metadata["lora_scripts_model_family"]
    version = metadata.get("ss_base_model_version", "")
    for prefix, family in (("sdxl", "sdxl"), ("sd_v2", "sd2"), ("sd_v1", "sd1"), ("flux", "flux"), ("sd3", "sd3")):
        if version.startswith(prefix):
            return family
    arch = metadata.get("modelspec.architecture", "")
    for word, family in (("xl", "sdxl"), ("v2", "sd2"), ("v1", "sd1"), ("flux", "flux"), ("v3", "sd3")):
        if word in arch:
            return family
    names = list(modules)
    if any(n.startswith(("lora_te1_", "lora_te2_")) for n in names):
        return "sdxl"
    if any(n.startswith("lora_unet_double_blocks_") for n in names):
        return "flux"
    for name, module in modules.items():
        if name.endswith("attn2_to_k") and "lora_down.weight" in module.tensors:
            width = module.tensors["lora_down.weight"].shape[1]
            return {2048: "sdxl", 1024: "sd2"}.get(int(width), "sd1")
    return "sd1" if names and all(n.startswith(("lora_unet_", "lora_te_")) for n in names) else ""


# ---------------------------------------------------------------------------------------------------------------
# Writing


def kohya_tensors(modules: Mapping[str, Module]) -> dict[str, torch.Tensor]:
    """The kohya / LyCORIS tensors of ``modules`` (float32, contiguous), each with its alpha (rank when unset)."""
    out: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        for kind, tensor in module.tensors.items():
            out[f"{name}.{kind}"] = tensor.detach().to(torch.float32).contiguous()
        alpha = module.alpha if module.alpha is not None else float(module.rank)
        out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


def write_kohya(path: Path, modules: Mapping[str, Module], metadata: Mapping[str, str]) -> Path:
    """Write ``modules`` as a kohya (LyCORIS for LoHa/LoKr) file, atomically, with ``sshs_model_hash``."""
    from ..export.kohya import write_kohya_lora

    if not modules:
        raise ConfigError(f"--output: nothing to write to '{path}' (no modules left)")
    return write_kohya_lora(Path(path), kohya_tensors(modules), dict(metadata))


def peft_parts(lora: LoraFile, names: Mapping[str, tuple[str, str]], what: str = "convert"
               ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict[str, Any]]]:
    """peft state dicts (``<path>.lora_A.weight`` …) and LoraConfig fields per diffusers part, from the kohya-named
    ``lora`` and ``names`` (kohya name -> (part, module path), :func:`.names.module_names`)."""
    states: dict[str, dict[str, torch.Tensor]] = {}
    modules_of: dict[str, dict[str, Module]] = {}
    for name, module in lora.modules.items():
        if module.algo != "lora":
            raise ConfigError(f"{what}: '{lora.path}' is {module.algo}; diffusers and PEFT LoRA layouts hold LoRA "
                              "and DoRA only (keep the LyCORIS file for ComfyUI, A1111 and LyCORIS)")
        if name not in names:
            raise ConfigError(f"{what}: '{lora.path}' module {name} is not a module of a {lora.family or 'SD 1.x'} "
                              "model; pass --base with the model the LoRA was trained on")
        part, module_path = names[name]
        modules_of.setdefault(part, {})[module_path] = module
        state = states.setdefault(part, {})
        state[f"{module_path}.lora_A.weight"] = module.tensors["lora_down.weight"].contiguous()
        state[f"{module_path}.lora_B.weight"] = module.tensors["lora_up.weight"].contiguous()
        if "dora_scale" in module.tensors:
            magnitude = module.tensors["dora_scale"].reshape(-1)
            if module.tensors["lora_down.weight"].dim() == 4:
                magnitude = magnitude.reshape(1, -1, 1, 1)
            state[f"{module_path}.lora_magnitude_vector"] = magnitude.contiguous()
    configs = {part: _lora_config_fields(mods) for part, mods in modules_of.items()}
    return states, configs


def _lora_config_fields(modules: Mapping[str, Module]) -> dict[str, Any]:
    """r / lora_alpha as the most common pair, rank_pattern / alpha_pattern (full module paths) for the rest."""
    pairs = Counter((m.rank, m.alpha if m.alpha is not None else float(m.rank)) for m in modules.values())
    (rank, alpha), _ = pairs.most_common(1)[0]
    fields: dict[str, Any] = {"r": rank, "lora_alpha": alpha, "target_modules": sorted(modules),
                              "use_dora": any("dora_scale" in m.tensors for m in modules.values())}
    ranks = {p: m.rank for p, m in modules.items() if m.rank != rank}
    alphas = {p: (m.alpha if m.alpha is not None else float(m.rank)) for p, m in modules.items()
              if (m.alpha if m.alpha is not None else float(m.rank)) != alpha}
    if ranks:
        fields["rank_pattern"] = ranks
    if alphas:
        fields["alpha_pattern"] = alphas
    return fields

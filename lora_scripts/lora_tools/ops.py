"""``lora-scripts lora convert | resize | merge A B | extract``: each reads LoRAs with :func:`.files.read_lora` and
writes a kohya / LyCORIS file (convert: also diffusers and PEFT), with the source's metadata and a record of what
was done (``lora_scripts_tool``)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from .files import LoraFile, Module, kohya_tensors, peft_parts, read_lora, write_kohya
from .lowrank import Cut, conv_shape, cut, module_delta

Progress = Callable[[Any], Any]  # wraps an iterable in a progress bar (tqdm), or returns it as is


def _plain(items: Any, **_: Any) -> Any:
    return items


def _metadata(source: LoraFile, tool: dict[str, Any], *, plain_lora: bool = False) -> dict[str, str]:
    """The source's metadata (its hash and diffusers' adapter config dropped), the family, and ``tool``. With
    ``plain_lora`` (the output holds LoRA modules only) a LyCORIS source's network module and args are dropped."""
    meta = {k: v for k, v in source.metadata.items() if k not in ("sshs_model_hash", "lora_adapter_metadata")}
    meta.setdefault("ss_network_module", "networks.lora")
    if plain_lora and meta["ss_network_module"].startswith("lycoris"):
        meta["ss_network_module"] = "networks.lora"
        meta.pop("ss_network_args", None)
    if source.family:
        meta.setdefault("lora_scripts_model_family", source.family)
    meta["lora_scripts_tool"] = json.dumps(tool)
    return meta


# ---------------------------------------------------------------------------------------------------------------
# convert


def convert(path: Path, to: str, output: Path, base: Path | None = None) -> list[Path]:
    """Write the LoRA at ``path`` in the ``to`` layout: ``kohya`` (a ``.safetensors`` file; LoHa/LoKr stay in
    LyCORIS's layout), ``diffusers`` (a folder with ``pytorch_lora_weights.safetensors``, as the pipeline's
    ``save_lora_weights`` writes it) or ``peft`` (a folder of ``unet/``, ``text_encoder/`` … adapter folders)."""
    from .names import module_names

    lora = read_lora(path)
    tool = {"tool": "convert", "from": lora.format, "to": to, "source": Path(path).name}
    if to == "kohya":
        _need_suffix(output, ".safetensors")
        return [write_kohya(output, lora.modules, _metadata(lora, tool))]
    states, configs = peft_parts(lora, module_names(lora.family, base), what="convert")
    if to == "diffusers":
        import diffusers
        from diffusers.utils import convert_state_dict_to_diffusers

        pipeline = "StableDiffusionXLPipeline" if lora.family == "sdxl" else "StableDiffusionPipeline"
        layers: dict[str, Any] = {}
        for part, state in states.items():
            layers[f"{part}_lora_layers"] = convert_state_dict_to_diffusers(state)
            layers[f"{part}_lora_adapter_metadata"] = configs[part]
        output.mkdir(parents=True, exist_ok=True)
        getattr(diffusers, pipeline).save_lora_weights(str(output), **layers)
        return [output / "pytorch_lora_weights.safetensors"]
    from peft import LoraConfig
    from safetensors.torch import save_file

    written = []
    for part, state in states.items():
        folder = output / part
        folder.mkdir(parents=True, exist_ok=True)
        LoraConfig(**configs[part]).save_pretrained(str(folder))
        save_file({f"base_model.model.{k}": v for k, v in state.items()}, str(folder / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        written.append(folder)
    return written


def _need_suffix(output: Path, suffix: str) -> None:
    if output.suffix != suffix:
        raise ConfigError(f"--output: '{output}' should end in {suffix} (a kohya LoRA is one safetensors file)")


# ---------------------------------------------------------------------------------------------------------------
# resize


def resize(path: Path, output: Path, rank: int | None, dynamic: tuple[str, float] | None,
           progress: Progress = _plain) -> tuple[list[tuple[str, int, int, Cut]], Path]:
    """Cut every LoRA module of ``path`` to ``rank`` (or the dynamic rule) by SVD of its update; returns (name,
    old rank, new rank, cut) per module and the written file. A module whose rank is already at or below the target
    is re-factored exactly (error 0 up to float rounding)."""
    _need_suffix(output, ".safetensors")
    lora = read_lora(path)
    others = sorted({m.algo for m in lora.modules.values()} - {"lora"})
    if others:
        raise ConfigError(f"resize: '{path}' holds {', '.join(others)} modules; resize works on LoRA factors "
                          "(extract turns any update into a LoRA)")
    report, modules = [], {}
    for name, module in progress(sorted(lora.modules.items()), desc="resize", unit="module"):
        result = cut(name, module_delta(module), rank, dynamic, conv_shape(module), module.tensors.get("dora_scale"))
        report.append((name, module.rank, result.rank, result))
        modules[name] = result.module
    ranks = [r for _, _, r, _ in report]
    meta = _metadata(lora, {"tool": "resize", "rank": rank, "dynamic": dynamic, "source": Path(path).name,
                            "max_error": max(c.error for *_, c in report)}, plain_lora=True)
    meta["ss_network_dim"] = str(max(ranks))
    meta["ss_network_alpha"] = str(max(ranks))
    return report, write_kohya(output, modules, meta)


# ---------------------------------------------------------------------------------------------------------------
# merge LoRA + LoRA


def merge_loras(paths: Sequence[Path], ratios: Sequence[float], output: Path, rank: int | None,
                progress: Progress = _plain) -> tuple[dict[str, Cut] | None, Path]:
    """``sum(ratio_i * LoRA_i)``: without ``rank``, exactly, by concatenating the factors (each module's rank is
    the sum of the ranks that adapt it); with ``rank``, each module's summed update cut by SVD (returned per
    module, with its error). DoRA cannot be summed (its magnitude is not additive)."""
    _need_suffix(output, ".safetensors")
    loras = [read_lora(p, "FILE") for p in paths]
    families = {lora.family for lora in loras if lora.family}
    if len(families) > 1:
        raise ConfigError(f"merge: the files are for different model families ({', '.join(sorted(families))}); "
                          "merge LoRAs of one family")
    for lora in loras:
        if lora.has_dora():
            raise ConfigError(f"merge: '{lora.path}' is a DoRA LoRA; DoRA magnitudes do not add up, merge it into a "
                              "base model instead (--into)")
    names = sorted({name for lora in loras for name in lora.modules})
    modules: dict[str, Module] = {}
    cuts: dict[str, Cut] = {}
    for name in progress(names, desc="merge", unit="module"):
        present = [(lora.modules[name], ratio) for lora, ratio in zip(loras, ratios) if name in lora.modules]
        if rank is None and all(m.algo == "lora" for m, _ in present):
            modules[name] = _concat(name, present)
            continue
        if rank is None:
            raise ConfigError(f"merge: {name} is LoHa/LoKr in one of the files; their factors do not concatenate, "
                              "pass --rank R to merge by SVD")
        delta = sum(ratio * module_delta(m) for m, ratio in present)
        kernel = next((conv_shape(m) for m, _ in present if conv_shape(m)), None)
        cuts[name] = cut(name, delta, rank, None, kernel)
        modules[name] = cuts[name].module
    tool = {"tool": "merge", "sources": [Path(p).name for p in paths], "ratios": list(ratios), "rank": rank}
    meta = _metadata(loras[0], tool, plain_lora=True)
    ranks = [m.rank for m in modules.values()]
    meta["ss_network_dim"], meta["ss_network_alpha"] = str(max(ranks)), str(max(ranks))
    return (cuts or None), write_kohya(output, modules, meta)


def _concat(name: str, present: list[tuple[Module, float]]) -> Module:
    """``[up_1 * s_1 * ratio_1, up_2 * …] @ [down_1; down_2; …]`` with alpha = total rank (scale 1)."""
    downs = [m.tensors["lora_down.weight"] for m, _ in present]
    ups = [m.tensors["lora_up.weight"] * (m.scale * ratio) for m, ratio in present]
    if len({d.shape[1:] for d in downs}) > 1:
        raise ConfigError(f"merge: {name} has different shapes in the files ({', '.join(str(tuple(d.shape)) for d in downs)}); "
                          "the LoRAs are for different models")
    down, up = torch.cat(downs, 0), torch.cat(ups, 1)
    return Module(name, {"lora_down.weight": down, "lora_up.weight": up}, float(down.shape[0]))


# ---------------------------------------------------------------------------------------------------------------
# extract


def extract(base: Path, tuned: Path, output: Path, rank: int, conv_rank: int | None = None,
            min_diff: float = 1e-6, text_encoder: bool = True,
            progress: Progress = _plain) -> tuple[dict[str, Cut], Path]:
    """A LoRA of ``tuned - base`` (two checkpoints of one SD 1.x/2.x/SDXL model: diffusers folders or single files):
    every Linear and 1x1 conv of the UNet (and with ``text_encoder`` the CLIP encoders) whose weights differ by more
    than ``min_diff``, cut to ``rank`` by SVD; 3x3 convs too, to ``conv_rank``, when given (LoCon)."""
    from ..export.kohya import base_model_version, kohya_metadata
    from .checkpoint import load_model_parts
    from .names import kohya_name

    _need_suffix(output, ".safetensors")
    base_parts, family = load_model_parts(base, "--base")
    tuned_parts, tuned_family = load_model_parts(tuned, "--tuned")
    if family != tuned_family:
        raise ConfigError(f"extract: --base is {family} but --tuned is {tuned_family}; give two checkpoints of one model")
    unet_config = base_parts["unet"].config
    cuts: dict[str, Cut] = {}
    jobs = []
    for part, module in base_parts.items():
        if part != "unet" and not text_encoder:
            continue
        tuned_modules = dict(tuned_parts[part].named_modules())
        for path, layer in module.named_modules():
            if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            other = tuned_modules.get(path)
            if other is None or other.weight.shape != layer.weight.shape:
                raise ConfigError(f"extract: --tuned has no module {part}.{path} of shape {tuple(layer.weight.shape)}; "
                                  "give two checkpoints of one model")
            kernel = tuple(layer.weight.shape[2:]) if layer.weight.dim() == 4 else ()
            is_conv = kernel not in ((), (1, 1))
            if is_conv and conv_rank is None:
                continue
            jobs.append((part, path, layer, other, kernel if is_conv else None, conv_rank if is_conv else rank))
    for part, path, layer, other, kernel, module_rank in progress(jobs, desc="extract", unit="module"):
        delta = (other.weight.detach().double() - layer.weight.detach().double())
        if float(delta.abs().max()) <= min_diff:
            continue
        name = kohya_name(part, path, family, unet_config)
        result = cut(name, delta.reshape(delta.shape[0], -1), module_rank, None, kernel)
        if result.module.tensors["lora_down.weight"].dim() == 2 and layer.weight.dim() == 4:  # 1x1 conv
            result.module.tensors["lora_down.weight"] = result.module.tensors["lora_down.weight"][..., None, None]
            result.module.tensors["lora_up.weight"] = result.module.tensors["lora_up.weight"][..., None, None]
        cuts[name] = result
    if not cuts:
        raise ConfigError(f"extract: --tuned '{tuned}' does not differ from --base '{base}' (beyond {min_diff}); "
                          "nothing to extract")
    import time

    meta = kohya_metadata(network_dim=rank, network_alpha=rank, base_model_version=base_model_version(family),
                          base_model=str(base), output_name=output.stem, training_started_at=time.time(),
                          training_finished_at=time.time(), steps=0, epoch=0, num_train_images=0,
                          network_args={"conv_dim": str(conv_rank), "conv_alpha": str(conv_rank)} if conv_rank else None,
                          extra={"lora_scripts_model_family": family, "lora_scripts_tool": json.dumps(
                              {"tool": "extract", "base": Path(base).name, "tuned": Path(tuned).name, "rank": rank,
                               "conv_rank": conv_rank, "max_error": max(c.error for c in cuts.values())})})
    return cuts, write_kohya(output, {n: c.module for n, c in cuts.items()}, meta)


__all__ = ["convert", "extract", "kohya_tensors", "merge_loras", "resize"]

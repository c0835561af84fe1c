"""``lora-scripts lora inspect FILE``: what a LoRA file holds and who can load it."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from .files import LoraFile, read_lora

PART_NAMES = {"unet": "unet/transformer", "te": "te", "te1": "te1", "te2": "te2", "te3": "te3"}
_SHOWN_META = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_base_model_version",
               "ss_sd_model_name", "ss_output_name", "ss_steps", "ss_epoch", "ss_num_train_images", "ss_resolution",
               "ss_learning_rate", "ss_mixed_precision", "modelspec.architecture", "modelspec.title",
               "modelspec.date", "sshs_model_hash")


def consumers(lora: LoraFile) -> dict[str, str]:
    """Consumer -> how it takes this file (``exact``, ``loads, different result``, ``no``, ``after convert``)."""
    algos = set(lora.algos())
    unet_family = lora.family in ("sd1", "sd2", "sdxl", "")
    if lora.format == "peft":
        return {"peft / lora-scripts network_weights": "exact", "diffusers, A1111, ComfyUI": "after `lora convert`"}
    if lora.format == "diffusers":
        return {"diffusers load_lora_weights": "exact (DoRA too)" if lora.has_dora() else "exact",
                "A1111, ComfyUI, sd-scripts": "after `lora convert --to kohya`"}
    if algos & {"loha", "lokr"}:
        return {"LyCORIS": "exact", "ComfyUI": "exact", "A1111": "exact",
                "sd-scripts networks.lora": "no (LyCORIS types)",
                "diffusers load_lora_weights": "no (its SD loaders take LoRA only)"}
    if lora.has_dora():
        return {"LyCORIS": "exact", "ComfyUI": "loads, different result (norm of the base weight, not the merged one)",
                "A1111": "loads, different result (norm over the input axis)",
                "sd-scripts": "loads, different result (ignores dora_scale)",
                "diffusers load_lora_weights": "plain LoRA part only (drops dora_scale)"}
    if not unet_family:
        return {"ComfyUI": "exact", "diffusers load_lora_weights": "exact (the family pipeline's loader)"}
    return {"A1111": "exact", "ComfyUI": "exact", "sd-scripts": "exact", "LyCORIS": "exact",
            "diffusers load_lora_weights": "exact"}


def inspect_report(path: Path) -> dict[str, Any]:
    """Everything ``inspect`` prints, as JSON-able data."""
    lora = read_lora(path)
    modules = list(lora.modules.values())
    by_part = Counter(PART_NAMES.get(m.part, m.part) for m in modules)
    ranks = Counter(m.rank for m in modules)
    alphas = [m.alpha if m.alpha is not None else float(m.rank) for m in modules]
    scales = [m.scale for m in modules]
    meta = lora.metadata
    provenance: dict[str, Any] = {k: v for k, v in meta.items() if k.startswith("lora_scripts_")}
    if "lora_scripts_config" in provenance:
        try:
            config = json.loads(provenance["lora_scripts_config"])
            provenance["lora_scripts_config"] = {k: config.get(k) for k in (
                "base_model", "lora_rank", "lora_alpha", "network_type", "use_dora", "use_rslora", "conv_rank",
                "train_text_encoder", "learning_rate", "max_train_steps", "seed") if k in config}
        except ValueError:
            pass
    return {
        "file": str(lora.path),
        "format": lora.format,
        "family": lora.family or "unknown",
        "algorithms": dict(lora.algos()),
        "dora": lora.has_dora(),
        "modules": len(modules),
        "trained_parts": dict(by_part),
        "conv_modules": sum(1 for m in modules if m.is_conv),
        "rank": {"min": min(ranks), "max": max(ranks), "counts": {str(k): v for k, v in sorted(ranks.items())}},
        "alpha": {"min": min(alphas), "max": max(alphas)},
        "scale": {"min": min(scales), "max": max(scales)},
        "metadata": {k: meta[k] for k in _SHOWN_META if k in meta},
        "provenance": provenance,
        "consumers": consumers(lora),
    }


def render(report: dict[str, Any]) -> str:
    """The report as the lines ``inspect`` prints."""
    rank, alpha, scale = report["rank"], report["alpha"], report["scale"]
    algos = ", ".join(f"{k} x{v}" for k, v in report["algorithms"].items())
    lines = [
        f"file:       {report['file']}",
        f"format:     {report['format']}",
        f"family:     {report['family']}",
        f"network:    {algos}{' (DoRA)' if report['dora'] else ''}; {report['modules']} modules "
        f"({', '.join(f'{k} {v}' for k, v in report['trained_parts'].items())})"
        + (f", {report['conv_modules']} conv" if report["conv_modules"] else ""),
        f"rank:       {rank['min']}" + (f"..{rank['max']} ({', '.join(f'{k}: {v}' for k, v in rank['counts'].items())})"
                                       if rank["min"] != rank["max"] else ""),
        f"alpha:      {alpha['min']:g}" + (f"..{alpha['max']:g}" if alpha["min"] != alpha["max"] else "")
        + f"  (scale {scale['min']:.4g}" + (f"..{scale['max']:.4g}" if scale["min"] != scale["max"] else "") + ")",
    ]
    if report["metadata"]:
        lines.append("metadata:")
        lines += [f"  {k}: {_short(v)}" for k, v in report["metadata"].items()]
    if report["provenance"]:
        lines.append("provenance:")
        lines += [f"  {k}: {_short(v)}" for k, v in report["provenance"].items()]
    lines.append("consumers:")
    lines += [f"  {k}: {v}" for k, v in report["consumers"].items()]
    return "\n".join(lines)


def _short(value: Any, width: int = 100) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= width else text[: width - 3] + "..."

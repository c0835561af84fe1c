"""The GPU acceptance command: every GPU code path once, real-sized shapes, one table, under 8 minutes.

    python benchmarks/gpu_check.py              # on one CUDA GPU; writes the GPU tables in docs/BENCHMARKS.md
    python benchmarks/gpu_check.py --dry-run    # on CPU: tiny shapes, 2 steps per case, the same code path

Cases: image LoRA on SD1.5- and SDXL-shaped random-weight models at 512 / 1024 px in fp16 (grad scaler) and bf16; text
LoRA on a ~1.1B LLaMA-shaped (TinyLlama) model in bf16, QLoRA nf4, 8-bit AdamW, packing (SDPA); a FLUX-shaped model
(FLUX.1-dev widths, fewer blocks), also with its base (transformer and T5) stored as int8, fp8 and nf4
(``base_quantization``). For each: steps/s, images or tokens per second, whether the loss is finite and falls (mean of
the last third of the steps below the first third) on the demo concept (``in zkq style`` / pirate answers),
``torch.cuda.max_memory_allocated`` against ``estimate_memory`` (``lora-scripts estimate``). Every case is trained by
the project's own ``train()`` from a config, as a user's run is; random weights are built directly on the GPU and
saved in half precision so nothing is downloaded. Block swap is not built.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a fresh clone after `make install`, or not

from benchmarks.speed_common import machine_info, write_section  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "lora_scripts" / "models" / "configs"
BUDGET_S = 7.5 * 60  # the whole command, cases after it are reported as not run
NOT_BUILT = ("FLUX block swap",)


@dataclass
class Case:
    """One row of the table: a config built over a model folder that ``build`` writes."""

    name: str
    kind: str  # "image" or "text"
    build: str  # which model builder (see ``MODEL_BUILDERS``)
    overrides: dict[str, Any] = field(default_factory=dict)
    cuda_only: str | None = None  # why the dry run can only validate the config
    steps: int = 12


def cases(dry: bool) -> list[Case]:
    """The acceptance cases; in a dry run the same cases at 32 px / 64 tokens (fp16 needs CUDA: run at fp32)."""
    image = 32 if dry else 512
    xl = 32 if dry else 1024
    half = "no" if dry else "fp16"
    bf16 = "no" if dry else "bf16"
    steps = 2 if dry else 12
    seq = 64 if dry else 512
    return [
        Case("SD1.5 512 px fp16 + grad scaler", "image", "sd15", dict(resolution=image, batch_size=4,
             mixed_precision=half), steps=steps),
        Case("SD1.5 512 px bf16", "image", "sd15", dict(resolution=image, batch_size=4, mixed_precision=bf16),
             steps=steps),
        Case("SDXL 1024 px fp16 + grad scaler", "image", "sdxl", dict(resolution=xl, batch_size=2,
             mixed_precision=half, gradient_checkpointing=True), steps=steps),
        Case("SDXL 1024 px bf16", "image", "sdxl", dict(resolution=xl, batch_size=2, mixed_precision=bf16,
             gradient_checkpointing=True), steps=steps),
        Case("FLUX-shaped 1024 px bf16", "image", "flux", dict(resolution=xl, batch_size=1, mixed_precision=bf16,
             gradient_checkpointing=True, text_max_length=16 if dry else 128), steps=steps),
        *[Case(f"FLUX {kind} base weights", "image", "flux", dict(
            resolution=xl, batch_size=1, mixed_precision=bf16, gradient_checkpointing=True,
            text_max_length=16 if dry else 128, base_quantization=kind),
            cuda_only="bitsandbytes 4-bit needs CUDA" if kind == "nf4" else None, steps=steps)
          for kind in ("int8", "fp8", "nf4")],
        Case("LLaMA 1.1B bf16", "text", "llama", dict(mixed_precision=bf16, batch_size=8, max_seq_length=seq),
             steps=steps),
        Case("LLaMA 1.1B QLoRA nf4", "text", "llama", dict(mixed_precision=bf16, batch_size=8, max_seq_length=seq,
             quantization="4bit"), cuda_only="bitsandbytes 4-bit needs CUDA", steps=steps),
        Case("LLaMA 1.1B 8-bit AdamW", "text", "llama", dict(mixed_precision=bf16, batch_size=8, max_seq_length=seq,
             optimizer="adamw8bit"), cuda_only="bitsandbytes 8-bit AdamW needs CUDA", steps=steps),
        Case("LLaMA 1.1B packing (SDPA)", "text", "llama", dict(mixed_precision=bf16, batch_size=4,
             max_seq_length=seq * 4, packing=True), steps=steps),
    ]


# --- models --------------------------------------------------------------------------------------------------------
def _save_random(module_cls: Any, config: dict[str, Any], folder: Path, device: str, dtype: Any) -> None:
    """A random-weight module from ``config``, initialised on ``device`` (seconds on a GPU, minutes for SDXL on a
    CPU) and saved in ``dtype`` (half the disk and load time of fp32)."""
    import torch

    with torch.device(device):
        module = module_cls.from_config(config) if hasattr(module_cls, "from_config") else module_cls(config)
    module.to(dtype).save_pretrained(folder)
    del module
    if device == "cuda":
        torch.cuda.empty_cache()


def _clip_tokenizer(folder: Path, config_folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(CONFIGS / "clip_bpe" / name, folder / name)
    shutil.copy(config_folder / "tokenizer_config.json", folder / "tokenizer_config.json")


def build_unet_model(family: str, folder: Path, device: str, dtype: Any) -> Path:
    """SD1.5 / SDXL: every component from the shipped real configs, random weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    src = CONFIGS / ("sd15" if family == "sd15" else "sdxl")
    shutil.copytree(src, folder, dirs_exist_ok=True)
    _save_random(UNet2DConditionModel, UNet2DConditionModel.load_config(src / "unet"), folder / "unet", device, dtype)
    _save_random(AutoencoderKL, AutoencoderKL.load_config(src / "vae"), folder / "vae", device, dtype)
    _save_random(CLIPTextModel, CLIPTextConfig.from_pretrained(src / "text_encoder"), folder / "text_encoder",
                 device, dtype)
    _clip_tokenizer(folder / "tokenizer", src / "tokenizer")
    if family == "sdxl":
        _save_random(CLIPTextModelWithProjection, CLIPTextConfig.from_pretrained(src / "text_encoder_2"),
                     folder / "text_encoder_2", device, dtype)
        _clip_tokenizer(folder / "tokenizer_2", src / "tokenizer_2")
    return folder


def build_flux_model(folder: Path, device: str, dtype: Any) -> Path:
    """FLUX.1-dev's VAE, CLIP-L and transformer widths (3072, 24 heads) with 2 double + 4 single blocks (of 19 +
    38) and a 2-layer T5 of d_model 4096: the full model's per-block shapes in a fraction of its 12 B parameters."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from lora_scripts.tiny_models.flux import write_tiny_t5_tokenizer

    src = CONFIGS / "flux1-dev"
    shutil.copytree(src, folder, dirs_exist_ok=True)
    config = dict(FluxTransformer2DModel.load_config(src / "transformer"), num_layers=2, num_single_layers=4)
    _save_random(FluxTransformer2DModel, config, folder / "transformer", device, dtype)
    _save_random(AutoencoderKL, AutoencoderKL.load_config(src / "vae"), folder / "vae", device, dtype)
    _save_random(CLIPTextModel, CLIPTextConfig.from_pretrained(src / "text_encoder"), folder / "text_encoder",
                 device, dtype)
    _clip_tokenizer(folder / "tokenizer", src / "tokenizer")
    write_tiny_t5_tokenizer(folder / "tokenizer_2", max_length=128)
    t5 = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=2, num_heads=64,
                  feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    _save_random(T5EncoderModel, t5, folder / "text_encoder_2", device, dtype)
    return folder


def build_llama(folder: Path, device: str, dtype: Any, dry: bool) -> Path:
    """TinyLlama-1.1B's shape (2048 wide, 22 layers, GQA 32/4 heads, 32000 vocab) with the small BPE tokenizer."""
    import transformers

    from lora_scripts.testing import CHATML_JINJA, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(chat_template=CHATML_JINJA)
    tokenizer.save_pretrained(folder)
    shape = (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=len(tokenizer)) if dry else
             dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                  num_key_value_heads=4, vocab_size=32000))
    config = transformers.LlamaConfig(**shape, max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    _save_random(transformers.LlamaForCausalLM, config, folder, device, dtype)
    return folder


def build_model(name: str, folder: Path, dry: bool) -> Path:
    """The model folder for builder ``name``: tiny (the test suite's builders) in a dry run, else real-shaped."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    if dry:
        from lora_scripts.testing import make_tiny_sd_model, make_tiny_sdxl_model
        from lora_scripts.tiny_models import make_tiny_model

        if name == "llama":
            return build_llama(folder, "cpu", torch.float32, dry=True)
        return {"sd15": make_tiny_sd_model, "sdxl": make_tiny_sdxl_model,
                "flux": lambda f: make_tiny_model("flux", f)}[name](folder)
    if name == "llama":
        return build_llama(folder, "cuda", torch.bfloat16, dry=False)
    if name == "flux":
        return build_flux_model(folder, "cuda", torch.bfloat16)
    return build_unet_model(name, folder, "cuda", torch.float16)


# --- running --------------------------------------------------------------------------------------------------------
def losses_of(output_dir: Path) -> list[float]:
    path = output_dir / "logs" / "loss.csv"
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as fh:
        return [float(row["loss"]) for row in csv.DictReader(fh) if row.get("loss") not in (None, "")]


def falls(losses: list[float]) -> bool:
    """The mean of the last third of the steps is below that of the first third."""
    if len(losses) < 3:
        return False
    third = max(1, len(losses) // 3)
    return sum(losses[-third:]) / third < sum(losses[:third]) / third


def config_for(case: Case, model: Path, data: dict[str, Path], out: Path) -> dict[str, Any]:
    """The run's config dict: the demo concept's data, the case's precision/optimizer/packing settings."""
    common = {"max_train_steps": case.steps, "save_steps": case.steps, "seed": 0,
              "logging": {"tensorboard": False, "loss_csv": True}, "overwrite": True}
    if case.kind == "image":
        from lora_scripts.testing import tiny_image_config

        return tiny_image_config(model, data["image"], out, learning_rate=1e-4, lora_rank=16, lora_alpha=16,
                                 **common, **case.overrides)
    return {"task": "text", "base_model": str(model), "output_dir": str(out), "metadata_path": str(data["text"]),
            "lora_rank": 16,
            "lora_alpha": 32, "learning_rate": 2e-4, **common, **case.overrides}


def units_per_step(case: Case, raw: dict[str, Any], model: Path, data: dict[str, Path]) -> tuple[float, str]:
    """Images per step, or tokens per step (packed rows are full; unpacked: the data's mean sample length)."""
    if case.kind == "image":
        return float(raw["batch_size"]), "images"
    if raw.get("packing"):
        return float(raw["batch_size"] * raw["max_seq_length"]), "tokens"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    rows = [json.loads(line) for line in data["text"].read_text(encoding="utf-8").splitlines() if line.strip()]
    mean = sum(len(tok(r["instruction"] + " " + r["output"]).input_ids) + 8 for r in rows) / len(rows)
    return raw["batch_size"] * mean, "tokens"


def run_case(case: Case, work: Path, data: dict[str, Path], dry: bool, models: dict[str, Path]) -> dict[str, Any]:
    """Build (or reuse) the model, estimate memory, train, and measure; a failure becomes the row's note."""
    import torch

    from lora_scripts.config import build_config
    from lora_scripts.preflight import estimate_memory
    from lora_scripts.train.loop import train

    row: dict[str, Any] = {"case": case.name}
    if case.build not in models:
        models[case.build] = build_model(case.build, work / f"model-{case.build}", dry)
    model = models[case.build]
    out = work / f"run-{len(list(work.glob('run-*')))}"
    raw = config_for(case, model, data, out)
    if dry and case.cuda_only:
        build_config(raw)  # the config itself is checked; the step needs CUDA
        return {**row, "note": f"config valid; {case.cuda_only}"}
    cfg = build_config(raw)
    try:
        row["estimate_gb"] = estimate_memory(cfg).total / 2**30
    except Exception as exc:  # noqa: BLE001 - an estimate failure is a finding, not a reason to skip the run
        row["estimate_note"] = f"estimate failed: {type(exc).__name__}: {str(exc)[:80]}"
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = train(cfg)
    row["wall_s"] = time.perf_counter() - t0
    if torch.cuda.is_available():
        row["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    losses = losses_of(out)
    per_step, unit = units_per_step(case, raw, model, data)
    sps = 1.0 / result.seconds_per_step if result.seconds_per_step else float("nan")
    row.update(steps_s=sps, rate=per_step * sps, unit=unit, losses=losses,
               finite=bool(losses) and all(math.isfinite(x) for x in losses), falls=falls(losses))
    shutil.rmtree(out, ignore_errors=True)
    return row


def make_data(work: Path) -> dict[str, Path]:
    """The demo concepts: ``in zkq style`` images and pirate-format answers."""
    from lora_scripts.learning import format_split, make_style_images, write_format_data

    train_pairs, _ = format_split()
    return {"image": make_style_images(work / "zkq"), "text": write_format_data(work / "pirate.jsonl", train_pairs,
                                                                               repeat=4)}


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| case | steps/s | images or tokens /s | loss first → last | finite, falls | peak GPU GiB | "
             "estimate GiB | note |", "|---|---:|---:|---|---|---:|---:|---|"]
    for r in rows:
        losses = r.get("losses") or []
        loss = f"{losses[0]:.4f} → {losses[-1]:.4f}" if losses else ""
        ok = f"{'yes' if r.get('finite') else 'NO'}, {'yes' if r.get('falls') else 'no'}" if "finite" in r else ""
        rate = f"{r['rate']:.1f} {r['unit']}" if "rate" in r else ""
        note = r.get("note", "") or r.get("estimate_note", "")
        lines.append(f"| {r['case']} | {r['steps_s']:.2f} | {rate} | {loss} | {ok} | "
                     f"{r.get('peak_gb', float('nan')):.2f} | {r.get('estimate_gb', float('nan')):.2f} | {note} |"
                     if "steps_s" in r else f"| {r['case']} | | | | | | | {note} |")
    lines += [f"| {name} | | | | | | | not built |" for name in NOT_BUILT]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, 2 steps per case")
    parser.add_argument("--only", help="comma-separated substrings of case names to run")
    parser.add_argument("--doc", type=Path, help="write the table here instead of docs/BENCHMARKS.md")
    parser.add_argument("--no-doc", action="store_true", help="print only")
    args = parser.parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; use --dry-run for the CPU check", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        data, models = make_data(work), {}
        for case in cases(args.dry_run):
            if args.only and not any(s.strip().lower() in case.name.lower() for s in args.only.split(",")):
                continue
            if not args.dry_run and time.perf_counter() - start > BUDGET_S:  # a CPU dry run may be slow
                rows.append({"case": case.name, "note": "not run: the 7.5-minute budget was spent"})
                continue
            print(f"gpu_check: {case.name} ...", flush=True)
            try:
                rows.append(run_case(case, work, data, args.dry_run, models))
            except Exception as exc:  # noqa: BLE001 - one failing case must not hide the others
                traceback.print_exc()
                rows.append({"case": case.name, "note": f"FAILED: {type(exc).__name__}: {str(exc)[:120]}"})
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            print(f"  {rows[-1]}", flush=True)
    mode = "dry run (CPU, tiny shapes, 2 steps each)" if args.dry_run else "CUDA"
    text = "\n".join([f"`python benchmarks/gpu_check.py{' --dry-run' if args.dry_run else ''}`: {mode}, "
                      f"{time.perf_counter() - start:.0f} s in all.", "", f"Machine: {machine_info('cuda')}", "",
                      *table(rows)])
    print("\n" + text)
    if not args.no_doc:
        section = "gpu-check-dry-run" if args.dry_run else "gpu-check"
        if args.doc:
            write_section(section, text, doc=args.doc)
        else:
            write_section(section, text)
    failed = [r for r in rows if str(r.get("note", "")).startswith("FAILED") or r.get("finite") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

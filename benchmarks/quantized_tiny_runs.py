"""Quantised vs unquantised frozen base (``base_quantization``) on tiny models, side by side: CPU seconds per step,
peak memory, and the bytes the frozen base's stored weights take.

    PYTHONPATH=. python benchmarks/quantized_tiny_runs.py [--steps 8] [--repeats 3] [--models sd1 flux text]
                                                          [--kinds none int8 fp8] [--print-only]

Every (model, kind) run is a fresh process with one torch thread (steadier on a shared machine), trained through
the Python API on the same data: SD 1.x and FLUX.1 tiny models on 8 captioned 32 px images (batch 2, rank 4), the
tiny LLaMA on the built-in instructions (batch 4, rank 4, all linears). Runs alternate within each repeat so machine
noise hits them alike; each figure is the median over repeats. s/step is per CPU-second of the process over the
steps after the first (one-off costs excluded). Peak memory is the process's peak RSS (os.wait4): on these tiny
models it is dominated by the libraries, so the "frozen base" column (parameters and buffers of the quantised
modules as stored, torchao's int8/fp8 data and scales included) shows what quantisation saves. Writes its table into
docs/BENCHMARKS.md unless ``--print-only``. Never run by the test suite.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed_common import alternate, command_line, emit, machine_info, median, publish, rates, run_worker  # noqa: E402


def _prepare(model: str, root: Path) -> tuple[Path, Path]:
    """The tiny model and its data under ``root`` (made once, shared by every run)."""
    from lora_scripts.testing import (make_captioned_images, make_instruction_data, make_tiny_causal_lm,
                                      make_tiny_sd_model)

    folder = root / f"tiny-{model}"
    if model == "text":
        data = root / "instructions.jsonl"
        if not folder.exists():
            make_tiny_causal_lm(folder, "llama")
            make_instruction_data(data, "alpaca", repeat=2)
        return folder, data
    data = root / "images"
    if not data.exists():
        make_captioned_images(data, count=8)
    if not folder.exists():
        if model == "sd1":
            make_tiny_sd_model(folder)
        else:
            from lora_scripts.tiny_models.flux import make_tiny_model

            make_tiny_model(folder)
    return folder, data


def worker(spec: dict) -> None:
    """One training run in this process; prints RESULT with its rates and the frozen base's stored bytes."""
    import torch

    torch.set_num_threads(1)
    from lora_scripts.config import build_config
    from lora_scripts.models.quantize import parameter_bytes
    from lora_scripts.testing import tiny_image_config
    from lora_scripts.train.loop import Trainer

    model, data, out, kind, steps = spec["model"], Path(spec["data"]), Path(spec["out"]), spec["kind"], spec["steps"]
    if spec["task"] == "text":
        raw = {"task": "text", "base_model": spec["folder"], "metadata_path": str(data), "output_dir": str(out),
               "lora_rank": 4, "batch_size": 4, "max_train_steps": steps, "save_steps": 0, "learning_rate": 1e-2,
               "max_seq_length": 96, "target_modules": "all-linear", "logging": {"tensorboard": False}}
    else:
        raw = tiny_image_config(spec["folder"], data, out, max_train_steps=steps, save_steps=0, text_max_length=16,
                                logging={"tensorboard": False})
    raw["base_quantization"] = kind
    trainer = Trainer(build_config(raw), show_progress=False)
    result = trainer.run()
    network = trainer.accelerator.unwrap_model(trainer.model)
    if spec["task"] == "text":
        frozen = parameter_bytes(network)
    else:
        from lora_scripts.tasks.image.task import quantized_modules

        frozen = sum(parameter_bytes(m) for m in quantized_modules(trainer.task.components))
    frozen -= sum(p.numel() * p.element_size() for p in network.parameters() if p.requires_grad)  # the LoRA
    _, steps_per_cpu_s = rates([1.0] * result.steps, result.extra["step_ends"], result.extra["loop_started"], 1)
    emit({"cpu_s_per_step": 1.0 / steps_per_cpu_s, "frozen_kb": frozen / 1024, "final_loss": result.final_loss,
          "model": model})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="*", default=["sd1", "flux", "text"])
    parser.add_argument("--kinds", nargs="*", default=["none", "int8", "fp8"])
    parser.add_argument("--print-only", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    root = Path(tempfile.mkdtemp(prefix="quantized-runs-"))
    rows = ["| model | base_quantization | CPU s/step (median) | peak RSS MB (median) | frozen base KB | final loss |",
            "|---|---|---:|---:|---:|---:|"]
    for model in args.models:
        folder, data = _prepare(model, root)
        spec = {"model": model, "task": "text" if model == "text" else "image", "folder": str(folder),
                "data": str(data), "steps": args.steps}

        def run(kind: str, rep: int) -> dict:
            job = {**spec, "kind": kind, "out": str(root / f"out-{model}-{kind}-{rep}")}
            return run_worker([__file__, "--worker", json.dumps(job)])

        print(f"{model}: {args.kinds} x {args.repeats}", flush=True)
        results = alternate(args.kinds, args.repeats, run)
        for kind in args.kinds:
            r = results[kind]
            rows.append(f"| {model} | {kind} | {median([x['cpu_s_per_step'] for x in r]):.3f} | "
                        f"{median([x['peak_rss_mb'] for x in r]):.0f} | {median([x['frozen_kb'] for x in r]):.0f} | "
                        f"{median([x['final_loss'] for x in r]):.4f} |")
    header = ["## Quantised frozen base: tiny runs", "", f"`{command_line()}`", "",
              machine_info() + "; 1 torch thread per run"]
    publish("Quantised frozen base: tiny runs", header, rows, [], args.print_only)


if __name__ == "__main__":
    main()

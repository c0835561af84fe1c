"""Memory estimate: seconds per shipped full-size config, its error against the full fake step, and what it chooses.

    PYTHONPATH=. .venv/bin/python benchmarks/estimate_speed.py             # speed + error table
    PYTHONPATH=. .venv/bin/python benchmarks/estimate_speed.py --choices   # the docs/memory.md table

Each config runs in a fresh process on the shipped configs folder of its family (lora_scripts/models/configs: no
weights), with an empty estimate cache: ``fast`` is what ``lora-scripts estimate`` costs the first time (import
excluded, model construction included), ``cached`` a second call, ``full`` the same step with every block run (the
reference; ``--no-full`` skips it). Never run by the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "lora_scripts" / "models" / "configs"

# name, example config (or None: built from sd15's), shipped model configs folder, overrides
CASES = [
    ("SD1.5 512 b2", "sd15_style_full.yaml", "sd15", {"mixed_precision": "bf16"}),
    ("SD2.1 768", "sd2_v_prediction.yaml", "sd2", {}),
    ("SDXL 1024", "sd15_style_full.yaml", "sdxl", {"mixed_precision": "bf16", "resolution": 1024, "batch_size": 1}),
    ("SD3.5-Large 1024", "sd35_large_lora.yaml", "sd3.5-large", {}),
    ("FLUX.1-dev 1024", "flux1_dev_lora.yaml", "flux1-dev", {}),
    ("Chroma1-HD 1024", "chroma_lora.yaml", "chroma1-hd", {}),
    ("Qwen-Image 1024", "qwen_image_lora.yaml", "qwen-image", {}),
    ("Z-Image 1024", "z_image_lora.yaml", "z-image", {}),
]
TABLE = ["SD1.5 512 b2", "SDXL 1024", "SD3.5-Large 1024", "FLUX.1-dev 1024", "Qwen-Image 1024", "Z-Image 1024"]

CHILD = r"""
import json, sys, time
from lora_scripts.cli import quiet_libraries
quiet_libraries()
from lora_scripts.config import build_config
from lora_scripts.preflight import GiB, estimate_memory, set_line
raw, mode = json.loads(sys.argv[1]), sys.argv[2]
cfg = build_config(raw)
out = {}
if mode == "speed":
    for name, full in (("fast", False), ("cached", False)) + ((("full", True),) if sys.argv[3] == "1" else ()):
        t, c = time.perf_counter(), time.process_time()
        est = estimate_memory(cfg, gpu=True, choose=False, full=full)
        out[name] = {"wall": time.perf_counter() - t, "cpu": time.process_time() - c, "total": est.total,
                     "step": est.parts.get("activations", 0) + est.parts.get("temporaries", 0)}
else:
    plain = build_config({**raw, "gradient_checkpointing": False, "batch_size": 1, "gradient_accumulation_steps": 1})
    est = estimate_memory(plain, gpu=True, choose=False)
    out["plain"] = [est.total / GiB, est.system_total / GiB]
    for vram in (24, 16, 12):
        est = estimate_memory(plain, capacity=vram * GiB, ram=64 * GiB, gpu=True)
        chosen = est.chosen or est
        out[vram] = ("nothing fits" if est.nothing_fits else set_line(est.choice) or "as configured",
                     chosen.total / GiB, chosen.system_total / GiB)
print("RESULT " + json.dumps(out))
"""


def raw_config(example: str, folder: str, overrides: dict, data: Path, out: Path) -> dict:
    import yaml

    raw = yaml.safe_load((ROOT / "configs" / example).read_text())
    raw.pop("metadata_path", None)
    raw.update(base_model=str(CONFIGS / folder), train_data_dir=str(data), output_dir=str(out), resume=None,
               lora_rank=16, **overrides)
    return raw


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--choices", action="store_true", help="the docs table: plain bf16 and 24/16/12 GB picks")
    parser.add_argument("--no-full", action="store_true", help="skip the full-step reference")
    parser.add_argument("--only", nargs="*", help="case names to run")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    (tmp / "data").mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LORA_SCRIPTS_ESTIMATE_CACHE": str(tmp / "cache")}
    if args.choices:
        print("| model | plain bf16: GPU / system GiB | 24 GB | 16 GB | 12 GB |")
        print("|---|---|---|---|---|")
    else:
        print(f"| config | first estimate s (CPU s) | cached s | full step s (CPU s) | GPU total GiB | step GiB "
              f"fast / full | step error |")
        print("|---|---|---|---|---|---|---|")
    for name, example, folder, overrides in CASES:
        if (args.only and name not in args.only) or (args.choices and name not in TABLE):
            continue
        raw = raw_config(example, folder, overrides, tmp / "data", tmp / "out")
        mode = "choices" if args.choices else "speed"
        env["LORA_SCRIPTS_ESTIMATE_CACHE"] = str(tmp / f"cache-{name.replace(' ', '_')}")
        proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(raw), mode, "0" if args.no_full else "1"],
                              capture_output=True, text=True, env=env)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"| {name} | failed: {(proc.stderr.strip().splitlines() or ['?'])[-1][:150]} |")
            continue
        r = json.loads(lines[-1][7:])
        if args.choices:
            cells = [f"{r['plain'][0]:.1f} / {r['plain'][1]:.1f}"]
            for vram in ("24", "16", "12"):
                pick, gpu, system = r[vram]
                cells.append(f"`{pick.replace('--set ', '')}`: {gpu:.1f} / {system:.1f}" if pick != "nothing fits"
                             else "nothing fits")
            print(f"| {name} | " + " | ".join(cells) + " |")
            continue
        fast, cached, full = r["fast"], r["cached"], r.get("full")
        g = 2**30
        full_cell = f"{full['wall']:.1f} ({full['cpu']:.1f})" if full else "-"
        step = f"{fast['step'] / g:.2f} / {full['step'] / g:.2f}" if full else f"{fast['step'] / g:.2f} / -"
        error = f"{(fast['step'] - full['step']) / full['step']:+.1%}" if full and full["step"] else "-"
        print(f"| {name} | {fast['wall']:.1f} ({fast['cpu']:.1f}) | {cached['wall']:.2f} | {full_cell} | "
              f"{fast['total'] / g:.2f} | {step} | {error} |", flush=True)


if __name__ == "__main__":
    main()

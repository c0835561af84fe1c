"""``benchmarks/gpu_check.py --dry-run``: the GPU acceptance command's own code path on CPU with tiny shapes, so it
cannot rot between the rare runs on a GPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.gpu_check import cases, falls  # noqa: E402


def test_dry_run_trains_every_kind_of_case_and_writes_the_table(tmp_path):
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n", encoding="utf-8")
    only = "SD1.5 512 px bf16,LLaMA 1.1B bf16,QLoRA,packing"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--only", only,
                           "--doc", str(doc)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = doc.read_text(encoding="utf-8")
    assert "<!-- bench:gpu-check-dry-run -->" in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    for trained in ("SD1.5 512 px bf16", "LLaMA 1.1B bf16", "LLaMA 1.1B packing (SDPA)"):
        cells = [c.strip() for c in rows[trained].split("|")]
        assert float(cells[2]) > 0, rows[trained]  # steps/s measured
        assert cells[5].startswith("yes"), rows[trained]  # finite loss
    assert "config valid; bitsandbytes 4-bit needs CUDA" in rows["LLaMA 1.1B QLoRA nf4"]
    assert "not built" in rows["FLUX block swap"]
    assert "SDXL 1024 px bf16" not in rows  # --only left it out


def test_without_a_gpu_the_real_run_refuses_in_one_line():
    import torch

    if torch.cuda.is_available():  # the real command would start; never make the suite depend on a GPU
        return
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--no-doc"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "no CUDA GPU" in proc.stderr


def test_cases_cover_the_issue_and_the_loss_check_needs_a_real_fall():
    names = " ".join(c.name for c in cases(dry=False))
    for wanted in ("SD1.5 512 px fp16", "SD1.5 512 px bf16", "SDXL 1024 px fp16", "SDXL 1024 px bf16", "FLUX",
                   "LLaMA 1.1B bf16", "QLoRA nf4", "8-bit AdamW", "packing"):
        assert wanted in names
    assert falls([3.0, 3.0, 2.0, 2.0, 1.0, 1.0]) and not falls([1.0, 1.0, 2.0, 2.0, 3.0, 3.0])
    assert not falls([1.0, 0.5])  # too few steps to tell

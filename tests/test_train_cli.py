"""End to end through the real command line on tiny data: what a user types and what they get."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

from safetensors import safe_open

from .helpers import REPO_ROOT, cli_env, run_cli


def test_lora_scripts_train_writes_everything(write_config, tmp_path):
    config = write_config(
        max_train_steps=6, save_steps=2, keep_last_checkpoints=2, logging={"tensorboard": True, "loss_csv": True},
        output_name="shapes",
    )
    proc = run_cli("train", "--config", str(config))
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    # export: kohya file at the top, diffusers file in diffusers/
    kohya = out / "shapes.safetensors"
    assert kohya.is_file() and (out / "diffusers" / "pytorch_lora_weights.safetensors").is_file()
    with safe_open(str(kohya), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["ss_steps"] == "6" and meta["ss_output_name"] == "shapes"
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in keys)
    # checkpoints: every save_steps and at the end, pruned to the newest 2, no temporaries left
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-4", "step-6"]
    step6 = out / "checkpoints" / "step-6"
    for name in ("adapter.safetensors", "optimizer.pt", "scheduler.pt", "rng_state_0.pt", "config.yaml", "state.json"):
        assert (step6 / name).is_file(), name
    state = json.loads((step6 / "state.json").read_text())
    assert state["step"] == 6 and state["dataset_hash"]
    # logs: loss.csv with one row per step, TensorBoard events
    rows = list(csv.DictReader(open(out / "logs" / "loss.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert list(rows[0]) == ["step", "epoch", "loss", "lr", "elapsed_s", "eval_loss"] and float(rows[0]["loss"]) > 0
    assert list((out / "logs").glob("events.out.tfevents.*"))
    # the final summary names the files
    assert "files written:" in proc.stdout and str(kohya) in proc.stdout
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 6 and summary["seconds_per_step"] > 0


def test_python_train_py_seed_entry_point(write_config, tmp_path):
    config = write_config(max_train_steps=2, output_name="seedstyle")
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "train.py"), "--config", str(config), "--no-progress"],
        env=cli_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "seedstyle.safetensors").is_file()


def test_check_command_reports_data(write_config):
    proc = run_cli("check", "--config", str(write_config()))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok: 6 captioned images")


def test_tensorboard_events_hold_the_loss(write_config, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lora_scripts.config import load_config
    from lora_scripts.train.loop import train

    train(load_config(write_config(max_train_steps=3, logging={"tensorboard": True})), show_progress=False)
    acc = EventAccumulator(str(tmp_path / "out" / "logs"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3]

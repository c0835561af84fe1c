"""Checkpoints and resume: exact continuation, kill -9 survival, atomic folders, pruning, log continuity."""

from __future__ import annotations

import csv
import signal
import subprocess
import sys
import time

import pytest

from lora_scripts.config import load_config
from lora_scripts.errors import ConfigError
from lora_scripts.train.checkpoint import latest_checkpoint
from lora_scripts.train.loop import train

from .helpers import assert_same_tensors, cli_env


def test_n_steps_then_resume_n_more_equals_2n_uninterrupted(write_config, tmp_path):
    """A run of N steps + resume + N more steps ends with the same LoRA tensors as an uninterrupted 2N-step run."""
    common = dict(save_steps=2, lora_dropout=0.1, random_flip=True, random_crop=True)
    straight = load_config(write_config("a.yaml", output="straight", max_train_steps=8, **common))
    train(straight, show_progress=False)

    first = load_config(write_config("b.yaml", output="split", max_train_steps=4, **common))
    train(first, show_progress=False)
    second = load_config(write_config("b.yaml", output="split", max_train_steps=8, resume="latest", **common))
    result = train(second, show_progress=False)

    assert result.resumed_from.name == "step-4"
    assert_same_tensors(tmp_path / "straight/checkpoints/step-8/adapter.safetensors",
                        tmp_path / "split/checkpoints/step-8/adapter.safetensors")
    assert_same_tensors(tmp_path / "straight/straight.safetensors",
                        tmp_path / "split/split.safetensors")


def test_kill_9_then_resume_latest_matches_uninterrupted(write_config, tmp_path):
    """SIGKILL a real CLI run mid-training (cosine schedule, dropout), resume with --resume latest: same result."""
    common = dict(save_steps=1, lora_dropout=0.1, lr_scheduler="cosine", lr_warmup_steps=2, max_train_steps=24,
                  gradient_accumulation_steps=2, batch_size=1)
    train(load_config(write_config("a.yaml", output="straight", **common)), show_progress=False)

    config = write_config("b.yaml", output="killed", **common)
    ckpts = tmp_path / "killed" / "checkpoints"
    proc = subprocess.Popen([sys.executable, "-m", "lora_scripts.cli", "train", "--config", str(config)],
                            env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (ckpts / "step-3").exists():
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = latest_checkpoint(ckpts)
    assert killed_at is not None and int(killed_at.name.split("-")[1]) < 24

    resumed = subprocess.run([sys.executable, "-m", "lora_scripts.cli", "train", "--config", str(config),
                              "--resume", "latest", "--no-progress"], env=cli_env(), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {killed_at}" in resumed.stdout
    assert_same_tensors(tmp_path / "straight/checkpoints/step-24/adapter.safetensors",
                        tmp_path / "killed/checkpoints/step-24/adapter.safetensors")
    # the loss log has every step exactly once, rows past the checkpoint from the killed run dropped
    rows = list(csv.DictReader(open(tmp_path / "killed/logs/loss.csv")))
    assert [int(r["step"]) for r in rows] == list(range(1, 25))


def test_partial_checkpoint_is_ignored_and_cleaned(write_config, tmp_path):
    cfg = load_config(write_config(max_train_steps=2, save_steps=1))
    train(cfg, show_progress=False)
    ckpts = tmp_path / "out" / "checkpoints"
    # what a kill during a checkpoint write leaves: a temporary folder, and a step folder without state.json
    (ckpts / "step-9.tmp").mkdir()
    (ckpts / "step-9.tmp" / "adapter.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(ckpts).name == "step-2"
    resumed = train(load_config(write_config(max_train_steps=3, save_steps=1, resume="latest")), show_progress=False)
    assert resumed.resumed_from.name == "step-2" and resumed.steps == 3
    assert not (ckpts / "step-9.tmp").exists()


def test_resume_latest_without_checkpoint_starts_fresh(write_config, capsys):
    result = train(load_config(write_config(max_train_steps=1, resume="latest")), show_progress=False)
    assert result.resumed_from is None and result.steps == 1
    assert "starting from step 0" in capsys.readouterr().out


def test_resume_from_explicit_path_and_mismatched_rank(write_config, tmp_path):
    train(load_config(write_config(max_train_steps=2, save_steps=1)), show_progress=False)
    step1 = tmp_path / "out" / "checkpoints" / "step-1"
    result = train(load_config(write_config(output="other", max_train_steps=2, resume=str(step1))), show_progress=False)
    assert result.resumed_from == step1 and result.steps == 2
    with pytest.raises(ConfigError, match="changed lora_rank"):
        train(load_config(write_config(output="other2", max_train_steps=2, resume=str(step1), lora_rank=8)),
              show_progress=False)
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        train(load_config(write_config(output="x", resume=str(tmp_path / "nowhere"))), show_progress=False)


def test_keep_last_prunes_only_complete_older_checkpoints(write_config, tmp_path):
    train(load_config(write_config(max_train_steps=5, save_steps=1, keep_last_checkpoints=2)), show_progress=False)
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == ["step-4", "step-5"]


def test_output_dir_of_another_run_is_refused_unless_resume_or_overwrite(write_config, tmp_path, capsys):
    from lora_scripts.cli import main

    config = write_config(max_train_steps=2)
    assert main(["train", "--config", str(config), "--no-progress"]) == 0
    before = (tmp_path / "out" / "out.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["train", "--config", str(config), "--no-progress", "--set", "seed=7"]) == 2
    err = capsys.readouterr().err.strip()
    assert "already holds a run" in err and "--overwrite" in err and "\n" not in err
    assert (tmp_path / "out" / "out.safetensors").read_bytes() == before  # nothing of the previous run changed
    assert main(["train", "--config", str(config), "--no-progress", "--overwrite", "--set", "seed=7"]) == 0
    assert (tmp_path / "out" / "out.safetensors").read_bytes() != before
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == ["step-2"]

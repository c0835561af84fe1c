"""Safety rails: graceful SIGTERM, one-line OOM, and a kill -9 suite that resumes bit for bit."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time

import torch

from lora_scripts.cli import main
from lora_scripts.config import load_config
from lora_scripts.tasks.image import ImageTask
from lora_scripts.train.checkpoint import latest_checkpoint
from lora_scripts.train.loop import train

from .helpers import assert_same_tensors, cli_env


def start(config, *extra, env=None):
    return subprocess.Popen([sys.executable, "-m", "lora_scripts.cli", "train", "--config", str(config), "--no-progress",
                             *extra], env=env or cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def rows_logged(out) -> int:
    path = out / "logs" / "loss.csv"
    return max(0, len(path.read_text().splitlines()) - 1) if path.exists() else 0


def wait_until(condition, proc, timeout=120):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, "the run ended before the moment to interrupt it"
        assert time.time() < deadline
        time.sleep(0.01)


def test_sigterm_finishes_the_step_checkpoints_and_resumes_exactly(write_config, tmp_path):
    common = dict(max_train_steps=30, save_steps=100, lr_scheduler="cosine")
    train(load_config(write_config("a.yaml", output="straight", **common)), show_progress=False)
    config = write_config("b.yaml", output="stopped", **common)
    proc = start(config)
    wait_until(lambda: rows_logged(tmp_path / "stopped") >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "stopped by SIGTERM after step" in out and "--resume latest" in out
    stopped_at = latest_checkpoint(tmp_path / "stopped" / "checkpoints")
    assert stopped_at is not None and 3 <= json.loads((stopped_at / "state.json").read_text())["step"] < 30
    assert not (tmp_path / "stopped" / "stopped.safetensors").exists()  # no export from a stopped run
    resumed = start(config, "--resume", "latest")
    assert resumed.wait(timeout=300) == 0
    assert_same_tensors(tmp_path / "straight/straight.safetensors", tmp_path / "stopped/stopped.safetensors")


def test_out_of_memory_is_one_line_with_advice_and_keeps_the_checkpoint(write_config, tmp_path, capsys, monkeypatch):
    real_loss, calls = ImageTask.loss, []

    def flaky(self, model, batch):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_loss(self, model, batch)

    monkeypatch.setattr(ImageTask, "loss", flaky)
    code = main(["train", "--config", str(write_config(max_train_steps=5, save_steps=2)), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 3 and "\n" not in err and "Traceback" not in err
    assert "out of memory at step 3" in err and "step-2" in err
    assert "batch_size: 1 with gradient_accumulation_steps: 2" in err and "gradient_checkpointing: true" in err
    ckpts = tmp_path / "out" / "checkpoints"
    assert latest_checkpoint(ckpts).name == "step-2" and not list(ckpts.glob("*.tmp"))


def test_kill_9_at_ten_moments_then_resume_bit_for_bit(write_config, tmp_path):
    """SIGKILL a real run ten times, half of them while a checkpoint is being written; resume after each."""
    common = dict(max_train_steps=14, save_steps=1, lora_dropout=0.1, random_flip=True, lr_scheduler="cosine")
    train(load_config(write_config("a.yaml", output="straight", **common)), show_progress=False)
    config = write_config("b.yaml", output="killed", **common)
    ckpts = tmp_path / "killed" / "checkpoints"
    env = {**cli_env(), "LORA_SCRIPTS_TEST_CHECKPOINT_DELAY": "0.2"}
    rng = random.Random(0)
    kills = 0
    for attempt in range(10):
        before = latest_checkpoint(ckpts)
        proc = start(config, "--resume", "latest", env=env)
        if attempt % 2 == 0:  # while a checkpoint folder is half-written
            wait_until(lambda: any(p.name.endswith(".tmp") for p in ckpts.glob("step-*")) if ckpts.exists() else False,
                       proc)
        else:  # a random moment once training has advanced past the last checkpoint
            wait_until(lambda: latest_checkpoint(ckpts) != before, proc)
            time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is None:
            proc.kill()
            kills += 1
        proc.wait()
        latest = latest_checkpoint(ckpts)
        if latest is not None:  # "latest" is always a complete, loadable checkpoint
            state = json.loads((latest / "state.json").read_text())
            assert state["step"] == int(latest.name.split("-")[1])
            for name in ("adapter.safetensors", "optimizer.pt", "scheduler.pt", "rng_state_0.pt", "config.yaml"):
                assert (latest / name).is_file()
            torch.load(latest / "optimizer.pt", weights_only=False)
        if latest is not None and int(latest.name.split("-")[1]) >= 13:
            break
    assert kills >= 8
    final = start(config, "--resume", "latest")
    assert final.wait(timeout=300) == 0, final.stderr.read()
    assert not list(ckpts.glob("*.tmp"))  # no temp files left behind after the resume
    assert_same_tensors(tmp_path / "straight/checkpoints/step-14/adapter.safetensors", ckpts / "step-14/adapter.safetensors")
    assert_same_tensors(tmp_path / "straight/straight.safetensors", tmp_path / "killed/killed.safetensors")

"""Same global batch, same LoRA: 2 processes (``train --nproc 2``: torchrun, CPU, gloo) vs one process, and
accumulation vs a big batch."""

from __future__ import annotations

from lora_scripts.config import load_config
from lora_scripts.train.loop import train

from .helpers import assert_same_tensors, run_cli


def test_accumulation_equals_large_batch(write_config, tmp_path):
    train(load_config(write_config("a.yaml", output="big", batch_size=4, max_train_steps=3)), show_progress=False)
    train(load_config(write_config("b.yaml", output="accum", batch_size=1, gradient_accumulation_steps=4,
                                   max_train_steps=3)), show_progress=False)
    assert_same_tensors(tmp_path / "big/checkpoints/step-3/adapter.safetensors",
                        tmp_path / "accum/checkpoints/step-3/adapter.safetensors", atol=1e-5)


def test_nproc_two_processes_equals_one(write_config, tmp_path):
    # text-encoder LoRA on too: its gradients must be synchronised like the UNet's
    steps = dict(max_train_steps=3, save_steps=2, lr_scheduler="linear", train_text_encoder=True, text_encoder_lr=5e-3)
    train(load_config(write_config("one.yaml", output="one", batch_size=4, **steps)), show_progress=False)
    config = write_config("two.yaml", output="two", batch_size=2, **steps)
    proc = run_cli("train", "--config", str(config), "--nproc", "2", "--no-progress", timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    for name in ("checkpoints/step-2/adapter.safetensors", "checkpoints/step-3/adapter.safetensors"):
        assert_same_tensors(tmp_path / "one" / name, tmp_path / "two" / name, atol=1e-5)
    assert_same_tensors(tmp_path / "one/one.safetensors", tmp_path / "two/two.safetensors", atol=1e-5)


def test_nproc_refuses_bad_values_and_bad_configs_before_starting(write_config, tmp_path):
    proc = run_cli("train", "--config", str(write_config("z.yaml", output="z")), "--nproc", "0")
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --nproc: 0 must be at least 1"
    proc = run_cli("train", "--config", str(tmp_path / "missing.yaml"), "--nproc", "2")
    assert proc.returncode == 2 and "torch.distributed" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1

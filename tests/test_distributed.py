"""Same global batch, same LoRA: 2-process torchrun (CPU, gloo) vs one process, and accumulation vs a big batch."""

from __future__ import annotations

from lora_scripts.config import load_config
from lora_scripts.train.loop import train

from .helpers import assert_same_tensors, run_torchrun


def test_accumulation_equals_large_batch(write_config, tmp_path):
    train(load_config(write_config("a.yaml", output="big", batch_size=4, max_train_steps=3)), show_progress=False)
    train(load_config(write_config("b.yaml", output="accum", batch_size=1, gradient_accumulation_steps=4,
                                   max_train_steps=3)), show_progress=False)
    assert_same_tensors(tmp_path / "big/checkpoints/step-3/adapter.safetensors",
                        tmp_path / "accum/checkpoints/step-3/adapter.safetensors", atol=1e-5)


def test_torchrun_two_processes_equals_one(write_config, tmp_path):
    # text-encoder LoRA on too: its gradients must be synchronised like the UNet's
    steps = dict(max_train_steps=3, save_steps=2, lr_scheduler="linear", train_text_encoder=True, text_encoder_lr=5e-3)
    train(load_config(write_config("one.yaml", output="one", batch_size=4, **steps)), show_progress=False)
    config = write_config("two.yaml", output="two", batch_size=2, **steps)
    proc = run_torchrun(config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    for name in ("checkpoints/step-2/adapter.safetensors", "checkpoints/step-3/adapter.safetensors"):
        assert_same_tensors(tmp_path / "one" / name, tmp_path / "two" / name, atol=1e-5)
    assert_same_tensors(tmp_path / "one/one.safetensors", tmp_path / "two/two.safetensors", atol=1e-5)

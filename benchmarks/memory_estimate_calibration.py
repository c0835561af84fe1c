"""Memory estimate vs measured peak for image and text configs (CPU: peak RSS growth; GPU: max_memory_allocated).

    .venv/bin/python benchmarks/memory_estimate_calibration.py

Each config trains 2 steps in a fresh process. On CPU the measure is the peak resident memory minus the resident
memory just before training starts (after imports and a warm-up op), which also holds allocator and library
overheads (glibc is told to return large blocks at once: MALLOC_MMAP_THRESHOLD_); on a GPU it is
torch.cuda.max_memory_allocated(). Prints estimate, measure and the error. Never run by
the test suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, torch
from lora_scripts.cli import quiet_libraries
quiet_libraries()
from lora_scripts.config import build_config
from lora_scripts.preflight import estimate_memory
from lora_scripts.train.loop import train
cfg = build_config(json.loads(sys.argv[1]))
est = estimate_memory(cfg, capacity=None)
x = torch.randn(64, 64, requires_grad=True); (x @ x).sum().backward()  # warm up autograd and the BLAS
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024
base = rss()
if torch.cuda.is_available():
    torch.cuda.reset_peak_memory_stats()
train(cfg, show_progress=False)
if torch.cuda.is_available():
    measured = torch.cuda.max_memory_allocated()
else:
    measured = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
print(json.dumps({"estimate": est.total, "measured": measured}))
"""


def main() -> None:
    from lora_scripts.testing import (make_captioned_images, make_instruction_data, make_tiny_sd_model,
                                      make_tiny_tokenizer)

    tmp = Path(tempfile.mkdtemp())
    sd = make_tiny_sd_model(tmp / "sd")
    images = make_captioned_images(tmp / "img", count=8, size=160)
    import torch
    import transformers

    tok = make_tiny_tokenizer(tmp / "lm")
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=8, max_position_embeddings=2048, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(tmp / "lm")
    text = make_instruction_data(tmp / "text.jsonl", "alpaca", repeat=20)
    del torch
    image = dict(base_model=str(sd), train_data_dir=str(images), lora_rank=8, max_train_steps=2, save_steps=0,
                 logging={"tensorboard": False, "loss_csv": False})
    lm = dict(task="text", base_model=str(tmp / "lm"), metadata_path=str(text), lora_rank=8, max_train_steps=2,
              save_steps=0, packing=True, logging={"tensorboard": False, "loss_csv": False})
    configs = [
        ("image 64px b4", {**image, "resolution": 64, "batch_size": 4}),
        ("image 64px b4 ckpt", {**image, "resolution": 64, "batch_size": 4, "gradient_checkpointing": True}),
        ("image 128px b2", {**image, "resolution": 128, "batch_size": 2}),
        ("image 128px b2 ckpt", {**image, "resolution": 128, "batch_size": 2, "gradient_checkpointing": True}),
        ("text 512 b4", {**lm, "max_seq_length": 512, "batch_size": 4}),
        ("text 512 b4 ckpt", {**lm, "max_seq_length": 512, "batch_size": 4, "gradient_checkpointing": True}),
        ("text 1024 b2", {**lm, "max_seq_length": 1024, "batch_size": 2}),
        ("text 1024 b2 ckpt", {**lm, "max_seq_length": 1024, "batch_size": 2, "gradient_checkpointing": True}),
    ]
    print(f"{'config':<22}{'estimate MiB':>14}{'measured MiB':>14}{'error':>9}")
    for i, (name, cfg) in enumerate(configs):
        cfg = {**cfg, "output_dir": str(tmp / f"out{i}")}
        # A fixed mmap threshold makes glibc return freed large blocks at once, so peak RSS follows live tensors
        # rather than the allocator's high-water mark.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], capture_output=True, text=True, env=env)
        if proc.returncode:
            print(f"{name:<22} failed: {proc.stderr.strip().splitlines()[-1]}")
            continue
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        est, got = result["estimate"] / 2**20, result["measured"] / 2**20
        print(f"{name:<22}{est:>14.1f}{got:>14.1f}{(est - got) / got:>+9.0%}")


if __name__ == "__main__":
    main()

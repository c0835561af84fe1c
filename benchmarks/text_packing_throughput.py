"""Tokens/s (real, non-pad tokens) of the text task with and without packing, on a variable-length dataset.

    .venv/bin/python benchmarks/text_packing_throughput.py [--steps 30] [--repeats 3]

Builds a tiny LLaMA-shaped model (hidden 128, 4 layers) and ~300 alpaca samples whose lengths vary about 10x, then
trains the same config with packing off and on, alternating runs so machine noise hits both alike. Prints a table of
medians and the ratio. Never run by the test suite.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
from pathlib import Path


def make_dataset(path: Path, count: int = 320, seed: int = 0) -> None:
    rng = random.Random(seed)
    words = "the cat sat on a warm mat while rain fell outside and a dog slept near the door".split()
    with open(path, "w") as fh:
        for _ in range(count):
            n = rng.choice([4, 8, 16, 32, 64])
            fh.write(json.dumps({"instruction": " ".join(rng.choices(words, k=4)),
                                 "output": " ".join(rng.choices(words, k=n))}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch
    import transformers

    from lora_scripts.cli import quiet_libraries
    from lora_scripts.config import build_config
    from lora_scripts.testing import make_tiny_tokenizer
    from lora_scripts.train.loop import Trainer

    quiet_libraries()
    tmp = Path(tempfile.mkdtemp())
    tok = make_tiny_tokenizer(tmp / "lm")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(tmp / "lm")
    make_dataset(tmp / "data.jsonl")

    results: dict[bool, list[float]] = {False: [], True: []}
    for rep in range(args.repeats):
        for packing in (False, True):
            cfg = build_config({
                "task": "text", "base_model": str(tmp / "lm"), "metadata_path": str(tmp / "data.jsonl"),
                "output_dir": str(tmp / f"out-{packing}-{rep}"), "lora_rank": 8, "batch_size": 8,
                "max_train_steps": args.steps, "save_steps": 0, "max_seq_length": 256, "packing": packing,
                "logging": {"tensorboard": False, "loss_csv": False},
            })
            trainer = Trainer(cfg, show_progress=False)
            result = trainer.run()
            # real tokens seen: every sample/row drawn in the run, counting only non-pad tokens
            plan = trainer.plan
            seen = 0
            for step in range(args.steps):
                epoch, k = divmod(step, plan.steps_per_epoch)
                for batch in plan.micro_batches(epoch, 0, start_step=k)[:1]:
                    items = [trainer.dataset[key] for key in batch]
                    seen += sum(len(item.input_ids) for item in items)
            results[packing].append(seen / result.extra["train_seconds"])

    base, packed = statistics.median(results[False]), statistics.median(results[True])
    print(f"{'mode':<12}{'tokens/s (median)':>20}{'runs':>8}")
    print(f"{'no packing':<12}{base:>20.0f}{len(results[False]):>8}")
    print(f"{'packing':<12}{packed:>20.0f}{len(results[True]):>8}")
    print(f"ratio packing / no packing: {packed / base:.2f}x  (time in training steps; model load excluded)")


if __name__ == "__main__":
    main()

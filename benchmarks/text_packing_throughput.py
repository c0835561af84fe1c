"""Tokens/s (real, non-pad tokens) of the text task: SFT unpacked (length-grouped), SFT packed (no mask tensor,
position ids restarting per sample), and DPO (chosen + rejected tokens, policy forward; the reference forward with
the adapter disabled is extra work not counted as tokens), on a variable-length dataset.

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


def make_dataset(path: Path, count: int = 320, seed: int = 0, pairs: bool = False) -> None:
    rng = random.Random(seed)
    words = "the cat sat on a warm mat while rain fell outside and a dog slept near the door".split()
    with open(path, "w") as fh:
        for _ in range(count):
            n = rng.choice([4, 8, 16, 32, 64])
            row = {"instruction": " ".join(rng.choices(words, k=4)), "output": " ".join(rng.choices(words, k=n))}
            if pairs:
                row = {"prompt": row["instruction"], "chosen": row["output"],
                       "rejected": " ".join(rng.choices(words, k=rng.choice([4, 8, 16, 32, 64])))}
            fh.write(json.dumps(row) + "\n")


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
    make_dataset(tmp / "pairs.jsonl", pairs=True)

    modes = {"sft unpacked": {"packing": False}, "sft packed": {"packing": True},
             "dpo": {"objective": "dpo", "metadata_path": str(tmp / "pairs.jsonl"), "batch_size": 4}}
    results: dict[str, list[float]] = {m: [] for m in modes}
    peaks: dict[str, list[float]] = {m: [] for m in modes}
    for rep in range(args.repeats):
        for mode, extra in modes.items():
            cfg = build_config({
                "task": "text", "base_model": str(tmp / "lm"), "metadata_path": str(tmp / "data.jsonl"),
                "output_dir": str(tmp / f"out-{mode}-{rep}".replace(" ", "-")), "lora_rank": 8, "batch_size": 8,
                "max_train_steps": args.steps, "save_steps": 0, "max_seq_length": 256,
                "logging": {"tensorboard": False, "loss_csv": False}, **extra,
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
                    seen += sum(len(t.input_ids) for item in items
                                for t in ((item.chosen, item.rejected) if hasattr(item, "chosen") else (item,)))
            results[mode].append(seen / result.extra["train_seconds"])
            peaks[mode].append(result.peak_memory_mb)

    base = statistics.median(results["sft unpacked"])
    print(f"{'mode':<14}{'tokens/s (median)':>20}{'vs unpacked':>13}{'peak MB':>10}{'runs':>6}")
    for mode in modes:
        rate = statistics.median(results[mode])
        print(f"{mode:<14}{rate:>20.0f}{rate / base:>12.2f}x{statistics.median(peaks[mode]):>10.0f}"
              f"{len(results[mode]):>6}")
    print("(real tokens per second of training steps; model load excluded; peak MB is the process's peak RSS)")


if __name__ == "__main__":
    main()

"""Real tokens per CPU-second and peak memory of the text task's batch layouts, side by side.

    PYTHONPATH=. python benchmarks/text_packing_throughput.py --threads 1 [--repeats 3] [--samples 64] [--epochs 2]

Data and model are text_speed.py's: chats whose lengths follow a clipped log-normal (30-1,500 tokens, median ~200),
a LLaMA-shaped model (hidden 128, 4 layers, GQA), ``max_seq_length`` 2048, ChatML. Configurations, each in its own
process (peak RSS from ``os.wait4``), alternated within every repeat, medians over repeats:

- ``unpacked``: the default: batches of ``--batch`` samples of similar length (``length_grouped_order``), padded.
- ``packed``: ``packing: true``: rows of 2048 tokens with position ids restarting per sample, attention per sample
  (``lora_scripts.tasks.packed_attention``, no L x L mask). Its batch is ``rows * batch / samples`` rows (at least 1),
  so both take about as many optimizer steps per epoch, each over about the same number of real tokens.
- ``packed-mask``: the same packed batches on transformers' own SDPA path (it derives a ``[B, 1, L, L]`` block mask
  from the position ids): what packing ran on before, kept as the reference for the change.
- ``dpo``: ``objective: dpo`` on pairs made from the same chats (the chosen answer and another chat's answer),
  ``--batch`` / 2 pairs per step; tokens = chosen + rejected tokens (the reference forward is extra work, not counted).

Real tokens are non-pad input tokens. "steady" is the last epoch (a whole pass), "end to end" all steps. Writes its
table into docs/BENCHMARKS.md (``--no-doc``: print only). Never run by the test suite.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed_common import (  # noqa: E402
    add_driver_args, command_line, emit, machine_info, memory_label, paired_ratio, prepare_driver, publish,
    rates, run_contenders, spread,
)
from text_speed import MODELS, make_chat_data, make_model  # noqa: E402

CONTENDERS = ["unpacked", "packed", "packed-mask", "dpo"]


def make_pairs(chats: Path, path: Path) -> None:
    """Preference pairs from the chats: the chat's own answer is chosen, the next chat's answer rejected."""
    rows = [json.loads(line)["messages"] for line in chats.read_text(encoding="utf-8").splitlines()]
    with open(path, "w", encoding="utf-8") as fh:
        for i, chat in enumerate(rows):
            fh.write(json.dumps({"prompt": chat[0]["content"], "chosen": chat[1]["content"],
                                 "rejected": rows[(i + 1) % len(rows)][1]["content"]}) + "\n")


def _config(spec: dict, name: str) -> dict:
    cfg = {"task": "text", "base_model": spec["model"], "metadata_path": spec["data"], "output_dir": spec["out"],
           "lora_rank": spec["rank"], "lora_alpha": spec["rank"], "batch_size": spec["batch"],
           "epochs": spec["epochs"], "learning_rate": 1e-4, "save_steps": 0, "max_seq_length": 2048,
           "chat_template": "chatml", "logging": {"tensorboard": False, "loss_csv": False}}
    if name.startswith("packed"):
        cfg.update(packing=True, batch_size=spec["packed_batch"])
    elif name == "dpo":
        cfg.update(objective="dpo", metadata_path=spec["pairs"], batch_size=max(1, spec["batch"] // 2))
    return cfg


def worker(name: str, spec: dict) -> dict:
    from lora_scripts.cli import quiet_libraries

    quiet_libraries()
    from lora_scripts.config import build_config
    from lora_scripts.train.loop import Trainer

    if name == "packed-mask":  # keep transformers' own SDPA (block mask from position ids) for the reference run
        import lora_scripts.tasks.packed_attention as packed_attention

        packed_attention.packed_attention_for = lambda *args: None
    trainer = Trainer(build_config(_config(spec, name)), show_progress=False)
    result = trainer.run()
    plan, per_step, computed = trainer.plan, [], 0
    for step in range(result.steps):
        epoch, k = divmod(step, plan.steps_per_epoch)
        items = [trainer.dataset[key] for key in plan.micro_batches(epoch, 0, start_step=k)[0]]
        per_step.append(sum(len(item.input_ids) if not hasattr(item, "chosen") else
                            len(item.chosen) + len(item.rejected) for item in items))
        computed += trainer.task.collate(items)["input_ids"].numel()  # padding included
    ends, start = result.extra["step_ends"], result.extra["loop_started"]
    steady, steady_cpu = rates(per_step, ends, start, len(ends) - plan.steps_per_epoch)
    e2e, e2e_cpu = rates(per_step, ends, start, 0)
    return {"steady_tok_s": steady, "steady_tok_cpu_s": steady_cpu, "e2e_tok_s": e2e, "e2e_tok_cpu_s": e2e_cpu,
            "steps": len(ends), "real_share": sum(per_step) / computed, "final_loss": result.final_loss,
            "attention": trainer.accelerator.unwrap_model(trainer.model).config._attn_implementation}


def packing_layout(spec: dict, batch: int) -> tuple[int, int, int, float]:
    """(samples, rows, rows per step, fill) of the packed data: rows per step = rows * batch / samples."""
    from lora_scripts.config import build_config
    from lora_scripts.tasks.text import TextTask

    task = TextTask(build_config(_config({**spec, "packed_batch": 1}, "packed")))
    task.check_data()
    rows = task.rows
    fill = sum(len(r.input_ids) for r in rows) / (2048 * len(rows))
    return len(task.samples), len(rows), max(1, round(len(rows) * batch / len(task.samples))), fill


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_driver_args(parser, CONTENDERS, batch=8)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    if args.worker:
        emit(worker(args.worker, json.loads(args.spec)))
        return
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the last one is the steady-state measurement)")
    if args.device != "cpu":
        parser.error("--device: this benchmark runs on CPU (on a GPU, packed runs use flash-attn when installed)")

    prepare_driver(args)
    shape = MODELS["small"]
    tmp = Path(tempfile.mkdtemp(prefix="text-packing-"))
    model = make_model(tmp / "lm", shape)
    make_chat_data(tmp / "chat.jsonl", args.samples)
    make_pairs(tmp / "chat.jsonl", tmp / "pairs.jsonl")
    spec = dict(model=str(model), data=str(tmp / "chat.jsonl"), pairs=str(tmp / "pairs.jsonl"), batch=args.batch,
                epochs=args.epochs, rank=args.rank, out=str(tmp / "probe"))
    samples, rows, spec["packed_batch"], fill = packing_layout(spec, args.batch)
    contenders = args.contenders.split(",")
    results = run_contenders(__file__, spec, tmp, contenders, args.repeats)
    table = ["| configuration | attention | steady real tokens/CPU-s | end-to-end real tokens/CPU-s | steady real "
             "tokens/s (wall) | real / computed tokens | peak memory MB | runs |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name in contenders:
        r = results[name]
        table.append(f"| {name} | `{r[0]['attention']}` | {spread([x['steady_tok_cpu_s'] for x in r], '{:.0f}')} | "
                     f"{spread([x['e2e_tok_cpu_s'] for x in r], '{:.0f}')} | "
                     f"{spread([x['steady_tok_s'] for x in r], '{:.0f}')} | {r[0]['real_share']:.0%} | "
                     f"{spread([x['peak_rss_mb'] for x in r], '{:.0f}')} | {len(r)} |")
    ratios = []
    if "unpacked" in results:
        for name in [c for c in contenders if c != "unpacked"]:
            cpu = spread(paired_ratio(results, name, "unpacked", "steady_tok_cpu_s"), "{:.2f}")
            mem = spread(paired_ratio(results, name, "unpacked", "peak_rss_mb"), "{:.2f}")
            ratios.append(f"- {name} / unpacked: real tokens per CPU-s (steady) **{cpu}×**, peak memory {mem}×")
    header = [
        "### Text batch layouts: packing vs length-grouped batches (cpu)",
        "",
        f"Command: `{command_line()}`  ",
        f"Machine: {machine_info('cpu')}  ",
        f"Model: LLaMA-shaped (hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, "
        f"{shape['num_attention_heads']} heads on {shape['num_key_value_heads']} KV heads, vocab "
        f"{shape['vocab_size']}), LoRA rank {args.rank} on q/k/v/o, fp32; {samples} chats (text_speed.py's "
        f"log-normal lengths), {args.epochs} epochs; unpacked batch {args.batch} samples; packed into {rows} rows of "
        f"2048 ({fill:.0%} filled), batch {spec['packed_batch']} row(s); DPO batch {max(1, args.batch // 2)} pairs. "
        f"Medians (min–max) of {args.repeats} runs each, steady state = the last epoch; memory: "
        f"{memory_label('cpu')} (model load and tokenization included).",
    ]
    publish("text-packing-cpu", header, table, ratios, args.no_doc)


if __name__ == "__main__":
    main()

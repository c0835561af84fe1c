"""Text-LoRA speed: our trainer vs HF ``Trainer`` + PEFT with dynamic padding, and vs a bare loop, side by side.

    PYTHONPATH=. python benchmarks/text_speed.py [--repeats 3] [--samples 64] [--epochs 2] [--device cpu|cuda]

Data: a chat dataset (``messages`` format, ChatML) whose sample lengths are drawn from a log-normal distribution
clipped to 30-1,500 tokens (median about 200, a long tail: the shape of real instruction / chat sets). Contenders,
each in its own process, alternated within every repeat:

- ``ours``: ``lora_scripts.train.loop.Trainer`` (what ``lora-scripts train`` runs) with default settings
  (no packing: batches of similar length).
- ``hf``: ``transformers.Trainer`` + ``peft.get_peft_model`` + ``DataCollatorForSeq2Seq`` (dynamic padding to the
  longest sample of each batch), default TrainingArguments (shuffled batches, no length grouping).
- ``bare``: plain forward / backward / ``optimizer.step`` over exactly our batches (same order and padding).

All see the same token ids and labels (tokenized once by our data code), the same LoRA (rank, alpha, attention
projections), batch, learning rate, clipping and precision. Real tokens are non-pad input tokens, counted the same way
for all. "steady" is the last epoch (a whole pass, so no contender gets a kinder subset of lengths); "end to end"
all epochs. ``--device cuda`` runs a ~1.1B-parameter LLaMA shape (TinyLlama's) in bf16. Writes its table into
docs/BENCHMARKS.md. Never run by the test suite.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed_common import (  # noqa: E402
    add_driver_args, bare_overhead_lines, clock, command_line, emit, machine_info, memory_label, paired_ratio,
    prepare_driver, publish, rate_table, rates, run_contenders, spread,
)

MODELS = {
    "small": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=4096),
    # TinyLlama-1.1B's shape (random weights): --device cuda
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
}
CONTENDERS = ["ours", "hf", "bare"]
WORDS = ("the cat sat on a warm mat while rain fell outside and a dog slept near the door the capital of italy is "
         "rome add the numbers two and three translate good morning explain why the sky looks blue").split()


def make_chat_data(path: Path, count: int, seed: int = 0) -> None:
    """Two-turn chats whose token lengths follow a clipped log-normal (30-1,500, median ~200)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(mean=np.log(200), sigma=0.8, size=count), 30, 1500).astype(int)
    with open(path, "w", encoding="utf-8") as fh:
        for n in lengths:
            words = max(4, int(n / 2))  # the tiny tokenizer spends about 2 tokens per word here
            prompt = " ".join(rng.choice(WORDS, size=max(2, words // 5)))
            answer = " ".join(rng.choice(WORDS, size=max(2, words - words // 5)))
            fh.write(json.dumps({"messages": [{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": answer}]}) + "\n")


def make_model(folder: Path, shape: dict) -> Path:
    import torch
    import transformers

    from lora_scripts.testing import make_tiny_tokenizer

    tok = make_tiny_tokenizer(folder)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **shape, max_position_embeddings=2048, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, tie_word_embeddings=False)).save_pretrained(folder)
    return folder


def _config(spec: dict) -> dict:
    return {"task": "text", "base_model": spec["model"], "metadata_path": spec["data"],
            "output_dir": spec["out"], "lora_rank": spec["rank"], "lora_alpha": spec["rank"],
            "batch_size": spec["batch"], "epochs": spec["epochs"], "learning_rate": 1e-4, "save_steps": 0,
            "max_seq_length": 2048, "chat_template": "chatml", "mixed_precision": spec["mixed_precision"],
            **spec.get("ours_extra", {})}


def _tokenized(spec: dict):
    """Our trainer's own tokenization of the data (so every contender sees the same ids and labels)."""
    from lora_scripts.config import build_config
    from lora_scripts.tasks.text import TextTask

    task = TextTask(build_config(_config(spec)))
    task.check_data()
    return task


def _rates(spec: dict, per_step: list[int], ends: list, start: tuple, steps_per_epoch: int, **more) -> dict:
    import torch

    steady, steady_cpu = rates(per_step, ends, start, len(ends) - steps_per_epoch)
    e2e, e2e_cpu = rates(per_step, ends, start, 0)
    res = {"steady_tok_s": steady, "steady_tok_cpu_s": steady_cpu, "e2e_tok_s": e2e, "e2e_tok_cpu_s": e2e_cpu,
           "steps": len(ends), "tokens": sum(per_step), **more}
    if spec["device"] == "cuda" and torch.cuda.is_available():
        res["peak_rss_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return res


def worker_ours(spec: dict) -> dict:
    from lora_scripts.cli import quiet_libraries

    quiet_libraries()
    from lora_scripts.config import build_config
    from lora_scripts.train.loop import Trainer

    trainer = Trainer(build_config(_config(spec)), show_progress=False)
    result = trainer.run()
    plan, per_step = trainer.plan, []
    for step in range(result.steps):
        epoch, k = divmod(step, plan.steps_per_epoch)
        keys = plan.micro_batches(epoch, 0, start_step=k)[0]
        per_step.append(sum(len(trainer.dataset[key]) for key in keys))
    return _rates(spec, per_step, result.extra["step_ends"], result.extra["loop_started"], plan.steps_per_epoch,
                  final_loss=result.final_loss)


def _load_lora_model(spec: dict, device, dtype):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype)
    model.to(device)
    lora = LoraConfig(r=spec["rank"], lora_alpha=spec["rank"], target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model, torch.device(device)


def worker_hf(spec: dict) -> dict:
    import torch
    import transformers
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    transformers.utils.logging.set_verbosity_error()
    task = _tokenized(spec)
    tokenizer = task.tokenizer
    rows = [{"input_ids": s.input_ids, "labels": s.labels, "attention_mask": [1] * len(s)} for s in task.samples]
    cuda = spec["device"] == "cuda"
    model, _ = _load_lora_model(spec, "cuda" if cuda else "cpu", torch.bfloat16 if cuda else torch.float32)
    counts: list[int] = []
    seq2seq = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)

    def collate(features):
        batch = seq2seq(features)
        counts.append(int(batch["attention_mask"].sum()))
        return batch

    ends: list = []
    start = [clock()]

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            start[0] = clock()

        def on_step_end(self, args, state, control, **kw):
            ends.append(clock())

    args = TrainingArguments(
        output_dir=spec["out"], per_device_train_batch_size=spec["batch"], num_train_epochs=spec["epochs"],
        learning_rate=1e-4, weight_decay=0.01, max_grad_norm=1.0, lr_scheduler_type="constant",
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=not cuda, bf16=cuda,
        remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True, seed=42,
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate, callbacks=[Clock()])
    out = trainer.train()
    steps_per_epoch = len(ends) // spec["epochs"]
    return _rates(spec, counts[:len(ends)], ends, start[0], steps_per_epoch, final_loss=out.training_loss)


def worker_bare(spec: dict) -> dict:
    import numpy as np
    import torch

    from lora_scripts.data.text import IGNORE_INDEX, collate_padded
    from lora_scripts.tasks.text import LENGTH_GROUP
    from lora_scripts.data.text import length_grouped_order

    task = _tokenized(spec)
    cuda = spec["device"] == "cuda"
    model, device = _load_lora_model(spec, "cuda" if cuda else "cpu", torch.bfloat16 if cuda else torch.float32)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=True if cuda else None)
    samples, batch, pad = task.samples, spec["batch"], task.tokenizer.pad_token_id
    lengths = [len(s) for s in samples]
    model.train()
    ends, per_step = [], []
    steps_per_epoch = len(samples) // batch
    start = clock()
    for epoch in range(spec["epochs"]):
        order = length_grouped_order(lengths, LENGTH_GROUP, np.random.default_rng([42, epoch]))
        for s in range(0, steps_per_epoch * batch, batch):
            b = collate_padded([samples[i] for i in order[s:s + batch]], pad)
            b = {k: v.to(device) for k, v in b.items()}
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
            labels = b["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                                     labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
            (loss / (labels != IGNORE_INDEX).sum()).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            ends.append(clock())
            per_step.append(int(b["attention_mask"].sum()))
            del logits, loss  # like our loop, which frees them when the loss function returns
    return _rates(spec, per_step, ends, start, steps_per_epoch)


def padding_efficiency(lengths: list[int], batch: int) -> tuple[float, float]:
    """Share of real tokens among the tokens computed (each batch padded to its longest sample): our length-grouped
    batches vs shuffled ones (the mean over 200 shuffles)."""
    import numpy as np

    from lora_scripts.data.text import length_grouped_order
    from lora_scripts.tasks.text import LENGTH_GROUP

    def share(order) -> float:
        rows = [[lengths[i] for i in order[s:s + batch]] for s in range(0, len(order) - batch + 1, batch)]
        return sum(map(sum, rows)) / sum(max(r) * len(r) for r in rows)

    grouped = share(length_grouped_order(lengths, LENGTH_GROUP, np.random.default_rng(0)))
    rng = np.random.default_rng(0)
    return grouped, float(np.mean([share(rng.permutation(len(lengths))) for _ in range(200)]))


WORKERS = {"ours": worker_ours, "hf": worker_hf, "bare": worker_bare}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_driver_args(parser, CONTENDERS, batch=8)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    if args.worker:
        emit(WORKERS[args.worker](json.loads(args.spec)))
        return
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the last one is the steady-state measurement)")

    extra = prepare_driver(args)
    shape = MODELS["1b" if args.device == "cuda" else "small"]
    mixed = "bf16" if args.device == "cuda" else "no"
    tmp = Path(tempfile.mkdtemp(prefix="text-speed-"))
    model = make_model(tmp / "lm", shape)
    make_chat_data(tmp / "chat.jsonl", args.samples)
    spec = dict(model=str(model), data=str(tmp / "chat.jsonl"), batch=args.batch, epochs=args.epochs, rank=args.rank,
                device=args.device, mixed_precision=mixed, ours_extra=extra, out=str(tmp / "probe"))
    lengths = sorted(len(s) for s in _tokenized(spec).samples)
    grouped, shuffled = padding_efficiency(lengths, args.batch)
    params = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(model).parameters())
    contenders = args.contenders.split(",")
    results = run_contenders(__file__, spec, tmp, contenders, args.repeats)
    rows = rate_table(results, contenders, "real tokens", "tok", "{:.0f}")
    ratios = []
    if "ours" in results and "hf" in results:
        for key, label in (("steady_tok_cpu_s", "steady, per CPU-s"), ("e2e_tok_cpu_s", "end to end, per CPU-s"),
                           ("steady_tok_s", "steady, wall clock")):
            ratios.append(f"- ours / HF Trainer + PEFT, real tokens/s ({label}): "
                          f"**{spread(paired_ratio(results, 'ours', 'hf', key), '{:.2f}')}×** (target ≥ 2.5×)")
    ratios += bare_overhead_lines(results, "tok", "real token")
    header = [
        f"### Text ({args.device})",
        "",
        f"Command: `{command_line()}`  ",
        f"Machine: {machine_info(args.device)}  ",
        f"Model: LLaMA-shaped, {params / 1e6:.1f} M parameters (hidden {shape['hidden_size']}, "
        f"{shape['num_hidden_layers']} layers, vocab {shape['vocab_size']}), sdpa attention; {args.samples} chats of "
        f"{lengths[0]}–{lengths[-1]} tokens (median {lengths[len(lengths) // 2]}, mean "
        f"{sum(lengths) / len(lengths):.0f}), {args.epochs} epochs, batch {args.batch}, LoRA rank {args.rank} on "
        f"q/k/v/o, precision {mixed}; medians (min–max) of {args.repeats} runs each, steady state = the last epoch; "
        f"memory: {memory_label(args.device)}. Real tokens / tokens computed (padding included): {grouped:.0%} in our length-grouped "
        f"batches, {shuffled:.0%} in shuffled batches (mean of 200 shuffles).",
    ]
    publish(f"text-{args.device}", header, rows, ratios, args.no_doc)


if __name__ == "__main__":
    main()

"""Preference data for ``objective: dpo | orpo | simpo | kto``: each record tokenized as prompt + completion with the
chat template (labels on the completion only), collated as ``[chosen..., rejected...]`` (or KTO's completions and
their mismatched KL pairs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import DataError
from .chat import IGNORE_INDEX, Tokenized, generation_prompt_ids, render_sequences, resolve_template
from .text import Record, TextStats, _pad, read_conversations, resolve_format


@dataclass
class PreferenceSample:
    """A chosen and a rejected completion of one prompt (KTO: one completion and whether it is desirable)."""

    chosen: Tokenized
    rejected: Tokenized | None
    prompt_len: int
    label: bool | None = None


def _completion(conv_turns, completion, tokenizer, template, tools, max_seq_length) -> tuple[Tokenized, int]:
    sample = render_sequences(conv_turns + completion, tokenizer, template, tools=tools,
                              max_seq_length=max_seq_length)[-1]
    prompt = generation_prompt_ids(conv_turns, tokenizer, template, tools)
    prompt_len = len(prompt)
    if sample.input_ids[:prompt_len] != prompt[:len(sample)]:
        raise DataError("the chat template renders the prompt differently once answered; preference training needs "
                        "the prompt to be a prefix of prompt + answer")
    labels = [IGNORE_INDEX] * min(prompt_len, len(sample)) + sample.labels[prompt_len:]
    if all(lab == IGNORE_INDEX for lab in labels):
        raise DataError(f"the completion is truncated away (the prompt has {prompt_len} tokens); raise "
                        "max_seq_length")
    return Tokenized(sample.input_ids, labels, sample.truncated), prompt_len


def tokenize_preferences(records: list[Record], tokenizer: Any, objective: str, *, data_format: str = "auto",
                         chat_template: str = "auto", max_seq_length: int = 2048, columns=None,
                         strict_fields: bool = False, template_variables: dict | None = None,
                         stop_ids: tuple[int, ...] = ()) -> tuple[list[PreferenceSample], TextStats]:
    """Check and tokenize preference records (TRL and LLaMA-Factory layouts); errors name ``file:line``."""
    fmt = resolve_format(records, data_format, columns)
    convs, warnings = read_conversations(records, fmt, columns, strict_fields)
    template = resolve_template(tokenizer, chat_template, stop_ids, template_variables)
    out, stats = [], TextStats(warnings=warnings)
    for rec, conv in convs:
        try:
            if objective == "kto":
                if conv.label is None:
                    raise DataError("objective kto needs kto_tag (or label): true for a desirable answer, false "
                                    "for an undesirable one")
                completion = conv.chosen if conv.chosen is not None else [conv.turns[-1]]
                prompt = conv.turns if conv.chosen is not None else conv.turns[:-1]
                tok, n = _completion(prompt, completion, tokenizer, template, conv.tools, max_seq_length)
                sample = PreferenceSample(tok, None, n, conv.label)
            else:
                if conv.chosen is None or conv.rejected is None:
                    raise DataError(f"objective {objective} needs chosen and rejected answers (TRL: prompt/chosen/"
                                    "rejected; LLaMA-Factory: ranking data with chosen/rejected)")
                chosen, n = _completion(conv.turns, conv.chosen, tokenizer, template, conv.tools, max_seq_length)
                rejected, _ = _completion(conv.turns, conv.rejected, tokenizer, template, conv.tools, max_seq_length)
                sample = PreferenceSample(chosen, rejected, n)
        except DataError as exc:
            raise DataError(f"{rec.where}: {exc}") from None
        for part in (sample.chosen, sample.rejected):
            if part is not None:
                stats.add(part)
        out.append(sample)
    return out, stats


def collate_preferences(samples: list[PreferenceSample], pad_id: int) -> dict[str, torch.Tensor]:
    """Pairs: rows ``[chosen_0..chosen_B-1, rejected_0..rejected_B-1]``. KTO: the completions, ``kto_label``, and
    ``kl_*`` rows pairing prompt i with completion i-1 (TRL's mismatched pairs for the KL estimate)."""
    if samples[0].rejected is not None:
        rows = [s.chosen for s in samples] + [s.rejected for s in samples]
        extra: dict[str, torch.Tensor] = {}
    else:
        rows = [s.chosen for s in samples]
        kl = []
        for i, s in enumerate(samples):
            other = samples[i - 1]
            ids = s.chosen.input_ids[: s.prompt_len] + other.chosen.input_ids[other.prompt_len:]
            kl.append(Tokenized(ids, [IGNORE_INDEX] * s.prompt_len + ids[s.prompt_len:]))
        length = max(len(t) for t in kl)
        extra = {"kto_label": torch.tensor([bool(s.label) for s in samples]),
                 "kl_input_ids": _pad([t.input_ids for t in kl], pad_id, length),
                 "kl_labels": _pad([t.labels for t in kl], IGNORE_INDEX, length),
                 "kl_attention_mask": _pad([[1] * len(t) for t in kl], 0, length)}
    length = max(len(t) for t in rows)
    return {"input_ids": _pad([t.input_ids for t in rows], pad_id, length),
            "labels": _pad([t.labels for t in rows], IGNORE_INDEX, length),
            "attention_mask": _pad([[1] * len(t) for t in rows], 0, length), **extra}

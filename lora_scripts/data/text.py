"""Text data for causal-LM LoRA (LLaMA/Qwen/GLM): read, check, render chat templates, tokenize, pack, collate.

Pipeline: ``load_text_dataset`` -> ``tokenize_dataset`` (format detection and every field read: :mod:`.formats`;
template-exact ids and labels: :mod:`.chat`; truncation) -> ``pack`` + ``collate_flat`` (no mask tensor), or
``length_grouped_order`` + ``collate_padded``. Preference data: :mod:`.preference`.
Every data error names ``file:line`` so one bad record in a million-line file can be found.
"""

from __future__ import annotations

import bisect
import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError
from . import formats
from .chat import (  # noqa: F401 - re-exported: the text task's data API lives here
    CHAT_TEMPLATES,
    IGNORE_INDEX,
    Template,
    Tokenized,
    Turn,
    bos_ids,
    render_sequences,
    resolve_template,
)
from .formats import DATA_FORMATS, ColumnMap, Conversation, apply_columns, read_record
from .images import check_data_dir, read_text_file

SUPPORTED_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet", ".txt")
_WS = re.compile(r"\s*")

@dataclass(frozen=True)
class Record:
    """One raw sample and where it came from: ``line`` is 1-based (the row number for parquet)."""

    source: Path
    line: int
    data: dict[str, Any]

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


def load_records(path: Path) -> list[Record]:
    """Read one data file. ``.txt``: each non-empty line is one ``{"text": line}`` sample (use ``.jsonl`` with a
    ``text`` field for multi-line documents). ``.csv``: header row; a record's line is the line its row ends on."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in SUPPORTED_EXTENSIONS:
        raise DataError(f"{path}: unsupported file type {ext!r}; supported: {', '.join(SUPPORTED_EXTENSIONS)}")
    if not path.exists():
        raise DataError(f"data file not found: {path} (check the path in the config)")
    if ext == ".parquet":
        return _load_parquet(path)
    text = read_text_file(path, "data file").replace("\r\n", "\n").replace("\r", "\n")  # universal newlines
    lines = text.split("\n")  # not splitlines(): JSON strings may hold U+2028 and other line separators
    if ext == ".jsonl":
        return [Record(path, n, _json(path, n, line, dict)) for n, line in enumerate(lines, 1) if line.strip()]
    if ext == ".json":
        return _load_json_list(path, text)
    if ext == ".csv":
        reader, records = csv.DictReader(io.StringIO(text)), []
        try:
            for row in reader:
                if None in row:  # DictReader files surplus cells under the key None
                    raise DataError(f"{path}:{reader.line_num}: more cells than header columns {reader.fieldnames}; "
                                    "quote cells that hold commas")
                records.append(Record(path, reader.line_num, row))
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}: malformed CSV ({exc}); quote cells that hold commas, quotes "
                            "or line breaks") from None
        return records
    return [Record(path, n, {"text": line.rstrip("\r")}) for n, line in enumerate(lines, 1) if line.strip()]


def _json(path: Path, line: int, text: str, kind: type) -> Any:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{line}: invalid JSON ({exc.msg} at column {exc.colno}); fix the syntax or remove "
                        "the line") from None
    except (ValueError, RecursionError) as exc:  # e.g. an integer over Python's digit limit, or absurd nesting
        raise DataError(f"{path}:{line}: invalid JSON ({str(exc)[:80]}); fix the value there") from None
    if not isinstance(value, kind):
        want, shape = ("object", "one {...} object per line") if kind is dict else ("list", "a JSON list [...]")
        raise DataError(f"{path}:{line}: expected a JSON {want}, got {type(value).__name__}; write {shape}")
    return value


def _load_json_list(path: Path, text: str) -> list[Record]:
    # Decode item by item (not one json.loads) so every record keeps the line it starts on.
    decoder, records, line, counted = json.JSONDecoder(), [], 1, 0
    pos = _WS.match(text).end()
    if not text.startswith("[", pos):
        raise DataError(f"{path}: a .json file must hold a list of objects (use .jsonl for one object per line)")
    pos = _WS.match(text, pos + 1).end()
    while not text.startswith("]", pos):
        line, counted = line + text.count("\n", counted, pos), pos  # counted incrementally: big files stay linear
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno}); fix the syntax "
                            "there") from None
        except (ValueError, RecursionError) as exc:
            raise DataError(f"{path}:{line}: invalid JSON ({str(exc)[:80]}); fix the value there") from None
        if not isinstance(value, dict):
            raise DataError(f"{path}:{line}: expected a JSON object, got {type(value).__name__}; the list must "
                            "hold {...} objects")
        records.append(Record(path, line, value))
        pos = _WS.match(text, end).end()
        if text.startswith(",", pos):
            pos = _WS.match(text, pos + 1).end()
        elif not text.startswith("]", pos):
            raise DataError(f"{path}:{line + text.count(chr(10), counted, pos)}: invalid JSON (expected ',' or "
                            "']'); separate the objects with commas")
    return records


def _load_parquet(path: Path) -> list[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading .parquet needs pyarrow; run `pip install pyarrow`") from None
    try:
        return [Record(path, n, row) for n, row in enumerate(pq.read_table(path).to_pylist(), 1)]
    except (OSError, ValueError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"{path}: cannot read parquet ({reason}); re-write it with pandas or pyarrow") from None


def load_text_dataset(train_data_dir: Path | None, metadata_path: Path | None) -> list[Record]:
    """Load ``metadata_path`` if given, else every supported file directly inside ``train_data_dir`` (sorted)."""
    if metadata_path is not None:
        files = [Path(metadata_path)]
    elif train_data_dir is not None:
        folder = Path(train_data_dir)
        check_data_dir(folder)
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SUPPORTED_EXTENSIONS)
        if not files:
            raise DataError(f"{folder}: no data files; expected one of {', '.join(SUPPORTED_EXTENSIONS)}")
    else:
        raise DataError("no training data: set train_data_dir or metadata_path")
    records = [r for f in files for r in load_records(f)]
    if not records:
        raise DataError(f"no samples found in {', '.join(map(str, files))}")
    return records


def detect_format(record: Record) -> str:
    """Name the format a record's fields imply: alpaca, sharegpt, messages, text or preference."""
    return formats.detect_format(record.data, record.where)


def resolve_format(records: list[Record], data_format: str = "auto", columns: ColumnMap | None = None) -> str:
    """Resolve ``auto`` from the first record's fields and require every record to match it."""
    if not records:
        raise DataError("no samples to train on")
    if data_format not in DATA_FORMATS:
        raise DataError(f"unknown data_format {data_format!r}; choose one of {', '.join(DATA_FORMATS)}")
    if data_format != "auto":
        return data_format
    fmt = formats.detect_format(apply_columns(records[0].data, columns), records[0].where)
    for rec in records[1:]:
        if (other := formats.detect_format(apply_columns(rec.data, columns), rec.where)) != fmt:
            raise DataError(f"{rec.where}: record looks like {other} but the first record ({records[0].where}) is "
                            f"{fmt}; all records must use one format")
    return fmt


def normalize_record(record: Record, fmt: str, columns: ColumnMap | None = None) -> list[Turn]:
    """Turn a record into ``[{"role", "content", ...}]`` and check it (the text format gives one ``text`` turn)."""
    return read_record(record.data, fmt, record.where, columns).turns


def render_conversation(turns: list[Turn], tokenizer: Any, chat_template: str = "auto", train_on_prompt: bool = False,
                        max_seq_length: int = 2048, *, tools: list | None = None,
                        template: Template | None = None) -> Tokenized:
    """Tokenize one conversation as one sequence (see :mod:`.chat`); a ``text`` turn is BOS + text + EOS, all
    trained. Templates that rewrite history (Qwen3) need :func:`render_samples`, which may give several."""
    out = render_samples(turns, tokenizer, chat_template, train_on_prompt, max_seq_length, tools=tools,
                         template=template)
    if len(out) != 1:
        raise DataError("the chat template rewrites earlier turns, so this conversation trains as one sequence per "
                        "assistant turn; use render_samples")
    return out[0]


def render_samples(turns: list[Turn], tokenizer: Any, chat_template: str = "auto", train_on_prompt: bool = False,
                   max_seq_length: int = 2048, *, tools: list | None = None,
                   template: Template | None = None) -> list[Tokenized]:
    """Tokenize one conversation into one or more training sequences with their label masks."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos_token; set one so the model can learn where answers end")
    if turns and turns[0]["role"] == "text":
        ids = bos_ids(tokenizer) + tokenizer(turns[0]["content"], add_special_tokens=False)["input_ids"] + [eos]
        return [Tokenized(ids[:max_seq_length], ids[:max_seq_length], len(ids) > max_seq_length)]
    template = template or resolve_template(tokenizer, chat_template)
    return render_sequences(turns, tokenizer, template, tools=tools, train_on_prompt=train_on_prompt,
                            max_seq_length=max_seq_length)


@dataclass
class TextStats:
    """What tokenization produced, for the run report."""

    samples: int = 0
    truncated: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    warnings: list[str] = field(default_factory=list)

    def add(self, sample: Tokenized) -> None:
        self.samples += 1
        self.truncated += sample.truncated
        self.tokens += len(sample.input_ids)
        self.trained_tokens += sum(label != IGNORE_INDEX for label in sample.labels)

    def summary(self) -> str:
        return (f"{self.samples} samples, {self.tokens} tokens ({self.trained_tokens} trained), "
                f"{self.truncated} truncated")


def read_conversations(records: list[Record], fmt: str, columns: ColumnMap | None = None,
                       strict_fields: bool = False) -> tuple[list[tuple[Record, Conversation]], list[str]]:
    """Read every record; fields we do not know are one warning each (first record named), or with
    ``strict_fields`` an error."""
    out, unknown = [], {}
    for rec in records:
        conv = read_record(rec.data, fmt, rec.where, columns)
        for name in conv.unknown:
            if strict_fields:
                raise DataError(f"{rec.where}: unknown field {name!r} (strict_fields is on); remove it or set "
                                "strict_fields: false to ignore it")
            unknown.setdefault(name, [rec.where, 0])[1] += 1
        out.append((rec, conv))
    warnings = [f"{where}: unknown field {name!r} ignored (in {count} record{'s' * (count > 1)}); remove it, or "
                "set strict_fields: true to make this an error" for name, (where, count) in unknown.items()]
    return out, warnings


def check_tools_supported(template: Template, tokenizer: Any, conv: Conversation) -> None:
    """Refuse tools that the template would silently drop (it renders the same text with and without them)."""
    from .chat import render_text

    if conv.tools and render_text(template, tokenizer, conv.turns, False, conv.tools) == render_text(
            template, tokenizer, conv.turns, False, None):
        raise DataError(f"the record has tools but chat_template {template.name!r} does not render them; use the "
                        "model's own template (one with tools support)")


def tokenize_dataset(records: list[Record], tokenizer: Any, *, data_format: str = "auto", chat_template: str = "auto",
                     train_on_prompt: bool = False, max_seq_length: int = 2048, columns: ColumnMap | None = None,
                     strict_fields: bool = False, template_variables: dict[str, Any] | None = None,
                     stop_ids: tuple[int, ...] = ()) -> tuple[list[Tokenized], TextStats]:
    """Check, normalise and tokenize every record for SFT; every error starts with the record's ``file:line``.
    A conversation whose template rewrites history gives one sample per assistant turn."""
    fmt = resolve_format(records, data_format, columns)
    convs, warnings = read_conversations(records, fmt, columns, strict_fields)
    out, stats = [], TextStats(warnings=warnings)
    template = None
    for rec, conv in convs:
        try:
            if conv.chosen is not None:
                raise DataError("preference record (chosen/rejected or completion/label) in an SFT run; set "
                                "objective: dpo, orpo, simpo or kto")
            if conv.label is False:
                raise DataError("kto_tag is false (an undesirable answer): SFT would train it as a good one; drop "
                                "the record or set objective: kto")
            if conv.turns[0]["role"] != "text":
                template = template or resolve_template(tokenizer, chat_template, stop_ids, template_variables)
                check_tools_supported(template, tokenizer, conv)
            samples = render_samples(conv.turns, tokenizer, chat_template, train_on_prompt, max_seq_length,
                                     tools=conv.tools, template=template)
        except DataError as exc:
            raise DataError(f"{rec.where}: {exc}") from None
        for sample in samples:
            stats.add(sample)
            out.append(sample)
    return out, stats


@dataclass
class PackedRow:
    """Samples concatenated; ``position_ids`` restart at 0 for each, ``seq_lens`` are their lengths."""

    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)
    seq_lens: list[int] = field(default_factory=list)


def pack(samples: list[Tokenized], max_seq_length: int) -> list[PackedRow]:
    """Best-fit packing: each sample goes into the open row with the least room that still fits it.

    Each sample's first label is masked: in a row the loss shift would make the previous sample's last token predict
    it. Alone that label is never used either, so every sample's loss is unchanged by packing.
    """
    rows: list[PackedRow] = []
    free: list[tuple[int, int]] = []  # sorted (room left, row index)
    for s in samples:
        if (n := len(s.input_ids)) > max_seq_length:
            raise ValueError(f"sample of {n} tokens exceeds max_seq_length {max_seq_length}; truncate first")
        if n == 0:
            continue
        i = bisect.bisect_left(free, (n, -1))
        room, r = free.pop(i) if i < len(free) else (max_seq_length, len(rows))
        if r == len(rows):
            rows.append(PackedRow())
        rows[r].input_ids += s.input_ids
        rows[r].labels += [IGNORE_INDEX] + s.labels[1:]
        rows[r].position_ids += range(n)
        rows[r].seq_lens.append(n)
        bisect.insort(free, (room - n, r))
    return rows


def _pad(rows: list[list[int]], value: int, length: int) -> torch.Tensor:
    return torch.tensor([row + [value] * (length - len(row)) for row in rows], dtype=torch.long)


def collate_flat(rows: list[PackedRow], pad_id: int, flatten: bool = False) -> dict[str, torch.Tensor]:
    """Packed rows without any mask tensor: ``position_ids`` restarting at 0 per sample are what tells the model
    where samples start. Per-sample attention follows from them when no ``attention_mask`` and no KV cache are
    passed (the task runs with ``use_cache=False``): :mod:`lora_scripts.tasks.packed_attention` on CPU,
    flash-attn varlen on a GPU that has it. Pads: label -100, positions 0, 1, 2... so a row's padding is one
    sequence of its own after the last sample (no sample attends to it).

    ``flatten``: all rows as one ``[1, N]`` row without any padding (TRL's padding-free layout). transformers'
    flash-attn path reads samples from position ids only in a batch of one row; a longer batch would attend
    across the samples of each row. No label is lost: every sample's first label is already masked (:func:`pack`).
    """
    if flatten:
        return {key: torch.tensor([[v for r in rows for v in getattr(r, key)]], dtype=torch.long)
                for key in ("input_ids", "labels", "position_ids")}
    length = max(len(r.input_ids) for r in rows)
    return {"input_ids": _pad([r.input_ids for r in rows], pad_id, length),
            "labels": _pad([r.labels for r in rows], IGNORE_INDEX, length),
            "position_ids": torch.tensor([r.position_ids + list(range(length - len(r.position_ids))) for r in rows],
                                         dtype=torch.long)}


def collate_padded(samples: list[Tokenized], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad unpacked samples: pads get label -100 and ``attention_mask`` 0 (2-D ``[B, L]``)."""
    length = max(len(s.input_ids) for s in samples)
    return {"input_ids": _pad([s.input_ids for s in samples], pad_id, length),
            "labels": _pad([s.labels for s in samples], IGNORE_INDEX, length),
            "attention_mask": _pad([[1] * len(s.input_ids) for s in samples], 0, length)}


def length_grouped_order(lengths: list[int], batch_size: int, rng: np.random.Generator) -> list[int]:
    """Sample order that batches similar lengths (less padding) yet stays random.

    Shuffle all indices, cut them into mega-batches of ``batch_size * 50`` and sort each by length, longest first
    (like transformers' LengthGroupedSampler), so consecutive ``batch_size`` slices hold similar lengths.
    """
    order, mega = rng.permutation(len(lengths)).tolist(), max(1, batch_size * 50)
    return [i for s in range(0, len(order), mega) for i in sorted(order[s:s + mega], key=lambda i: -lengths[i])]

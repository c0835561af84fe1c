"""Text data for causal-LM LoRA (LLaMA/Qwen/GLM): read, check, render chat templates, tokenize, pack, collate.

Pipeline: ``load_text_dataset`` -> ``tokenize_dataset`` (format detection, normalisation to turns, chat template,
label mask, truncation) -> ``pack`` + ``collate_packed``, or ``length_grouped_order`` + ``collate_padded``.
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
from .images import check_data_dir, read_text_file

SUPPORTED_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet", ".txt")
DATA_FORMATS = ("auto", "alpaca", "sharegpt", "messages", "text")
CHAT_TEMPLATES = ("auto", "tokenizer", "chatml", "llama3", "alpaca")
IGNORE_INDEX = -100  # label value the cross-entropy loss skips
_FORMAT_HELP = "alpaca (instruction, input, output), sharegpt (conversations), messages (messages), text (text)"
_DETECT = (("messages", "messages"), ("conversations", "sharegpt"), ("instruction", "alpaca"), ("text", "text"))
_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_WS = re.compile(r"\s*")

Turn = dict[str, str]  # {"role": "system"|"user"|"assistant"|"text", "content": str}
Segments = list[tuple[Any, bool]]  # (text or token ids, trained)


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
    """Name the format a record's fields imply: alpaca, sharegpt, messages or text."""
    for key, fmt in _DETECT:
        if key in record.data:
            return fmt
    raise DataError(f"{record.where}: cannot detect the data format from fields {sorted(record.data)}; "
                    f"supported: {_FORMAT_HELP}")


def resolve_format(records: list[Record], data_format: str = "auto") -> str:
    """Resolve ``auto`` from the first record's fields and require every record to match it."""
    if not records:
        raise DataError("no samples to train on")
    if data_format not in DATA_FORMATS:
        raise DataError(f"unknown data_format {data_format!r}; choose one of {', '.join(DATA_FORMATS)}")
    if data_format != "auto":
        return data_format
    fmt = detect_format(records[0])
    for rec in records[1:]:
        if (other := detect_format(rec)) != fmt:
            raise DataError(f"{rec.where}: record looks like {other} but the first record ({records[0].where}) is "
                            f"{fmt}; all records must use one format")
    return fmt


def _field(record: Record, name: str, required: bool = True, kind: type = str) -> Any:
    value = record.data.get(name)
    if value is None or (isinstance(value, float) and value != value):  # NaN: an empty parquet cell
        if required:
            raise DataError(f"{record.where}: missing field {name!r} (fields found: {sorted(record.data)}); add it")
        return None
    if not isinstance(value, kind):
        raise DataError(f"{record.where}: field {name!r} must be a string, got {type(value).__name__} "
                        f"({value!r:.40}); write it in double quotes")
    return value


def normalize_record(record: Record, fmt: str) -> list[Turn]:
    """Turn a record into ``[{"role", "content"}]`` and check it (the text format gives one ``text`` turn)."""
    if fmt == "text":
        if not (text := _field(record, "text")).strip():
            raise DataError(f"{record.where}: empty 'text'; write the sample or remove the line")
        return [{"role": "text", "content": text}]
    if fmt == "alpaca":
        prompt = _field(record, "instruction")
        if extra := _field(record, "input", required=False):  # appended to the instruction, as Alpaca does
            prompt += "\n\n" + extra
        turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": _field(record, "output")}]
        if system := _field(record, "system", required=False):
            turns.insert(0, {"role": "system", "content": system})
        return turns
    key, role_key, content_key = {"sharegpt": ("conversations", "from", "value"),
                                  "messages": ("messages", "role", "content")}[fmt]
    raw = _field(record, key, kind=object)
    if isinstance(raw, str) and raw.lstrip().startswith("["):  # a CSV cell holds the list as a JSON string
        raw = _json(record.source, record.line, raw, list)
    if not isinstance(raw, list):
        raise DataError(f"{record.where}: {key!r} must be a list of {{{role_key}, {content_key}}} objects, got "
                        f"{type(raw).__name__}; write [{{\"{role_key}\": ..., \"{content_key}\": ...}}, ...]")
    roles, turns = _SHAREGPT_ROLES if fmt == "sharegpt" else _ROLES, []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or role_key not in item or content_key not in item:
            found = sorted(item) if isinstance(item, dict) else type(item).__name__
            raise DataError(f"{record.where}: {key}[{i}] needs fields {role_key!r} and {content_key!r}, found {found}; "
                            "add them")
        if (role := roles.get(item[role_key]) if isinstance(item[role_key], str) else None) is None:
            raise DataError(f"{record.where}: {key}[{i}] has unsupported {role_key} {item[role_key]!r}; "
                            f"use {', '.join(roles)}")
        if not isinstance(item[content_key], str):
            raise DataError(f"{record.where}: {key}[{i}].{content_key} must be a string; write it in double quotes")
        turns.append({"role": role, "content": item[content_key]})
    body = turns[1:] if turns and turns[0]["role"] == "system" else turns
    if not body:
        raise DataError(f"{record.where}: empty conversation in {key!r} (needs a user and an assistant turn)")
    for i, turn in enumerate(body):
        if turn["role"] != (expected := "user" if i % 2 == 0 else "assistant"):
            raise DataError(f"{record.where}: {key}[{i + len(turns) - len(body)}] is {turn['role']!r} where "
                            f"{expected!r} was expected; turns alternate user/assistant after an optional system turn")
    if body[-1]["role"] != "assistant":
        raise DataError(f"{record.where}: conversation in {key!r} must end with an assistant turn; add the answer "
                        "or drop the last turn")
    return turns


@dataclass
class Tokenized:
    """One tokenized sample; ``labels`` is ``IGNORE_INDEX`` where the token is not trained."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


# Built-in templates: (system, user, assistant header [masked], assistant end [trained], separator after an
# assistant turn [masked], start of text [None = the tokenizer's BOS if it adds one], tokens that must exist).
_BUILTINS = {
    "chatml": ("<|im_start|>system\n{}<|im_end|>\n", "<|im_start|>user\n{}<|im_end|>\n", "<|im_start|>assistant\n",
               "<|im_end|>", "\n", "", ("<|im_start|>", "<|im_end|>")),
    "llama3": ("<|start_header_id|>system<|end_header_id|>\n\n{}<|eot_id|>",
               "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>",
               "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>", "", "<|begin_of_text|>",
               ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    "alpaca": ("{}\n\n", "### Instruction:\n{}\n\n", "### Response:\n", "", "\n\n", None, ()),
}


def _bos_ids(tokenizer: Any) -> list[int]:
    """``[bos]`` if the tokenizer adds a BOS when encoding with special tokens (LLaMA does, Qwen does not)."""
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and tokenizer("x", add_special_tokens=True)["input_ids"][:1] == [bos] else []


def _builtin_segments(turns: list[Turn], tokenizer: Any, name: str) -> Segments:
    system, user, header, end, sep, prefix, markers = _BUILTINS[name]
    for marker in markers:
        if tokenizer.convert_tokens_to_ids(marker) in (None, tokenizer.unk_token_id):
            raise DataError(f"chat_template {name!r} needs the special token {marker!r}, which this tokenizer lacks; "
                            "use chat_template: auto (the tokenizer's own) or one matching the model")
    segments: Segments = [(_bos_ids(tokenizer) if prefix is None else prefix, False)]
    for i, turn in enumerate(turns):
        if turn["role"] == "assistant":
            segments += [(header, False), (turn["content"] + end, True), (sep if i + 1 < len(turns) else "", False)]
        else:
            segments.append(((system if turn["role"] == "system" else user).format(turn["content"]), False))
    return segments


def _jinja_segments(turns: list[Turn], tokenizer: Any, template: str | None) -> Segments:
    # A Jinja template renders whole conversations, so assistant spans are found by rendering growing prefixes with
    # apply_chat_template(tokenize=False): render(turns[:k], add_generation_prompt=True) ends where assistant turn k
    # starts and render(turns[:k+1]) where it ends; the differences are the masked and the trained text. Whitespace
    # after the end-of-turn marker moves to the next masked span. Templates that rewrite earlier turns (e.g. drop
    # past reasoning) make a prefix differ and are refused.
    def render(part: list[Turn], gen: bool) -> str:
        try:
            return tokenizer.apply_chat_template(part, chat_template=template, tokenize=False,
                                                 add_generation_prompt=gen)
        except Exception as exc:  # noqa: BLE001 - templates raise arbitrary Jinja exceptions
            raise DataError(f"the chat template failed on this conversation ({exc})") from None

    segments: Segments = []
    done = ""
    for k in (k for k, turn in enumerate(turns) if turn["role"] == "assistant"):
        prompt, full = render(turns[:k], True), render(turns[: k + 1], False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise DataError("the chat template does not render conversations incrementally (it changes earlier "
                            "turns), so assistant tokens cannot be located; set chat_template to chatml or llama3")
        answer = full[len(prompt):].rstrip()
        segments += [(prompt[len(done):], False), (answer, True)]
        done = prompt + answer
    return segments


def render_conversation(turns: list[Turn], tokenizer: Any, chat_template: str = "auto", train_on_prompt: bool = False,
                        max_seq_length: int = 2048) -> Tokenized:
    """Tokenize one normalised sample with its label mask, truncated to ``max_seq_length`` (flagged).

    Prompt (masked) and assistant (trained) text are tokenized separately, without special tokens added, and
    concatenated, so the mask is exact at every edge. Every assistant turn ends with the tokenizer's EOS, which is
    trained, so the model learns to stop. ``chat_template``: ``auto`` (the tokenizer's Jinja template, else
    chatml), ``tokenizer``, ``chatml``, ``llama3``, ``alpaca`` or a Jinja string. A ``text`` turn: BOS + text + EOS.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos_token; set one so the model can learn where answers end")
    if turns and turns[0]["role"] == "text":
        ids = _bos_ids(tokenizer) + tokenizer(turns[0]["content"], add_special_tokens=False)["input_ids"] + [eos]
        return Tokenized(ids[:max_seq_length], ids[:max_seq_length], len(ids) > max_seq_length)
    own = getattr(tokenizer, "chat_template", None)
    if chat_template == "tokenizer" and not own:
        raise DataError("chat_template is 'tokenizer' but the tokenizer has no chat_template; use chatml or llama3")
    if chat_template in ("auto", "tokenizer") and own:
        segments = _jinja_segments(turns, tokenizer, None)
    elif chat_template == "auto" or chat_template in _BUILTINS:
        segments = _builtin_segments(turns, tokenizer, "chatml" if chat_template == "auto" else chat_template)
    elif "{%" in chat_template or "{{" in chat_template:
        segments = _jinja_segments(turns, tokenizer, chat_template)
    else:
        raise DataError(f"unknown chat_template {chat_template!r}; choose one of {', '.join(CHAT_TEMPLATES)}")
    ids: list[int] = []
    labels: list[int] = []
    for piece, trained in segments:
        toks = list(piece) if isinstance(piece, list) else tokenizer(piece, add_special_tokens=False)["input_ids"]
        if trained and toks[-1:] != [eos]:
            toks.append(eos)
        ids += toks
        labels += toks if trained or train_on_prompt else [IGNORE_INDEX] * len(toks)
    return Tokenized(ids[:max_seq_length], labels[:max_seq_length], len(ids) > max_seq_length)


@dataclass
class TextStats:
    """What tokenization produced, for the run report."""

    samples: int = 0
    truncated: int = 0
    tokens: int = 0
    trained_tokens: int = 0

    def add(self, sample: Tokenized) -> None:
        self.samples += 1
        self.truncated += sample.truncated
        self.tokens += len(sample.input_ids)
        self.trained_tokens += sum(label != IGNORE_INDEX for label in sample.labels)

    def summary(self) -> str:
        return (f"{self.samples} samples, {self.tokens} tokens ({self.trained_tokens} trained), "
                f"{self.truncated} truncated")


def tokenize_dataset(records: list[Record], tokenizer: Any, *, data_format: str = "auto", chat_template: str = "auto",
                     train_on_prompt: bool = False, max_seq_length: int = 2048) -> tuple[list[Tokenized], TextStats]:
    """Check, normalise and tokenize every record; every error starts with the record's ``file:line``."""
    fmt = resolve_format(records, data_format)
    out, stats = [], TextStats()
    for rec in records:
        turns = normalize_record(rec, fmt)
        try:
            sample = render_conversation(turns, tokenizer, chat_template, train_on_prompt, max_seq_length)
        except DataError as exc:
            raise DataError(f"{rec.where}: {exc}") from None
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


def packed_attention_mask(seq_lens: list[int], total_len: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Block-diagonal causal mask ``[1, 1, L, L]``, additive: 0 where attention is allowed, dtype-min elsewhere.

    transformers 5.23 (masking_utils._preprocess_mask_arguments) passes a 4-D mask through unchanged and eager
    attention *adds* it to the scores, so it must be additive float in the model's dtype (a bool mask would be
    added as 0/1); sdpa takes the same float mask. Positions past ``sum(seq_lens)`` (padding) see only themselves.
    """
    dtype = dtype or torch.float32
    if (used := sum(seq_lens)) > total_len:
        raise ValueError(f"seq_lens sum to {used}, more than total_len {total_len}")
    samples = torch.repeat_interleave(torch.arange(len(seq_lens)), torch.tensor(seq_lens, dtype=torch.long))
    seq_ids = torch.cat([samples, len(seq_lens) + torch.arange(total_len - used)])  # each pad: its own sequence
    pos = torch.arange(total_len)
    allowed = (seq_ids[:, None] == seq_ids[None, :]) & (pos[None, :] <= pos[:, None])
    return torch.zeros(total_len, total_len, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


def _pad(rows: list[list[int]], value: int, length: int) -> torch.Tensor:
    return torch.tensor([row + [value] * (length - len(row)) for row in rows], dtype=torch.long)


def collate_packed(rows: list[PackedRow], pad_id: int, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Right-pad packed rows (pads: label -100, position 0); ``attention_mask`` is 4-D ``[B, 1, L, L]`` in ``dtype``
    (pass the model's compute dtype)."""
    length = max(len(r.input_ids) for r in rows)
    return {"input_ids": _pad([r.input_ids for r in rows], pad_id, length),
            "labels": _pad([r.labels for r in rows], IGNORE_INDEX, length),
            "position_ids": _pad([r.position_ids for r in rows], 0, length),
            "attention_mask": torch.cat([packed_attention_mask(r.seq_lens, length, dtype) for r in rows])}


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

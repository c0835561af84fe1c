"""Text data for causal-LM LoRA (LLaMA/Qwen/GLM): read, check, render chat templates, tokenize, pack, collate.

Pipeline: ``load_text_dataset`` -> ``tokenize_dataset`` (format detection, normalisation to turns, chat template,
label mask, truncation) -> either ``pack`` + ``collate_packed`` or ``length_grouped_order`` + ``collate_padded``.
Every data error names ``file:line`` so a bad record in a million-line file can be found.
"""

from __future__ import annotations

import bisect
import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DataError

if TYPE_CHECKING:
    import torch

SUPPORTED_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet", ".txt")
DATA_FORMATS = ("auto", "alpaca", "sharegpt", "messages", "text")
CHAT_TEMPLATES = ("auto", "tokenizer", "chatml", "llama3", "alpaca")
IGNORE_INDEX = -100  # label value the cross-entropy loss skips
_FORMAT_HELP = "alpaca (instruction, input, output), sharegpt (conversations), messages (messages), text (text)"
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

Turn = dict[str, str]  # {"role": "system"|"user"|"assistant"|"text", "content": str}


@dataclass(frozen=True)
class Record:
    """One raw sample and where it came from. ``line`` is the 1-based line (the row number for parquet)."""

    source: Path
    line: int
    data: dict[str, Any]

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


# ---------------------------------------------------------------- reading files


def load_records(path: Path) -> list[Record]:
    """Read one data file. ``.txt``: every non-empty line is one ``{"text": line}`` sample (write a ``.jsonl`` with
    a ``text`` field for multi-line documents). ``.csv`` line numbers are those where a row ends."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in SUPPORTED_EXTENSIONS:
        raise DataError(f"{path}: unsupported file type {ext!r}; supported: {', '.join(SUPPORTED_EXTENSIONS)}")
    if ext == ".parquet":
        return _load_parquet(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"data file not found: {path}") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if ext == ".jsonl":
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                records.append(Record(path, n, _as_object(_json(path, n, line), path, n)))
        return records
    if ext == ".json":
        return _load_json_list(path, text)
    if ext == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        records = []
        for row in reader:
            if None in row:  # DictReader files surplus cells under the key None
                raise DataError(f"{path}:{reader.line_num}: more cells than header columns {reader.fieldnames}")
            records.append(Record(path, reader.line_num, dict(row)))
        return records
    return [Record(path, n, {"text": line}) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def _json(path: Path, line: int, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{line}: invalid JSON ({exc.msg} at column {exc.colno})") from None


def _as_object(value: Any, path: Path, line: int) -> dict:
    if not isinstance(value, dict):
        raise DataError(f"{path}:{line}: expected a JSON object, got {type(value).__name__}")
    return value


def _load_json_list(path: Path, text: str) -> list[Record]:
    # Decode element by element (not json.loads on the whole file) so every record keeps the line it starts on.
    decoder, ws, pos = json.JSONDecoder(), " \t\r\n", 0

    def skip(p: int) -> int:
        while p < len(text) and text[p] in ws:
            p += 1
        return p

    def line_of(p: int) -> int:
        return text.count("\n", 0, p) + 1

    pos = skip(pos)
    if not text.startswith("[", pos):
        raise DataError(f"{path}:{line_of(pos)}: a .json file must hold a list of objects (use .jsonl for one per line)")
    records, pos = [], skip(pos + 1)
    if text.startswith("]", pos):
        return records
    while True:
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        records.append(Record(path, line_of(pos), _as_object(value, path, line_of(pos))))
        pos = skip(end)
        if text.startswith("]", pos):
            return records
        if not text.startswith(",", pos):
            raise DataError(f"{path}:{line_of(pos)}: invalid JSON (expected ',' or ']' after a list item)")
        pos = skip(pos + 1)


def _load_parquet(path: Path) -> list[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading .parquet needs pyarrow; run `pip install pyarrow`") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read parquet ({exc})") from None
    return [Record(path, n, row) for n, row in enumerate(rows, 1)]


def load_text_dataset(train_data_dir: Path | None, metadata_path: Path | None) -> list[Record]:
    """Load ``metadata_path`` if given, else every supported file directly inside ``train_data_dir`` (sorted)."""
    if metadata_path is not None:
        files = [Path(metadata_path)]
        if not files[0].is_file():
            raise DataError(f"data file not found: {metadata_path}")
    elif train_data_dir is not None:
        folder = Path(train_data_dir)
        if not folder.is_dir():
            raise DataError(f"train_data_dir not found or not a directory: {folder}")
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SUPPORTED_EXTENSIONS)
        if not files:
            raise DataError(f"{folder}: no data files; expected one of {', '.join(SUPPORTED_EXTENSIONS)}")
    else:
        raise DataError("no training data: set train_data_dir or metadata_path")
    records = [r for f in files for r in load_records(f)]
    if not records:
        raise DataError(f"no samples found in {', '.join(map(str, files))}")
    return records


# ---------------------------------------------------------------- formats and turns


def detect_format(record: Record) -> str:
    """Name the format a record's fields imply: alpaca, sharegpt, messages or text."""
    keys = record.data.keys()
    for key, fmt in (("messages", "messages"), ("conversations", "sharegpt"), ("instruction", "alpaca"), ("text", "text")):
        if key in keys:
            return fmt
    raise DataError(
        f"{record.where}: cannot detect the data format from fields {sorted(keys)}; supported: {_FORMAT_HELP}"
    )


def resolve_format(records: list[Record], data_format: str = "auto") -> str:
    """Resolve ``auto`` from the first record and require every record to match it."""
    if data_format not in DATA_FORMATS:
        raise DataError(f"unknown data_format {data_format!r}; choose one of {', '.join(DATA_FORMATS)}")
    if data_format != "auto":
        return data_format
    fmt = detect_format(records[0])
    for rec in records[1:]:
        if (other := detect_format(rec)) != fmt:
            raise DataError(
                f"{rec.where}: record looks like {other} but the first record ({records[0].where}) is {fmt}; "
                "all records must use one format"
            )
    return fmt


def _field(record: Record, name: str, required: bool = True) -> Any:
    value = record.data.get(name)
    if value is None or (isinstance(value, float) and value != value):  # NaN: empty CSV/parquet cell
        if required:
            raise DataError(f"{record.where}: missing field {name!r} (fields found: {sorted(record.data)})")
        return None
    return value


def _text(record: Record, value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{record.where}: {what} must be a string, got {type(value).__name__}")
    return value


def normalize_record(record: Record, fmt: str) -> list[Turn]:
    """Turn a record into ``[{"role", "content"}]`` and check the turn order (text format: one ``text`` turn)."""
    if fmt == "text":
        text = _text(record, _field(record, "text"), "'text'")
        if not text.strip():
            raise DataError(f"{record.where}: empty 'text'")
        return [{"role": "text", "content": text}]
    if fmt == "alpaca":
        prompt = _text(record, _field(record, "instruction"), "'instruction'")
        extra = _field(record, "input", required=False)
        if extra:  # the optional input is appended to the instruction, as the Alpaca prompt does
            prompt = f"{prompt}\n\n{_text(record, extra, 'input')}"
        turns = [{"role": "user", "content": prompt},
                 {"role": "assistant", "content": _text(record, _field(record, "output"), "'output'")}]
        if system := _field(record, "system", required=False):
            turns.insert(0, {"role": "system", "content": _text(record, system, "'system'")})
        return turns
    key, role_key, content_key = {"sharegpt": ("conversations", "from", "value"),
                                  "messages": ("messages", "role", "content")}[fmt]
    raw = _field(record, key)
    if isinstance(raw, str):  # CSV cells hold the list as a JSON string
        raw = _json(record.source, record.line, raw)
    if not isinstance(raw, list):
        raise DataError(f"{record.where}: {key!r} must be a list of {{{role_key}, {content_key}}} objects")
    turns = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or role_key not in item or content_key not in item:
            found = sorted(item) if isinstance(item, dict) else type(item).__name__
            raise DataError(f"{record.where}: {key}[{i}] needs fields {role_key!r} and {content_key!r}, found {found}")
        role = item[role_key]
        role = _SHAREGPT_ROLES.get(role) if fmt == "sharegpt" else (role if role in ("system", "user", "assistant") else None)
        if role is None:
            allowed = ", ".join(_SHAREGPT_ROLES) if fmt == "sharegpt" else "system, user, assistant"
            raise DataError(f"{record.where}: {key}[{i}] has unsupported {role_key} {item[role_key]!r}; use {allowed}")
        turns.append({"role": role, "content": _text(record, item[content_key], f"{key}[{i}].{content_key}")})
    _check_order(record, key, turns)
    return turns


def _check_order(record: Record, key: str, turns: list[Turn]) -> None:
    body = turns[1:] if turns and turns[0]["role"] == "system" else turns
    if not body:
        raise DataError(f"{record.where}: empty conversation in {key!r} (needs at least a user and an assistant turn)")
    for i, turn in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if turn["role"] != expected:
            raise DataError(
                f"{record.where}: {key}[{i + len(turns) - len(body)}] is {turn['role']!r} where {expected!r} was "
                "expected; turns must alternate user/assistant after an optional first system turn"
            )
    if body[-1]["role"] != "assistant":
        raise DataError(f"{record.where}: conversation in {key!r} must end with an assistant turn")


# ---------------------------------------------------------------- chat templates and tokenization


@dataclass
class Tokenized:
    """One tokenized sample. ``labels`` is ``IGNORE_INDEX`` where the token is not trained."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class _Builtin:
    system: str
    user: str
    header: str  # masked: starts an assistant turn
    end: str  # trained: closes an assistant turn (EOS is appended after it if it is not the EOS itself)
    sep: str  # masked: between an assistant turn and the next turn
    prefix: str | None  # start of text; None = the tokenizer's BOS if it adds one
    markers: tuple[str, ...]  # special tokens the tokenizer must know as single tokens


_BUILTINS = {
    "chatml": _Builtin("<|im_start|>system\n{}<|im_end|>\n", "<|im_start|>user\n{}<|im_end|>\n",
                       "<|im_start|>assistant\n", "<|im_end|>", "\n", "", ("<|im_start|>", "<|im_end|>")),
    "llama3": _Builtin("<|start_header_id|>system<|end_header_id|>\n\n{}<|eot_id|>",
                       "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>",
                       "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>", "", "<|begin_of_text|>",
                       ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    "alpaca": _Builtin("{}\n\n", "### Instruction:\n{}\n\n", "### Response:\n", "", "\n\n", None, ()),
}


def _bos_ids(tokenizer: Any) -> list[int]:
    """``[bos]`` if the tokenizer adds a BOS when encoding with special tokens (LLaMA does, Qwen does not)."""
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and tokenizer("x", add_special_tokens=True)["input_ids"][:1] == [bos] else []


def _builtin_segments(turns: list[Turn], tokenizer: Any, name: str) -> list[tuple[str | list[int], bool]]:
    tpl = _BUILTINS[name]
    for marker in tpl.markers:
        tid = tokenizer.convert_tokens_to_ids(marker)
        if tid is None or tid == tokenizer.unk_token_id:
            raise DataError(
                f"chat_template {name!r} needs the special token {marker!r}, which this tokenizer lacks; "
                "use chat_template: auto (the tokenizer's own) or a template matching the model"
            )
    segments: list[tuple[str | list[int], bool]] = [(tpl.prefix, False) if tpl.prefix is not None
                                                    else (_bos_ids(tokenizer), False)]
    for i, turn in enumerate(turns):
        if turn["role"] == "assistant":
            segments += [(tpl.header, False), (turn["content"] + tpl.end, True)]
            if i + 1 < len(turns):
                segments.append((tpl.sep, False))
        else:
            segments.append(((tpl.system if turn["role"] == "system" else tpl.user).format(turn["content"]), False))
    return segments


def _jinja_segments(turns: list[Turn], tokenizer: Any, template: str | None) -> list[tuple[str | list[int], bool]]:
    # A Jinja template renders whole conversations, so the assistant spans are found by rendering growing prefixes:
    # render(turns[:k], add_generation_prompt=True) ends where assistant turn k starts, render(turns[:k+1]) where it
    # ends; the differences are the masked and the trained text. Whitespace after the end-of-turn marker is moved to
    # the next masked span. Templates that rewrite earlier turns (e.g. drop past reasoning) break this and are refused.
    def render(part: list[Turn], gen: bool) -> str:
        try:
            return tokenizer.apply_chat_template(part, chat_template=template, tokenize=False, add_generation_prompt=gen)
        except Exception as exc:  # noqa: BLE001 - template errors are arbitrary Jinja exceptions
            raise DataError(f"the chat template failed to render this conversation ({exc})") from None

    segments: list[tuple[str | list[int], bool]] = []
    done = ""
    for k, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        prompt, full = render(turns[:k], True), render(turns[: k + 1], False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise DataError(
                "the tokenizer's chat template does not render conversations incrementally (it changes earlier "
                "turns), so assistant tokens cannot be located; set chat_template to chatml, llama3 or alpaca"
            )
        answer = full[len(prompt):].rstrip()
        segments += [(prompt[len(done):], False), (answer, True)]
        done = prompt + answer
    return segments


def render_conversation(
    turns: list[Turn], tokenizer: Any, chat_template: str = "auto", train_on_prompt: bool = False,
    max_seq_length: int = 2048,
) -> Tokenized:
    """Tokenize one normalised sample with its label mask.

    Text is split into masked (prompt) and trained (assistant) segments that are tokenized separately and
    concatenated, so the mask is exact at segment edges. Every assistant turn ends with the tokenizer's EOS, which is
    trained, so the model learns to stop. ``chat_template``: ``auto`` (the tokenizer's Jinja template, else chatml),
    ``tokenizer``, ``chatml``, ``llama3``, ``alpaca``, or a Jinja string. A ``text`` turn is BOS + text + EOS.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos_token; set one so the model can learn where answers end")
    if turns and turns[0]["role"] == "text":
        ids = _bos_ids(tokenizer) + tokenizer(turns[0]["content"], add_special_tokens=False)["input_ids"] + [eos]
        return _truncate(ids, list(ids), max_seq_length)
    own = getattr(tokenizer, "chat_template", None)
    if chat_template == "tokenizer" and not own:
        raise DataError("chat_template is 'tokenizer' but the tokenizer has no chat_template; use chatml, llama3 or alpaca")
    if chat_template in ("auto", "tokenizer") and own:
        segments = _jinja_segments(turns, tokenizer, None)
    elif chat_template == "auto":
        segments = _builtin_segments(turns, tokenizer, "chatml")
    elif chat_template in _BUILTINS:
        segments = _builtin_segments(turns, tokenizer, chat_template)
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
    return _truncate(ids, labels, max_seq_length)


def _truncate(ids: list[int], labels: list[int], max_seq_length: int) -> Tokenized:
    cut = len(ids) > max_seq_length
    return Tokenized(ids[:max_seq_length], labels[:max_seq_length], cut)


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


def tokenize_dataset(
    records: list[Record], tokenizer: Any, *, data_format: str = "auto", chat_template: str = "auto",
    train_on_prompt: bool = False, max_seq_length: int = 2048,
) -> tuple[list[Tokenized], TextStats]:
    """Check, normalise and tokenize every record; errors are prefixed with the record's ``file:line``."""
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


# ---------------------------------------------------------------- packing, masks, batches


@dataclass
class PackedRow:
    """Several samples concatenated; ``position_ids`` restart at 0 for each, ``seq_lens`` are their lengths."""

    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)
    seq_lens: list[int] = field(default_factory=list)


def pack(samples: list[Tokenized], max_seq_length: int) -> list[PackedRow]:
    """Best-fit packing: each sample goes into the open row with the least room that still fits it.

    The first label of every sample is masked: inside a row the loss shift would otherwise make the previous
    sample's last token predict it. Alone, that label is never used either, so per-sample losses are unchanged.
    """
    rows: list[PackedRow] = []
    free: list[tuple[int, int]] = []  # sorted (room left, row index)
    for s in samples:
        n = len(s.input_ids)
        if n > max_seq_length:
            raise ValueError(f"sample of {n} tokens exceeds max_seq_length {max_seq_length}; truncate first")
        if n == 0:
            continue
        i = bisect.bisect_left(free, (n, -1))
        if i < len(free):
            room, r = free.pop(i)
        else:
            room, r = max_seq_length, len(rows)
            rows.append(PackedRow())
        row = rows[r]
        row.input_ids += s.input_ids
        row.labels += [IGNORE_INDEX] + s.labels[1:]
        row.position_ids += range(n)
        row.seq_lens.append(n)
        bisect.insort(free, (room - n, r))
    return rows


def packed_attention_mask(seq_lens: list[int], total_len: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Block-diagonal causal mask ``[1, 1, L, L]``, additive: 0 where attention is allowed, dtype-min elsewhere.

    transformers 5.23 (masking_utils._preprocess_mask_arguments) passes any 4-D mask through unchanged, and the eager
    attention *adds* it to the scores, so it must be additive in the model's dtype (a bool mask would be added as
    0/1); sdpa accepts the same float mask. Positions past ``sum(seq_lens)`` (padding) attend only to themselves.
    """
    import torch

    dtype = dtype or torch.float32
    seq_ids = torch.arange(total_len)  # padding: each position its own sequence
    start = 0
    for i, n in enumerate(seq_lens):
        seq_ids[start:start + n] = -1 - i
        start += n
    if start > total_len:
        raise ValueError(f"seq_lens sum to {start}, more than total_len {total_len}")
    pos = torch.arange(total_len)
    allowed = (seq_ids[:, None] == seq_ids[None, :]) & (pos[None, :] <= pos[:, None])
    mask = torch.zeros(total_len, total_len, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def collate_packed(rows: list[PackedRow], pad_id: int, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Right-pad packed rows; pads get label -100 and position 0. ``attention_mask`` is 4-D ``[B, 1, L, L]``."""
    import torch

    length = max(len(r.input_ids) for r in rows)
    out: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": [], "attention_mask": []}
    for r in rows:
        pad = length - len(r.input_ids)
        out["input_ids"].append(r.input_ids + [pad_id] * pad)
        out["labels"].append(r.labels + [IGNORE_INDEX] * pad)
        out["position_ids"].append(r.position_ids + [0] * pad)
        out["attention_mask"].append(packed_attention_mask(r.seq_lens, length, dtype))
    batch = {k: torch.tensor(v, dtype=torch.long) for k, v in out.items() if k != "attention_mask"}
    batch["attention_mask"] = torch.cat(out["attention_mask"])
    return batch


def collate_padded(samples: list[Tokenized], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad unpacked samples: labels -100 and ``attention_mask`` 0 on pads (2-D ``[B, L]``)."""
    import torch

    length = max(len(s.input_ids) for s in samples)
    ids, labels, mask = [], [], []
    for s in samples:
        pad = length - len(s.input_ids)
        ids.append(s.input_ids + [pad_id] * pad)
        labels.append(s.labels + [IGNORE_INDEX] * pad)
        mask.append([1] * len(s.input_ids) + [0] * pad)
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)}


def length_grouped_order(lengths: list[int], batch_size: int, rng: np.random.Generator) -> list[int]:
    """Sample order that batches similar lengths together (less padding) yet stays random.

    Shuffle all indices, cut them into mega-batches of ``batch_size * 50`` and sort each by length, longest first
    (like transformers' LengthGroupedSampler), so consecutive ``batch_size`` slices hold similar lengths.
    """
    order = rng.permutation(len(lengths))
    mega = max(1, batch_size * 50)
    out: list[int] = []
    for start in range(0, len(order), mega):
        chunk = order[start:start + mega]
        out += sorted(chunk.tolist(), key=lambda i: -lengths[i])
    return out

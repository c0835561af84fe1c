"""Record formats -> conversations: every field of alpaca, sharegpt, OpenAI messages and TRL preference records is
read or refused, never dropped; a field we do not know is reported (or refused with ``strict_fields``).

- alpaca: ``instruction``, ``input``, ``output``, ``system``, ``history`` ([[user, assistant], ...]); preference
  variants ``chosen`` / ``rejected`` (strings) and ``kto_tag``.
- sharegpt: ``conversations`` with ``from`` human/gpt/system/function_call/observation and ``value``; top-level
  ``system``, ``tools`` (a JSON string or list); preference ``chosen`` / ``rejected`` turns; ``kto_tag``.
- messages (OpenAI): ``messages`` with role system/user/assistant/tool, ``content`` a string or a list of text
  parts, assistant ``tool_calls`` (and ``reasoning_content``); top-level ``tools``; ``kto_tag``.
- preference (TRL): ``prompt`` + ``chosen`` + ``rejected`` (strings or message lists; without ``prompt`` the
  shared leading turns are the prompt), or ``prompt`` + ``completion`` + ``label`` (KTO).
- LLaMA-Factory ``dataset_info.json``: its ``columns`` and ``tags`` rename fields and roles (:class:`ColumnMap`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError

DATA_FORMATS = ("auto", "alpaca", "sharegpt", "messages", "text", "preference")
_FORMAT_HELP = ("alpaca (instruction, input, output), sharegpt (conversations), messages (messages), text (text), "
                "preference (prompt, chosen, rejected)")
_DETECT = (("messages", "messages"), ("conversations", "sharegpt"), ("instruction", "alpaca"), ("text", "text"),
           ("chosen", "preference"), ("completion", "preference"))
KNOWN_FIELDS = {
    "alpaca": {"instruction", "input", "output", "system", "history", "chosen", "rejected", "kto_tag"},
    "sharegpt": {"conversations", "system", "tools", "chosen", "rejected", "kto_tag"},
    "messages": {"messages", "tools", "kto_tag"},
    "text": {"text"},
    "preference": {"prompt", "chosen", "rejected", "completion", "label", "tools", "system"},
}
_MESSAGE_KEYS = {"role", "content", "tool_calls", "tool_call_id", "name", "reasoning_content"}
_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                   "function_call": "function_call", "observation": "tool", "tool": "tool"}
# LLaMA-Factory column names -> ours
_LF_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "system": "system",
               "history": "history", "messages": "conversations", "tools": "tools", "chosen": "chosen",
               "rejected": "rejected", "kto_tag": "kto_tag"}

Turn = dict[str, Any]


@dataclass(frozen=True)
class ColumnMap:
    """Field and role names of a dataset that differ from ours (LLaMA-Factory's ``columns`` and ``tags``)."""

    renames: dict[str, str] = field(default_factory=dict)  # their field -> ours
    role_key: str = "from"
    content_key: str = "value"
    roles: dict[str, str] = field(default_factory=dict)  # their role -> ours


@dataclass
class Conversation:
    """A record read: the turns (for preference data: the prompt), tools, and preference parts."""

    turns: list[Turn]
    tools: list | None = None
    chosen: list[Turn] | None = None
    rejected: list[Turn] | None = None
    label: bool | None = None  # KTO: desirable (True) or undesirable (False)
    unknown: list[str] = field(default_factory=list)


def load_dataset_info(path: Path, name: str | None) -> tuple[Path, str, ColumnMap, bool]:
    """Read a LLaMA-Factory ``dataset_info.json`` entry: (data file, our format, column map, ranking)."""
    path = Path(path)
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"dataset_info: cannot read {path} ({str(exc).splitlines()[0]})") from None
    if not isinstance(info, dict) or not info:
        raise ConfigError(f"dataset_info: {path} must map dataset names to entries")
    if name is None:
        if len(info) != 1:
            raise ConfigError(f"dataset_info: {path} has {len(info)} datasets; set dataset_name to one of "
                              f"{', '.join(sorted(info))}")
        name = next(iter(info))
    if name not in info:
        raise ConfigError(f"dataset_name: {name!r} is not in {path}; choose one of {', '.join(sorted(info))}")
    entry = info[name]
    if "file_name" not in entry:
        raise ConfigError(f"dataset_info: entry {name!r} in {path} has no file_name (hub and script datasets are "
                          "not supported; point file_name at a local file)")
    fmt = entry.get("formatting", "alpaca")
    if fmt not in ("alpaca", "sharegpt"):
        raise ConfigError(f"dataset_info: entry {name!r} has formatting {fmt!r}; supported: alpaca, sharegpt")
    columns, tags = entry.get("columns", {}), entry.get("tags", {})
    unknown = sorted(set(columns) - set(_LF_COLUMNS) - {"images", "videos", "audios"})
    if unknown or any(k in columns for k in ("images", "videos", "audios")):
        raise ConfigError(f"dataset_info: entry {name!r} maps columns {unknown or ['images/videos/audios']} that "
                          "the text task cannot train; remove them")
    renames = {their: ("conversations" if ours == "messages" and fmt == "sharegpt" else _LF_COLUMNS[ours])
               for ours, their in columns.items()}
    roles = {tags.get("user_tag", "human"): "user", tags.get("assistant_tag", "gpt"): "assistant",
             tags.get("observation_tag", "observation"): "tool", tags.get("function_tag", "function_call"):
             "function_call", tags.get("system_tag", "system"): "system"}
    cmap = ColumnMap(renames, tags.get("role_tag", "from"), tags.get("content_tag", "value"), roles)
    return (path.parent / entry["file_name"]), fmt, cmap, bool(entry.get("ranking", False))


def apply_columns(data: dict[str, Any], columns: ColumnMap | None) -> dict[str, Any]:
    """``data`` with fields renamed as ``columns`` says."""
    if columns is None or not columns.renames:
        return data
    return {columns.renames.get(k, k): v for k, v in data.items()}


def detect_format(data: dict[str, Any], where: str) -> str:
    """Name the format a record's fields imply."""
    for key, fmt in _DETECT:
        if key in data:
            return fmt
    raise DataError(f"{where}: cannot detect the data format from fields {sorted(data)}; supported: {_FORMAT_HELP}")


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)  # NaN: an empty parquet cell


def _get(data: dict, where: str, name: str, required: bool = True, kind: type | tuple = str) -> Any:
    value = data.get(name)
    if _missing(value):
        if required:
            raise DataError(f"{where}: missing field {name!r} (fields found: {sorted(data)}); add it")
        return None
    if not isinstance(value, kind):
        raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__} "
                        f"({value!r:.40}); write it in double quotes")
    return value


def _json_value(value: Any, where: str, name: str, kind: type) -> Any:
    """A field that may hold JSON text (CSV cells, LLaMA-Factory's ``tools`` and ``function_call`` values)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise DataError(f"{where}: {name} is not valid JSON; write it as a JSON {kind.__name__}") from None
    if not isinstance(value, kind):
        raise DataError(f"{where}: {name} must be a JSON {kind.__name__}, got {type(value).__name__}")
    return value


def _content(value: Any, where: str, name: str, allow_none: bool = False) -> str:
    """A message's content: a string, or a list of text parts (joined); other parts are refused."""
    if isinstance(value, str):
        return value
    if value is None and allow_none:
        return ""
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise DataError(f"{where}: {name}[{j}] is a {kind!r} part; only text parts can be trained by the "
                                "text task (remove it)")
        return "".join(texts)
    raise DataError(f"{where}: {name} must be a string; write it in double quotes")


def _tool_calls(value: Any, where: str, name: str) -> list[dict]:
    if isinstance(value, str):  # sharegpt's function_call value: one call or a list, as JSON text
        value = _json_value(value, where, name, object)
    calls = [value] if isinstance(value, dict) else _json_value(value, where, name, list)
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise DataError(f"{where}: {name}[{j}] needs a function name ({{\"name\": ..., \"arguments\": ...}})")
        args = fn.get("arguments", {})
        args = _json_value(args, where, f"{name}[{j}].arguments", dict) if args is not None else {}
        item = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if isinstance(call, dict) and "id" in call:
            item["id"] = call["id"]
        out.append(item)
    return out


def _messages(raw: Any, where: str, key: str, role_key: str, content_key: str, roles: dict[str, str],
              unknown: list[str]) -> list[Turn]:
    if isinstance(raw, str) and raw.lstrip().startswith("["):  # a CSV cell holds the list as a JSON string
        raw = _json_value(raw, where, key, list)
    if not isinstance(raw, list):
        raise DataError(f"{where}: {key!r} must be a list of {{{role_key}, {content_key}}} objects, got "
                        f"{type(raw).__name__}; write [{{\"{role_key}\": ..., \"{content_key}\": ...}}, ...]")
    turns = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or role_key not in item or (content_key not in item and "tool_calls" not in item):
            found = sorted(item) if isinstance(item, dict) else type(item).__name__
            raise DataError(f"{where}: {key}[{i}] needs fields {role_key!r} and {content_key!r}, found {found}; "
                            "add them")
        if (role := roles.get(item[role_key]) if isinstance(item[role_key], str) else None) is None:
            raise DataError(f"{where}: {key}[{i}] has unsupported {role_key} {item[role_key]!r}; use "
                            f"{', '.join(roles)}")
        extra = set(item) - {role_key, content_key} - _MESSAGE_KEYS
        unknown += [f"{key}[].{name}" for name in sorted(extra)]
        name = f"{key}[{i}].{content_key}"
        if role == "function_call":  # sharegpt: the value is the call as JSON
            turns.append({"role": "assistant", "content": "", "tool_calls": _tool_calls(item[content_key], where, name)})
            continue
        turn: Turn = {"role": role, "content": _content(item.get(content_key), where, name,
                                                        allow_none="tool_calls" in item)}
        if "tool_calls" in item and not _missing(item["tool_calls"]):
            if role != "assistant":
                raise DataError(f"{where}: {key}[{i}] has tool_calls but role {role!r}; only assistant turns call tools")
            turn["tool_calls"] = _tool_calls(item["tool_calls"], where, f"{key}[{i}].tool_calls")
        for opt in ("reasoning_content", "tool_call_id", "name"):
            if isinstance(item.get(opt), str):
                turn[opt] = item[opt]
        turns.append(turn)
    return turns


_NEXT = {"start": ("user",), "user": ("assistant",), "assistant": ("user",), "tool": ("assistant", "tool")}


def check_order(turns: list[Turn], where: str, key: str, offset: int = 0, final: str = "assistant") -> None:
    """Turns alternate user/assistant after an optional system turn; tool results follow an assistant's tool
    calls; the last turn is ``final``."""
    body = turns[1:] if turns and turns[0]["role"] == "system" else turns
    first = len(turns) - len(body)
    if not body:
        raise DataError(f"{where}: empty conversation in {key!r} (needs a user and an assistant turn)")
    state = "start"
    for i, turn in enumerate(body):
        allowed = _NEXT[state] + (("tool",) if state == "assistant" and body[i - 1].get("tool_calls") else ())
        if turn["role"] not in allowed:
            raise DataError(f"{where}: {key}[{i + first + offset}] is {turn['role']!r} where {allowed[0]!r} was "
                            "expected; turns alternate user/assistant after an optional system turn (tool turns "
                            "follow an assistant's tool_calls)")
        state = turn["role"]
    if body[-1]["role"] != final:
        raise DataError(f"{where}: conversation in {key!r} must end with an {final} turn; add the answer or drop the "
                        "last turn" if final == "assistant" else f"{where}: the prompt in {key!r} must end with a "
                        "user turn")


def _kto_tag(data: dict, where: str) -> bool | None:
    tag = data.get("kto_tag", data.get("label"))
    if _missing(tag):
        return None
    if not isinstance(tag, bool):
        raise DataError(f"{where}: kto_tag/label must be true or false, got {tag!r}")
    return tag


def _as_turns(value: Any, where: str, name: str, role: str, unknown: list[str]) -> list[Turn]:
    """A preference part: a string (one ``role`` turn), one message object, or a list of messages."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, dict):
        value = [value]
    keys = ("role", "content") if not value or "role" in value[0] else ("from", "value")
    roles = _ROLES if keys[0] == "role" else _SHAREGPT_ROLES
    return _messages(value, where, name, keys[0], keys[1], roles, unknown)


def read_record(data: dict[str, Any], fmt: str, where: str, columns: ColumnMap | None = None) -> Conversation:
    """Read one record of format ``fmt`` into a :class:`Conversation`; every error names ``where``."""
    data = apply_columns(data, columns)
    unknown = [k for k in data if k not in KNOWN_FIELDS[fmt]]
    if fmt == "text":
        if not (text := _get(data, where, "text")).strip():
            raise DataError(f"{where}: empty 'text'; write the sample or remove the line")
        return Conversation([{"role": "text", "content": text}], unknown=unknown)
    tools = data.get("tools")
    tools = None if _missing(tools) or tools == "" else _json_value(tools, where, "tools", list)
    label = _kto_tag(data, where)
    if fmt == "preference":
        return _read_preference(data, where, tools, label, unknown)
    if fmt == "alpaca":
        turns: list[Turn] = []
        if system := _get(data, where, "system", required=False):
            turns.append({"role": "system", "content": system})
        history = data.get("history")
        for i, pair in enumerate([] if _missing(history) else _json_value(history, where, "history", list)):
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise DataError(f"{where}: history[{i}] must be a [user, assistant] pair of strings")
            turns += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
        prompt = _get(data, where, "instruction")
        if extra := _get(data, where, "input", required=False):  # appended to the instruction, as Alpaca does
            prompt += "\n\n" + extra
        turns.append({"role": "user", "content": prompt})
        if "chosen" in data or "rejected" in data:
            return Conversation(turns, tools, _as_turns(_get(data, where, "chosen"), where, "chosen", "assistant", unknown),
                                _as_turns(_get(data, where, "rejected"), where, "rejected", "assistant", unknown),
                                label, unknown)
        turns.append({"role": "assistant", "content": _get(data, where, "output")})
        return Conversation(turns, tools, label=label, unknown=unknown)
    if fmt == "sharegpt":
        cm = columns or ColumnMap()
        roles = {**_SHAREGPT_ROLES, **cm.roles}
        turns = _messages(_get(data, where, "conversations", kind=object), where, "conversations", cm.role_key,
                          cm.content_key, roles, unknown)
        if (system := _get(data, where, "system", required=False)) and not (turns and turns[0]["role"] == "system"):
            turns.insert(0, {"role": "system", "content": system})
        key = "conversations"
    else:
        turns = _messages(_get(data, where, "messages", kind=object), where, "messages", "role", "content", _ROLES,
                          unknown)
        key = "messages"
    if fmt == "sharegpt" and ("chosen" in data or "rejected" in data):
        cm = columns or ColumnMap()
        check_order(turns, where, key, final="user")
        parts = [_messages([_get(data, where, k, kind=dict)], where, k, cm.role_key, cm.content_key,
                           {**_SHAREGPT_ROLES, **cm.roles}, unknown) for k in ("chosen", "rejected")]
        return Conversation(turns, tools, parts[0], parts[1], label, unknown)
    check_order(turns, where, key)
    return Conversation(turns, tools, label=label, unknown=unknown)


def _read_preference(data: dict, where: str, tools: list | None, label: bool | None,
                     unknown: list[str]) -> Conversation:
    prompt = [] if _missing(data.get("prompt")) else _as_turns(data["prompt"], where, "prompt", "user", unknown)
    if system := _get(data, where, "system", required=False):
        prompt.insert(0, {"role": "system", "content": system})
    if "completion" in data:  # TRL's unpaired (KTO) layout
        if label is None:
            raise DataError(f"{where}: a prompt/completion record needs label: true or false (KTO)")
        completion = _as_turns(_get(data, where, "completion", kind=(str, list, dict)), where, "completion",
                               "assistant", unknown)
        check_order(prompt, where, "prompt", final="user")
        return Conversation(prompt, tools, completion, None, label, unknown)
    chosen = _as_turns(_get(data, where, "chosen", kind=(str, list, dict)), where, "chosen", "assistant", unknown)
    rejected = _as_turns(_get(data, where, "rejected", kind=(str, list, dict)), where, "rejected", "assistant",
                         unknown)
    if not prompt:  # implicit prompt: the turns chosen and rejected share
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    check_order(prompt, where, "prompt", final="user")
    for name, part in (("chosen", chosen), ("rejected", rejected)):
        if not part or part[0]["role"] != "assistant":
            raise DataError(f"{where}: {name} must start with an assistant turn (the answer to the prompt)")
    return Conversation(prompt, tools, chosen, rejected, label, unknown)

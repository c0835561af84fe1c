"""Conversations -> token ids and labels, exactly as the model's chat template renders them.

``input_ids`` are the template's own rendering (``apply_chat_template(..., tokenize=False)`` tokenized once, without
added special tokens, as ``apply_chat_template(tokenize=True)`` does): nothing inserted, nothing dropped. Labels
cover each assistant turn from where the generation prompt ends up to and including the template's end-of-turn
marker (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, ``</s>``, GLM's ``<|user|>`` ...); whitespace the
template puts after the marker is not trained. Templates with ``{% generation %}`` blocks give the mask themselves
(``return_assistant_tokens_mask``), which is then used as is.

How spans are found: ``render(turns[:k], add_generation_prompt=True)`` ends where assistant turn k starts, and
``render(turns[:k+1])`` ends where it ends. When every rendering extends the previous one the conversation is one
sequence. Templates that rewrite history (Qwen3 and GLM drop earlier ``<think>`` blocks, Mistral moves the system
prompt to the last user turn) make one sequence per assistant turn, each rendered as the template renders it when
that turn is the last one: exactly what the model sees at inference.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..errors import DataError

IGNORE_INDEX = -100  # label value the cross-entropy loss skips
CHAT_TEMPLATES = ("auto", "tokenizer", "chatml", "llama3", "alpaca")
# Tokens that end an assistant turn in the templates we know; only those the tokenizer has as one token count.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>", "<|user|>",
                      "<|observation|>", "<|endoftext|>", "<|end_of_text|>", "</s>", "<|return|>", "<|call|>")
_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")

Turn = dict[str, Any]  # {"role", "content", optional "tool_calls", "reasoning_content", ...}

# Built-in templates (for tokenizers without one) as Jinja, so they render through the same path as real ones.
BUILTIN_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
        "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ '<|begin_of_text|>' }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
        "'<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    # add_bos: set by us to whether the tokenizer adds a BOS when encoding (LLaMA does, Qwen does not)
    "alpaca": (
        "{% if add_bos %}{{ bos_token }}{% endif %}{% for message in messages %}{% if message['role'] == 'system' %}"
        "{{ message['content'] + '\\n\\n' }}{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + "
        "message['content'] + '\\n\\n' }}{% else %}{{ '### Response:\\n' + message['content'] + eos_token }}"
        "{% if not loop.last %}{{ '\\n\\n' }}{% endif %}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
}
_BUILTIN_MARKERS = {"chatml": ("<|im_start|>", "<|im_end|>"),
                    "llama3": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
                    "alpaca": ()}


@dataclass
class Tokenized:
    """One tokenized sample; ``labels`` is ``IGNORE_INDEX`` where the token is not trained."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class Template:
    """A resolved chat template: the Jinja text, extra variables for it, and the stop-token strings."""

    text: str
    variables: dict[str, Any]
    stops: tuple[str, ...]
    name: str

    @property
    def has_generation_tags(self) -> bool:
        return bool(_GENERATION_TAG.search(self.text))


def bos_ids(tokenizer: Any) -> list[int]:
    """``[bos]`` if the tokenizer adds a BOS when encoding with special tokens (LLaMA does, Qwen does not)."""
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and tokenizer("x", add_special_tokens=True)["input_ids"][:1] == [bos] else []


def stop_token_ids(tokenizer: Any, extra: tuple[int, ...] | list[int] = ()) -> list[int]:
    """Ids that end a turn: EOS, ``extra`` (a model's ``generation_config.eos_token_id``) and the known
    end-of-turn tokens this tokenizer has."""
    vocab = tokenizer.get_vocab()
    ids = [tokenizer.eos_token_id, *extra, *(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)]
    return list(dict.fromkeys(i for i in ids if i is not None and i != tokenizer.unk_token_id))


def resolve_template(tokenizer: Any, chat_template: str = "auto", stop_ids: tuple[int, ...] = (),
                     variables: dict[str, Any] | None = None) -> Template:
    """The template ``chat_template`` names: ``auto`` (the tokenizer's own, else chatml), ``tokenizer``, a
    built-in name, or a Jinja string."""
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the default one
        own = own.get("default")
    if chat_template == "tokenizer" and not own:
        raise DataError("chat_template is 'tokenizer' but the tokenizer has no chat_template; use chatml or llama3")
    variables = dict(variables or {})
    if chat_template in ("auto", "tokenizer") and own:
        text, name = own, "tokenizer"
    elif chat_template == "auto" or chat_template in BUILTIN_TEMPLATES:
        name = "chatml" if chat_template == "auto" else chat_template
        for marker in _BUILTIN_MARKERS[name]:
            if tokenizer.convert_tokens_to_ids(marker) in (None, tokenizer.unk_token_id):
                raise DataError(f"chat_template {name!r} needs the special token {marker!r}, which this tokenizer "
                                "lacks; use chat_template: auto (the tokenizer's own) or one matching the model")
        text = BUILTIN_TEMPLATES[name]
        variables.setdefault("add_bos", bool(bos_ids(tokenizer)))
    elif "{%" in chat_template or "{{" in chat_template:
        text, name = chat_template, "custom"
    else:
        raise DataError(f"unknown chat_template {chat_template!r}; choose one of {', '.join(CHAT_TEMPLATES)}")
    stops = tuple(sorted((tokenizer.convert_ids_to_tokens(i) for i in stop_token_ids(tokenizer, stop_ids)),
                         key=len, reverse=True))
    return Template(text, variables, stops, name)


def render_text(template: Template, tokenizer: Any, turns: list[Turn], generation_prompt: bool,
                tools: list | None = None) -> str:
    """The template's rendering of ``turns`` as text."""
    try:
        return tokenizer.apply_chat_template(turns, chat_template=template.text, tools=tools, tokenize=False,
                                             add_generation_prompt=generation_prompt, **template.variables)
    except Exception as exc:  # noqa: BLE001 - templates raise arbitrary Jinja exceptions
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"the chat template failed on this conversation ({first})") from None


def _encode(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _turn_end(template: Template, text: str, start: int, end: int, after: str | None) -> tuple[int, str | None]:
    """Where the trained span of an assistant turn rendered as ``text[start:end]`` ends, and the marker to append
    when the template puts none there (``after`` is the text the template renders next, None for the last turn)."""
    stripped = text[start:end].rstrip()
    if any(stripped.endswith(stop) for stop in template.stops):
        return start + len(stripped), None
    if after is not None:  # the next turn opens with the end-of-turn token (GLM: <|user|>, <|observation|>)
        stop = next((s for s in template.stops if after.startswith(s)), None)
        if stop is not None:
            return end + len(stop), None
    elif (marker := _trailing_marker(template)) is not None:
        return end, marker
    raise DataError("the chat template renders no end-of-turn token after an assistant turn (such as "
                    "{{ eos_token }}), so the model could not learn to stop; add one to the template")


_MARKERS: dict[tuple[str, tuple[str, ...]], str | None] = {}


def _trailing_marker(template: Template) -> str | None:
    return _MARKERS.get((template.text, template.stops))


def _probe_marker(template: Template, tokenizer: Any) -> None:
    """For templates that end an assistant turn with the *next* turn's opening token (GLM-4): which stop token
    that is, from a probe conversation; appended after the last turn so the model learns to stop there."""
    key = (template.text, template.stops)
    if key in _MARKERS:
        return
    turns = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    try:
        done = render_text(template, tokenizer, turns, False)
        more = render_text(template, tokenizer, turns + [{"role": "user", "content": "z"}], False)
    except DataError:
        more, done = "", "-"
    after = more[len(done):] if more.startswith(done) else ""
    _MARKERS[key] = next((s for s in template.stops if after.startswith(s)), None)


def render_sequences(turns: list[Turn], tokenizer: Any, template: Template, *, tools: list | None = None,
                     train_on_prompt: bool = False, max_seq_length: int = 2048) -> list[Tokenized]:
    """Tokenize one conversation: one sequence, or one per assistant turn where the template rewrites history."""
    assistant = [k for k, turn in enumerate(turns) if turn["role"] == "assistant"]
    prompts = [render_text(template, tokenizer, turns[:k], True, tools) for k in assistant]
    fulls = [render_text(template, tokenizer, turns[: k + 1], False, tools) for k in assistant]
    for i, k in enumerate(assistant):
        if not fulls[i].startswith(prompts[i]):
            if template.variables.get("enable_thinking") is False and turns[k].get("reasoning_content"):
                raise DataError("assistant turn has reasoning_content but enable_thinking is false; drop one of them")
            # The prompt renders differently once an answer follows it (Mistral puts the system prompt into the
            # last user turn only): train on what inference sees, the prompt followed by the answer as rendered.
            fulls[i] = prompts[i] + _answer_text(template, tokenizer, turns[: k + 1], fulls[i], tools)
    _probe_marker(template, tokenizer)
    one_sequence = all(prompts[i + 1].startswith(fulls[i]) for i in range(len(fulls) - 1))
    if one_sequence:
        text = fulls[-1]
        spans, append = [], None
        for i, (prompt, full) in enumerate(zip(prompts, fulls)):
            after = prompts[i + 1][len(full):] if i + 1 < len(fulls) else None
            end, append = _turn_end(template, text, len(prompt), len(full), after)
            spans.append((len(prompt), end))
        pieces = [(text, spans, append)]
    else:
        pieces = []
        for prompt, full in zip(prompts, fulls):
            end, append = _turn_end(template, full, len(prompt), len(full), None)
            pieces.append((full, [(len(prompt), end)], append))
    out = []
    for text, spans, append in pieces:
        ids, offsets = _encode(tokenizer, text)
        if template.has_generation_tags and one_sequence:
            labels = _generation_mask(tokenizer, template, turns, tools, ids)
        else:
            labels = [i if any(s <= a < e for s, e in spans) else IGNORE_INDEX for i, (a, _) in zip(ids, offsets)]
        if append is not None:
            marker = tokenizer.convert_tokens_to_ids(append)
            ids, labels = ids + [marker], labels + [marker]
        if train_on_prompt:
            labels = list(ids)
        out.append(Tokenized(ids[:max_seq_length], labels[:max_seq_length], len(ids) > max_seq_length))
    return out


def _answer_text(template: Template, tokenizer: Any, turns: list[Turn], full: str, tools: list | None) -> str:
    """The text the template renders for the last (assistant) turn of ``turns``: what ``full`` adds over the same
    conversation with an empty answer."""
    import os

    empty = render_text(template, tokenizer, turns[:-1] + [{**turns[-1], "content": ""}], False, tools)
    answer = full[len(os.path.commonprefix([empty, full])):]
    if not turns[-1]["content"] or not answer.lstrip().startswith(turns[-1]["content"].strip()[:1]):
        raise DataError("the chat template does not render conversations incrementally (the generation prompt is "
                        "not where the answer starts), so assistant tokens cannot be located; set chat_template to "
                        "chatml or llama3")
    return answer


def _generation_mask(tokenizer: Any, template: Template, turns: list[Turn], tools: list | None,
                     ids: list[int]) -> list[int]:
    """Labels from the template's own ``{% generation %}`` blocks (transformers' return_assistant_tokens_mask)."""
    enc = tokenizer.apply_chat_template(turns, chat_template=template.text, tools=tools, tokenize=True,
                                        return_dict=True, return_assistant_tokens_mask=True, **template.variables)
    if list(enc["input_ids"]) != ids:
        raise DataError("the chat template's tokenization differs from its text rendering; report this template")
    return [i if m else IGNORE_INDEX for i, m in zip(ids, enc["assistant_masks"])]


def generation_prompt_ids(turns: list[Turn], tokenizer: Any, template: Template,
                          tools: list | None = None) -> list[int]:
    """Token ids of ``turns`` followed by the template's generation prompt (what a model continues from)."""
    return _encode(tokenizer, render_text(template, tokenizer, turns, True, tools))[0]

"""Every field of the common formats is read (tested by what ends up in input_ids) or refused (issue 16 point 3)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_scripts.data import text as td
from lora_scripts.errors import ConfigError, DataError
from lora_scripts.testing import build_tiny_tokenizer

TEMPLATES = Path(__file__).parent / "chat_templates"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def qwen():
    return build_tiny_tokenizer(chat_template=(TEMPLATES / "Qwen-Qwen2.5-7B-Instruct.jinja").read_text(),
                                add_bos=False, extra_special_tokens=("<|endoftext|>",), eos_token="<|im_end|>")


def _rendered(tmp_path, tok, rows, **options):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples, stats = td.tokenize_dataset(td.load_records(path), tok, max_seq_length=4096, **options)
    return [tok.decode(s.input_ids) for s in samples], samples, stats, path


def _trained(tok, sample):
    return tok.decode([i for i, lab in zip(sample.input_ids, sample.labels) if lab != td.IGNORE_INDEX])


def test_alpaca_system_and_history_are_rendered_and_history_answers_trained(tmp_path, qwen):
    row = {"instruction": "And three?", "input": "", "output": "Six.", "system": "Be terse.",
           "history": [["What is one plus one?", "Two."]]}
    (text,), (sample,), _, _ = _rendered(tmp_path, qwen, [row])
    assert text.startswith("<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nWhat is one plus one?")
    assert "<|im_start|>assistant\nTwo.<|im_end|>\n<|im_start|>user\nAnd three?" in text
    assert _trained(qwen, sample) == "Two.<|im_end|>Six.<|im_end|>"


def test_sharegpt_system_tools_function_call_and_observation(tmp_path, qwen):
    row = {"system": "Use tools.", "tools": json.dumps(TOOLS), "conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": "sunny"},
        {"from": "gpt", "value": "It is sunny."}]}
    (text,), (sample,), stats, _ = _rendered(tmp_path, qwen, [row])
    assert text.startswith("<|im_start|>system\nUse tools.\n\n# Tools")
    assert '"name": "get_weather"' in text and "<tools>" in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>" in text
    trained = _trained(qwen, sample)
    assert "get_weather" in trained and "It is sunny.<|im_end|>" in trained and "sunny\n</tool_response>" not in trained
    assert not stats.warnings


def test_messages_tool_calls_tool_role_and_text_parts(tmp_path, qwen):
    row = {"tools": TOOLS, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Weather "}, {"type": "text", "text": "in Rome?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Rome\"}"}}]},
        {"role": "tool", "content": "rain"},
        {"role": "assistant", "content": "Rain."}]}
    (text,), (sample,), _, _ = _rendered(tmp_path, qwen, [row])
    assert "<|im_start|>user\nWeather in Rome?<|im_end|>" in text
    assert '{"name": "get_weather", "arguments": {"city": "Rome"}}' in text
    assert "<tool_response>\nrain\n</tool_response>" in text
    assert _trained(qwen, sample).endswith("Rain.<|im_end|>")


def test_glm_renders_tool_calls_with_its_own_format(tmp_path):
    tok = build_tiny_tokenizer(chat_template=(TEMPLATES / "GLM-4.6.jinja").read_text(), add_bos=False,
                               extra_special_tokens=("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>",
                                                     "<|observation|>", "<think>", "</think>"),
                               eos_token="<|endoftext|>")
    row = {"tools": TOOLS, "messages": [
        {"role": "user", "content": "Weather in Rome?"},
        {"role": "assistant", "content": "", "tool_calls": [{"name": "get_weather", "arguments": {"city": "Rome"}}]},
        {"role": "tool", "content": "rain"}, {"role": "assistant", "content": "Rain."}]}
    (text,), (sample,), _, _ = _rendered(tmp_path, tok, [row])
    assert "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Rome</arg_value>" in text
    assert "<|observation|>\n<tool_response>\nrain\n</tool_response>" in text
    trained = _trained(tok, sample)
    assert "</tool_call><|observation|>" in trained and trained.endswith("Rain.<|user|>")


@pytest.mark.parametrize("row, message", [
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]},
                   {"role": "assistant", "content": "a"}]}, r"messages\[0\]\.content\[0\] is a 'image_url' part"),
    ({"instruction": "a", "output": "b", "kto_tag": False}, "kto_tag is false"),
    ({"instruction": "a", "chosen": "b", "rejected": "c"}, "preference record"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "function_call", "value": "not json"}]},
     "not valid JSON"),
    ({"tools": TOOLS, "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     "does not render them"),
])
def test_fields_that_cannot_be_trained_are_refused(tmp_path, row, message):
    tok = build_tiny_tokenizer()  # built-in chatml: no tools support
    with pytest.raises(DataError, match=rf"d.jsonl:1: .*{message}"):
        _rendered(tmp_path, tok, [row])


def test_unknown_fields_warn_or_fail_with_strict_fields(tmp_path, qwen):
    rows = [{"instruction": "a", "output": "b", "score": 3}, {"instruction": "c", "output": "d", "score": 4}]
    texts, _, stats, path = _rendered(tmp_path, qwen, rows)
    assert stats.warnings == [f"{path}:1: unknown field 'score' ignored (in 2 records); remove it, or set "
                              "strict_fields: true to make this an error"]
    with pytest.raises(DataError, match=rf"{path}:1: unknown field 'score' \(strict_fields is on\)"):
        _rendered(tmp_path, qwen, rows, strict_fields=True)
    _, _, stats, _ = _rendered(tmp_path, qwen, [{"messages": [{"role": "user", "content": "a", "weight": 1},
                                                              {"role": "assistant", "content": "b"}]}])
    assert "unknown field 'messages[].weight'" in stats.warnings[0]


def test_llamafactory_dataset_info_columns_and_tags(tmp_path, qwen):
    data = tmp_path / "chats.json"
    data.write_text(json.dumps([{"dialog": [{"speaker": "me", "text": "hi"}, {"speaker": "bot", "text": "hello"}],
                                 "sys": "Be kind."}]))
    info = tmp_path / "dataset_info.json"
    info.write_text(json.dumps({"chats": {"file_name": "chats.json", "formatting": "sharegpt",
                                          "columns": {"messages": "dialog", "system": "sys"},
                                          "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "me",
                                                   "assistant_tag": "bot"}}}))
    from lora_scripts.data.formats import load_dataset_info

    path, fmt, columns, ranking = load_dataset_info(info, None)
    assert (path, fmt, ranking) == (data, "sharegpt", False)
    samples, _ = td.tokenize_dataset(td.load_records(path), qwen, data_format=fmt, columns=columns)
    text = qwen.decode(samples[0].input_ids)
    assert text.startswith("<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nhi<|im_end|>")
    assert _trained(qwen, samples[0]) == "hello<|im_end|>"
    with pytest.raises(ConfigError, match="dataset_name: 'other' is not in"):
        load_dataset_info(info, "other")

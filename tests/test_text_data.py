"""Text data for causal-LM LoRA: file formats, checks with file:line errors, chat templates, label masks, packing.

The decisive test runs a tiny LLaMA on a packed row and checks each sample's loss equals its loss run alone.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from lora_scripts.data import text as td
from lora_scripts.errors import DataError

CORPUS = ["hello there, how are you today?", "I am fine, thank you very much.", "What is two plus two?",
          "Two plus two is four.", "You are a helpful assistant.", "Translate to French: good morning",
          "### Instruction:\n### Response:\nsystem user assistant"] * 3
CHATML_JINJA = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CONV = [{"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "Two plus two is four."},
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "I am fine, thank you."}]


def _make_tokenizer(chat_template: str | None = None, add_bos: bool = False):
    from lora_scripts.testing import build_tiny_tokenizer

    return build_tiny_tokenizer(CORPUS, chat_template=chat_template, add_bos=add_bos)


@pytest.fixture(scope="module")
def tok():  # no chat template, adds no BOS (like Qwen)
    return _make_tokenizer()


@pytest.fixture(scope="module")
def tok_jinja():  # has a ChatML Jinja chat template
    return _make_tokenizer(CHATML_JINJA)


@pytest.fixture(scope="module")
def tok_bos():  # adds BOS when encoding with special tokens (like LLaMA)
    return _make_tokenizer(add_bos=True)


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _at(path: Path, line: int) -> str:
    """Regex for the ``file:line`` prefix of an error message."""
    return re.escape(f"{path}:{line}")


def _spans(labels: list[int]) -> list[tuple[int, int]]:
    """Contiguous runs of trained labels as (start, end)."""
    spans, start = [], None
    for i, lab in enumerate(labels + [td.IGNORE_INDEX]):
        if lab != td.IGNORE_INDEX and start is None:
            start = i
        elif lab == td.IGNORE_INDEX and start is not None:
            spans.append((start, i))
            start = None
    return spans


SAMPLES = {
    "alpaca": {"instruction": "Translate", "input": "good morning", "output": "bonjour"},
    "sharegpt": {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "hi"},
                                   {"from": "gpt", "value": "hello"}]},
    "messages": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    "text": {"text": "hello there"},
}
EXPECTED_TURNS = {
    "alpaca": [{"role": "user", "content": "Translate\n\ngood morning"}, {"role": "assistant", "content": "bonjour"}],
    "sharegpt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                 {"role": "assistant", "content": "hello"}],
    "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
    "text": [{"role": "text", "content": "hello there"}],
}


@pytest.mark.parametrize("ext", [".jsonl", ".json"])
@pytest.mark.parametrize("fmt", list(SAMPLES))
def test_every_format_autodetected_and_normalised(tmp_path, fmt, ext):
    if ext == ".jsonl":
        path = _jsonl(tmp_path / "d.jsonl", [SAMPLES[fmt], "", SAMPLES[fmt]])
    else:
        (path := tmp_path / "d.json").write_text(json.dumps([SAMPLES[fmt]] * 2, indent=1))
    records = td.load_records(path)
    lines = path.read_text().split("\n")
    assert [r.line for r in records] == [1, 3] if ext == ".jsonl" else [lines.index(" {", i) + 1 for i in (0, 2)]
    assert td.resolve_format(records, "auto") == fmt == td.detect_format(records[0])
    assert td.resolve_format(records, fmt) == fmt
    assert td.normalize_record(records[0], fmt) == EXPECTED_TURNS[fmt]


def test_json_file_errors_name_the_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[\n  {"text": "a"},\n  {"text": oops}\n]')
    with pytest.raises(DataError, match=rf"{_at(bad, 3)}: invalid JSON"):
        td.load_records(bad)
    (tmp_path / "obj.json").write_text('{"text": "a"}')
    with pytest.raises(DataError, match="list of objects"):
        td.load_records(tmp_path / "obj.json")


def test_csv_alpaca_and_messages_cell(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('instruction,input,output\nTranslate,good morning,bonjour\n"Say hi",,hello\n')
    records = td.load_records(path)
    assert [r.line for r in records] == [2, 3]
    assert td.resolve_format(records) == "alpaca"
    assert td.normalize_record(records[0], "alpaca") == EXPECTED_TURNS["alpaca"]
    assert td.normalize_record(records[1], "alpaca")[0] == {"role": "user", "content": "Say hi"}
    msgs = tmp_path / "m.csv"
    msgs.write_text('messages\n"' + json.dumps(SAMPLES["messages"]["messages"]).replace('"', '""') + '"\n')
    assert td.normalize_record(td.load_records(msgs)[0], "messages") == EXPECTED_TURNS["messages"]
    (tmp_path / "extra.csv").write_text("text\na,b\n")
    with pytest.raises(DataError, match=r"extra.csv:2: more cells"):
        td.load_records(tmp_path / "extra.csv")


def test_txt_one_sample_per_nonempty_line(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("first line\n\n  \nsecond line\n")
    records = td.load_records(path)
    assert [(r.line, r.data) for r in records] == [(1, {"text": "first line"}), (4, {"text": "second line"})]
    assert td.resolve_format(records) == "text"


def test_parquet_reads(tmp_path):
    import pyarrow as pa  # a test extra, so the real read path always runs
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([SAMPLES["alpaca"], SAMPLES["alpaca"]]), path)
    records = td.load_records(path)
    assert [r.line for r in records] == [1, 2] and td.resolve_format(records) == "alpaca"


def test_load_text_dataset_file_or_folder(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    _jsonl(folder / "b.jsonl", [SAMPLES["text"]])
    (folder / "a.txt").write_text("one\ntwo\n")
    (folder / "notes.md").write_text("ignored")
    records = td.load_text_dataset(folder, None)
    assert [(r.source.name, r.line) for r in records] == [("a.txt", 1), ("a.txt", 2), ("b.jsonl", 1)]
    assert len(td.load_text_dataset(None, folder / "b.jsonl")) == 1
    (folder / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no samples"):
        td.load_text_dataset(None, folder / "empty.jsonl")
    (tmp_path / "none").mkdir()
    with pytest.raises(DataError, match="no data files"):
        td.load_text_dataset(tmp_path / "none", None)
    with pytest.raises(DataError, match="not found"):
        td.load_text_dataset(tmp_path / "missing", None)


def test_unknown_extension_and_malformed_json_line(tmp_path):
    (tmp_path / "d.xml").write_text("<a/>")
    with pytest.raises(DataError, match=r"unsupported file type '.xml'.*\.jsonl.*\.parquet"):
        td.load_records(tmp_path / "d.xml")
    path = _jsonl(tmp_path / "d.jsonl", [SAMPLES["text"], SAMPLES["text"], '{"text": "broken'])
    with pytest.raises(DataError, match=rf"^{_at(path, 3)}: invalid JSON \(Unterminated string"):
        td.load_records(path)


def test_undetectable_or_mixed_formats_rejected(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=rf"{_at(path, 1)}: cannot detect.*\['answer', 'question'\].*alpaca.*sharegpt"):
        td.resolve_format(td.load_records(path))
    with pytest.raises(DataError, match="unknown data_format"):
        td.resolve_format(td.load_records(path), "openai")
    path = _jsonl(tmp_path / "d.jsonl", [SAMPLES["alpaca"], SAMPLES["text"]])
    with pytest.raises(DataError, match=rf"{_at(path, 2)}: record looks like text.*{_at(path, 1)}\) is alpaca"):
        td.resolve_format(td.load_records(path))


@pytest.mark.parametrize("row, fmt, message", [
    ({"instruction": "x"}, "alpaca", r"missing field 'output'"),
    ({"output": "x"}, "alpaca", r"missing field 'instruction'"),
    ({"text": "x"}, "messages", r"missing field 'messages'"),
    ({"conversations": [{"from": "human"}]}, "sharegpt", r"conversations\[0\] needs fields 'from' and 'value'"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages", r"must be a string"),
    # role tool is read now (issue 16); a tool turn needs an assistant's tool_calls before it
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages", r"messages\[0\] is 'tool' where 'user'"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages", r"unsupported role 'robot'"),
    ({"messages": []}, "messages", r"empty conversation"),
    ({"conversations": [{"from": "system", "value": "s"}]}, "sharegpt", r"empty conversation"),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "u"}]}, "messages",
     r"messages\[0\] is 'assistant' where 'user' was expected"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}, "sharegpt",
     r"conversations\[1\] is 'user' where 'assistant' was expected"),
    ({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"},
                   {"role": "system", "content": "s"}]}, "messages", r"messages\[2\] is 'system'"),
    ({"messages": [{"role": "user", "content": "u"}]}, "messages", r"must end with an assistant turn"),
    ({"text": "   "}, "text", r"empty 'text'"),
])
def test_bad_records_name_file_and_line(tmp_path, row, fmt, message):
    path = _jsonl(tmp_path / "d.jsonl", [SAMPLES[fmt], row])
    records = td.load_records(path)
    with pytest.raises(DataError, match=rf"^{_at(path, 2)}: .*{message}"):
        td.normalize_record(records[1], td.resolve_format(records, fmt))


def test_tokenizer_template_requested_but_missing(tmp_path, tok, tok_jinja):
    path = _jsonl(tmp_path / "d.jsonl", [SAMPLES["messages"]])
    records = td.load_records(path)
    with pytest.raises(DataError, match=rf"^{_at(path, 1)}: chat_template is 'tokenizer' but the tokenizer has no"):
        td.tokenize_dataset(records, tok, chat_template="tokenizer")
    with pytest.raises(DataError, match=rf"^{_at(path, 1)}: unknown chat_template 'vicuna'"):
        td.tokenize_dataset(records, tok, chat_template="vicuna")
    samples, _ = td.tokenize_dataset(records, tok_jinja, chat_template="tokenizer")
    assert samples[0].input_ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "hi": 2, "hello": 3}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    bare = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>")
    with pytest.raises(DataError, match=rf"^{_at(path, 1)}: chat_template 'llama3' needs .*<\|begin_of_text\|>"):
        td.tokenize_dataset(records, bare, chat_template="llama3")
    assert td.tokenize_dataset(records, bare, chat_template="alpaca")[0][0].input_ids[-1] == 1


def test_non_incremental_jinja_template_refused(tok):
    # Renders the number of messages first, so a longer conversation does not extend a shorter one.
    template = "{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    # Since issue 16 a prompt that renders differently once answered is trained as prompt + rendered answer (Mistral);
    # this template has no end-of-turn marker either, so it is still refused, for that reason.
    with pytest.raises(DataError, match="incrementally|no end-of-turn token"):
        td.render_conversation(CONV, tok, template, False, 512)


_END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "alpaca": "</s>", "auto": "<|im_end|>"}


@pytest.mark.parametrize("template, which", [("chatml", "tok"), ("llama3", "tok"), ("alpaca", "tok"),
                                             ("alpaca", "tok_bos"), ("auto", "tok_jinja"), ("auto", "tok")])
def test_end_of_turn_marker_ends_every_assistant_turn_and_is_trained(request, template, which):
    # Issue 16 changed this: the template's own end-of-turn marker (<|im_end|>, <|eot_id|>; the alpaca template
    # renders EOS) ends each trained span; no EOS is inserted after it, and whitespace after it stays in the ids.
    tokenizer = request.getfixturevalue(which)
    out = td.render_conversation(CONV, tokenizer, template, train_on_prompt=False, max_seq_length=512)
    spans = _spans(out.labels)
    answers = [t["content"] for t in CONV if t["role"] == "assistant"]
    marker = tokenizer.convert_tokens_to_ids(_END_OF_TURN[template])
    assert len(spans) == len(answers) and not out.truncated
    for (start, end), answer in zip(spans, answers):
        assert out.input_ids[end - 1] == marker == out.labels[end - 1]
        assert out.labels[start:end] == out.input_ids[start:end]
        assert tokenizer.decode(out.input_ids[start:end]).startswith(answer)
    if template != "alpaca":
        assert tokenizer.eos_token_id not in out.input_ids
    # ids are exactly the template's rendering
    text = tokenizer.apply_chat_template(CONV, chat_template=td.resolve_template(tokenizer, template).text,
                                         tokenize=False, add_bos=which == "tok_bos")
    assert out.input_ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    # everything outside the answers (system, user, role headers) is masked
    assert sum(e - s for s, e in spans) == sum(lab != td.IGNORE_INDEX for lab in out.labels)
    prompt = tokenizer.decode([i for i, lab in zip(out.input_ids, out.labels) if lab == td.IGNORE_INDEX])
    assert "What is two plus two?" in prompt and "Two plus two is four." not in prompt
    first = out.input_ids[0]
    if template == "llama3":
        assert first == tokenizer.convert_tokens_to_ids("<|begin_of_text|>")
    elif which == "tok_bos":
        assert first == tokenizer.bos_token_id
    else:
        assert tokenizer.bos_token_id not in out.input_ids


def test_train_on_prompt_unmasks_everything(tok, tok_jinja):
    for tokenizer, template, marker in ((tok, "chatml", "<|im_end|>"), (tok, "llama3", "<|eot_id|>"),
                                        (tok_jinja, "auto", "<|im_end|>")):
        out = td.render_conversation(CONV, tokenizer, template, train_on_prompt=True, max_seq_length=512)
        assert out.labels == out.input_ids and out.input_ids.count(tokenizer.convert_tokens_to_ids(marker)) == 5


def test_tokenizer_jinja_template_matches_builtin_chatml(tok, tok_jinja):
    # Same vocabulary, so the incremental Jinja rendering must give exactly the built-in ChatML tokens and mask.
    own = td.render_conversation(CONV, tok_jinja, "auto", False, 512)
    builtin = td.render_conversation(CONV, tok, "chatml", False, 512)
    fallback = td.render_conversation(CONV, tok, "auto", False, 512)  # no template: auto falls back to chatml
    assert own == builtin == fallback
    assert tok.decode(own.input_ids).startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")


def test_text_format_bos_text_eos_all_trained(tok, tok_bos):
    turns = [{"role": "text", "content": "hello there"}]
    body = tok("hello there", add_special_tokens=False)["input_ids"]
    plain = td.render_conversation(turns, tok, "auto", False, 512)
    assert plain.input_ids == body + [tok.eos_token_id] and plain.labels == plain.input_ids
    with_bos = td.render_conversation(turns, tok_bos, "auto", False, 512)
    assert with_bos.input_ids == [tok_bos.bos_token_id] + body + [tok_bos.eos_token_id]
    assert with_bos.labels == with_bos.input_ids


def test_truncation_flagged_and_counted(tmp_path, tok):
    path = _jsonl(tmp_path / "d.jsonl", [{"messages": CONV[1:3]}, {"messages": CONV}])
    full, _ = td.tokenize_dataset(td.load_records(path), tok, max_seq_length=512)
    limit = len(full[0]) + 1
    samples, stats = td.tokenize_dataset(td.load_records(path), tok, max_seq_length=limit)
    assert [s.truncated for s in samples] == [False, True]
    assert len(samples[1]) == limit and samples[1].input_ids == full[1].input_ids[:limit]
    assert (stats.samples, stats.truncated) == (2, 1)
    assert stats.tokens == len(full[0]) + limit
    assert stats.trained_tokens == sum(lab != td.IGNORE_INDEX for s in samples for lab in s.labels)
    assert "1 truncated" in stats.summary()


def _samples(lengths: list[int]) -> list[td.Tokenized]:
    out = []
    for n, length in enumerate(lengths):
        ids = [10 + n] * length
        out.append(td.Tokenized(ids, [td.IGNORE_INDEX] * (length // 2) + ids[length // 2:]))
    return out


def test_pack_rows_fit_restart_positions_and_keep_labels_aligned():
    samples = _samples([7, 3, 5, 2, 8, 4, 1, 6])
    rows = td.pack(samples, max_seq_length=10)
    assert all(len(r.input_ids) == len(r.labels) == len(r.position_ids) == sum(r.seq_lens) <= 10 for r in rows)
    assert len(rows) == 4  # 36 tokens: best fit fills rows of 10 nearly perfectly
    seen = []
    for r in rows:
        start = 0
        for n in r.seq_lens:
            ids, labels = r.input_ids[start:start + n], r.labels[start:start + n]
            sample = samples[ids[0] - 10]
            assert ids == sample.input_ids and r.position_ids[start:start + n] == list(range(n))
            assert labels == [td.IGNORE_INDEX] + sample.labels[1:]  # first label masked: no cross-sample target
            seen.append(ids[0] - 10)
            start += n
    assert sorted(seen) == list(range(len(samples)))
    with pytest.raises(ValueError, match="exceeds max_seq_length"):
        td.pack(_samples([11]), 10)


def test_collate_padded():
    padded = td.collate_padded(_samples([4, 2]), pad_id=0)
    assert padded["input_ids"].tolist() == [[10, 10, 10, 10], [11, 11, 0, 0]]
    assert padded["labels"].tolist() == [[-100, -100, 10, 10], [-100, 11, -100, -100]]
    assert padded["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


def test_length_grouped_order_groups_similar_lengths():
    lengths = np.random.default_rng(0).integers(1, 500, size=1000).tolist()
    order = td.length_grouped_order(lengths, batch_size=4, rng=np.random.default_rng(1))
    assert sorted(order) == list(range(1000))
    assert order == td.length_grouped_order(lengths, 4, np.random.default_rng(1))  # seeded: reproducible
    mega = 4 * 50
    for start in range(0, 1000, mega):
        chunk = [lengths[i] for i in order[start:start + mega]]
        assert chunk == sorted(chunk, reverse=True)
    def padding(idx: list[int]) -> int:
        return sum(4 * max(lengths[i] for i in idx[b:b + 4]) - sum(lengths[i] for i in idx[b:b + 4])
                   for b in range(0, 1000, 4))

    assert padding(order) < padding(np.random.default_rng(1).permutation(1000).tolist()) / 10


def _per_sample_losses(logits: torch.Tensor, labels: torch.Tensor, seq_lens: list[int]) -> list[float]:
    """Summed next-token loss of each sample span (targets at positions start..start+n-1)."""
    token_loss = torch.nn.functional.cross_entropy(
        logits[0, :-1].double(), labels[0, 1:], ignore_index=td.IGNORE_INDEX, reduction="none")
    token_loss = torch.cat([token_loss.new_zeros(1), token_loss])  # index t = loss of predicting token t
    out, start = [], 0
    for n in seq_lens:
        out.append(token_loss[start:start + n].sum().item())
        start += n
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager", "varlen"])
def test_flat_packing_without_mask_keeps_each_samples_loss(tok, attn):
    """collate_flat (no mask tensor, position ids restarting per sample; what the text task trains with) gives
    each sample the loss it has alone, under SDPA (the default), eager attention and the per-sample SDPA that packed
    runs use on CPU (issue 16 point 7)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_scripts.tasks.packed_attention import register

    attn = register() if attn == "varlen" else attn

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM._from_config(config, attn_implementation=attn).eval()
    convs = [CONV, CONV[1:3], [{"role": "text", "content": "hello there, how are you today?"}], CONV[3:5]]
    samples = [td.render_conversation(c, tok, "chatml", False, 128) for c in convs]
    rows = td.pack(samples, max_seq_length=128) + [td.PackedRow([5, 6], [td.IGNORE_INDEX] * 2, [0, 1], [2])]
    batch = td.collate_flat(rows, pad_id=tok.pad_token_id)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no L x L mask tensor
    lens, start, order = rows[0].seq_lens, 0, []
    for n in lens:
        order.append(next(s for s in samples if s.input_ids == rows[0].input_ids[start:start + n]))
        start += n
    with torch.no_grad():
        alone = [_per_sample_losses(model(input_ids=torch.tensor([s.input_ids])).logits,
                                    torch.tensor([s.labels]), [len(s)])[0] for s in order]
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    assert torch.isfinite(logits).all()
    assert _per_sample_losses(logits[:1], batch["labels"][:1], lens) == pytest.approx(alone, abs=1e-5)

"""Template-exact rendering with real chat templates (issue 16 points 1-2).

Each model's published template is attached to a tiny tokenizer that has the model's special tokens. For every
template: ``input_ids`` equal the template's own rendering; labels cover each assistant turn's content and the
template's own end-of-turn marker and nothing else; where the template has ``{% generation %}`` blocks the labels
equal transformers' ``return_assistant_tokens_mask``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_scripts.data import chat
from lora_scripts.data import text as td
from lora_scripts.errors import DataError
from lora_scripts.testing import CHATML_JINJA, build_tiny_tokenizer

TEMPLATES = Path(__file__).parent / "chat_templates"
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
TURNS = [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Two plus two is four."},
         {"role": "user", "content": "hello there"}, {"role": "assistant", "content": "I am fine, thank you."}]
# family: (template file, special tokens, bos, eos, system supported)
FAMILIES = {
    "llama3.1": ("meta-llama-Llama-3.1-8B-Instruct.jinja", ("<|eom_id|>", "<|python_tag|>"), "<|begin_of_text|>",
                 "<|eot_id|>", True),
    # a Qwen2.5 checkpoint whose EOS is not <|im_end|> (base models): the case the old renderer broke
    "qwen2.5": ("Qwen-Qwen2.5-7B-Instruct.jinja", ("<|endoftext|>",), "<s>", "<|endoftext|>", True),
    "qwen3": ("Qwen-Qwen3-0.6B.jinja", ("<|endoftext|>", "<think>", "</think>"), "<s>", "<|im_end|>", True),
    "glm4.6": ("GLM-4.6.jinja", ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
                                 "<think>", "</think>"), "<s>", "<|endoftext|>", True),
    "gemma2": ("google-gemma-2-2b-it.jinja", ("<start_of_turn>", "<end_of_turn>"), "<bos>", "<eos>", False),
    "mistral-nemo": ("mistralai-Mistral-Nemo-Instruct-2407.jinja", ("[INST]", "[/INST]", "[TOOL_CALLS]",
                     "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"), "<s>", "</s>",
                     True),
}
# what each template trains for an assistant turn that is not the last: (before content, after content)
TRAINED = {"llama3.1": ("", "<|eot_id|>"), "qwen2.5": ("", "<|im_end|>"), "glm4.6": ("\n<think></think>\n", "<|user|>"),
           "gemma2": ("", "<end_of_turn>"), "mistral-nemo": ("", "</s>"),
           "qwen3": ("<think>\n\n</think>\n\n", "<|im_end|>")}


@pytest.fixture(scope="module")
def tokenizers():
    cache = {}

    def get(family: str):
        if family not in cache:
            file, specials, bos, eos, _ = FAMILIES[family]
            cache[family] = build_tiny_tokenizer(chat_template=(TEMPLATES / file).read_text(), add_bos=False,
                                                 extra_special_tokens=specials, bos_token=bos, eos_token=eos)
        return cache[family]

    return get


def _spans(labels: list[int]) -> list[tuple[int, int]]:
    spans, start = [], None
    for i, lab in enumerate(labels + [chat.IGNORE_INDEX]):
        if lab != chat.IGNORE_INDEX and start is None:
            start = i
        elif lab == chat.IGNORE_INDEX and start is not None:
            spans.append((start, i))
            start = None
    return spans


def _own_ids(tok, turns, **kwargs) -> list[int]:
    text = tok.apply_chat_template(turns, tokenize=False, **kwargs)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    enc = tok.apply_chat_template(turns, tokenize=True, return_dict=True, **kwargs)
    assert list(enc["input_ids"]) == ids  # what transformers itself gives
    return ids


def _trained_texts(tok, sample: chat.Tokenized) -> list[str]:
    return [tok.decode(sample.input_ids[s:e]) for s, e in _spans(sample.labels)]


@pytest.mark.parametrize("family", ["llama3.1", "qwen2.5", "glm4.6", "gemma2"])
@pytest.mark.parametrize("turns", ["single", "multi"])
def test_ids_equal_the_template_and_labels_cover_answers_and_end_marker(tokenizers, family, turns):
    tok = tokenizers(family)
    conv = (TURNS[:2] if turns == "single" else TURNS)
    conv = ([SYSTEM] if FAMILIES[family][4] else []) + conv
    samples = td.render_samples(conv, tok)
    assert len(samples) == 1
    sample = samples[0]
    own = _own_ids(tok, conv)
    before, after = TRAINED[family]
    answers = [t["content"] for t in conv if t["role"] == "assistant"]
    if family == "glm4.6":
        # GLM ends a turn with the next turn's <|user|> (a stop token); after the last turn the template renders
        # nothing, so that marker is appended: the ids are the rendering of the conversation continued by a user
        assert sample.input_ids == own + [tok.convert_tokens_to_ids("<|user|>")]
        more = _own_ids(tok, conv + [{"role": "user", "content": "z"}])
        assert more[: len(sample.input_ids)] == sample.input_ids
    else:
        assert sample.input_ids == own
    assert _trained_texts(tok, sample) == [before + a + after for a in answers]
    assert tok.eos_token not in tok.decode(sample.input_ids) or after == tok.eos_token  # no inserted EOS
    if family == "qwen2.5":
        assert tok.decode(sample.input_ids[-1:]) == "\n"  # the template's final newline is kept (not trained)


def test_mistral_moves_the_system_prompt_so_each_turn_is_its_own_sequence(tokenizers):
    tok = tokenizers("mistral-nemo")
    conv = [SYSTEM] + TURNS
    samples = td.render_samples(conv, tok)
    assert len(samples) == 2  # the template puts the system prompt into the last user turn only
    for k, sample in zip((2, 4), samples):
        # what inference sees: the prompt as rendered for generation, then the answer as the template renders it
        prompt = tok.apply_chat_template(conv[:k], tokenize=False, add_generation_prompt=True)
        assert tok.decode(sample.input_ids) == prompt + conv[k]["content"] + "</s>"
        assert _trained_texts(tok, sample) == [conv[k]["content"] + "</s>"]
    assert "You are a helpful assistant." in tok.decode(samples[0].input_ids)


def test_qwen3_multi_turn_keeps_each_turns_thinking(tokenizers):
    tok = tokenizers("qwen3")
    conv = [SYSTEM, TURNS[0], {**TURNS[1], "reasoning_content": "2 + 2 = 4"}, TURNS[2], TURNS[3]]
    samples = td.render_samples(conv, tok)
    assert len(samples) == 2  # history drops <think> blocks: one sequence per assistant turn, as at inference
    first, second = samples
    assert first.input_ids == _own_ids(tok, conv[:3])
    assert _trained_texts(tok, first) == ["<think>\n2 + 2 = 4\n</think>\n\nTwo plus two is four.<|im_end|>"]
    assert second.input_ids == _own_ids(tok, conv)
    assert _trained_texts(tok, second) == ["<think>\n\n</think>\n\nI am fine, thank you.<|im_end|>"]
    assert "2 + 2 = 4" not in tok.decode(second.input_ids)  # as the template renders the history


def test_qwen3_enable_thinking_false(tokenizers):
    tok = tokenizers("qwen3")
    conv = [SYSTEM] + TURNS
    template = chat.resolve_template(tok, "auto", variables={"enable_thinking": False})
    samples = td.render_samples(conv, tok, template=template)
    for k, sample in zip((2, 4), samples):
        assert sample.input_ids == _own_ids(tok, conv[: k + 1], enable_thinking=False)
        assert _trained_texts(tok, sample) == [conv[k]["content"] + "<|im_end|>"]  # the empty think is prompt
    prompt = chat.generation_prompt_ids(conv[:1] + TURNS[:1], tok, template)
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    with pytest.raises(DataError, match="enable_thinking is false"):
        td.render_samples(conv[:2] + [{**TURNS[1], "reasoning_content": "r"}], tok, template=template)


def test_glm_single_turn_reasoning_is_trained(tokenizers):
    tok = tokenizers("glm4.6")
    conv = [TURNS[0], {**TURNS[1], "reasoning_content": "add"}]
    (sample,) = td.render_samples(conv, tok)
    assert _trained_texts(tok, sample) == ["\n<think>add</think>\nTwo plus two is four.<|user|>"]


GENERATION_CHATML = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_labels_equal_return_assistant_tokens_mask():
    tok = build_tiny_tokenizer(chat_template=GENERATION_CHATML)
    conv = [SYSTEM] + TURNS
    sample = td.render_conversation(conv, tok)
    enc = tok.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert sample.input_ids == list(enc["input_ids"])
    assert [lab != chat.IGNORE_INDEX for lab in sample.labels] == [bool(m) for m in enc["assistant_masks"]]
    # our own span finder (the same template without the tags) gives the same labels
    plain = build_tiny_tokenizer(chat_template=CHATML_JINJA)
    assert td.render_conversation(conv, plain).labels == sample.labels


def test_template_without_end_of_turn_marker_is_refused():
    tok = build_tiny_tokenizer(chat_template="{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}"
                               "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    with pytest.raises(DataError, match="no end-of-turn token"):
        td.render_conversation(TURNS[:2], tok)

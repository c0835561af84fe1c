"""Packed rows without an L x L mask (lora_scripts.tasks.packed_attention): every sample in a packed batch gets the
loss and the gradient it gets alone, transformers builds no block mask, and everything that is not a packed forward
(padding masks, generation with a KV cache) runs exactly like SDPA."""

from __future__ import annotations

import pytest
import torch

from lora_scripts.data import text as td
from lora_scripts.tasks.packed_attention import VARLEN_SDPA, packed_attention_for, register


def _llama(attn: str, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    register()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
                         **overrides)  # 4 query heads on 2 key/value heads: the GQA path too
    return LlamaForCausalLM._from_config(config, attn_implementation=attn)


def _random_samples(lengths: list[int], seed: int = 0) -> list[td.Tokenized]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(1, 64, (n,), generator=g).tolist()
        out.append(td.Tokenized(ids, [td.IGNORE_INDEX] * (n // 3) + ids[n // 3:]))
    return out


def _summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             ignore_index=td.IGNORE_INDEX, reduction="sum")


@pytest.mark.parametrize("flatten", [False, True], ids=["rows", "one-row"])
def test_packed_batch_gives_each_sample_its_own_loss_and_gradient(flatten):
    model = _llama(VARLEN_SDPA)
    samples = _random_samples([9, 3, 14, 6, 11, 2, 7])
    rows = td.pack(samples, max_seq_length=20)
    assert len(rows) >= 3 and any(len(r.input_ids) < 20 for r in rows)  # several rows, some padded
    batch = td.collate_flat(rows, pad_id=0, flatten=flatten)
    assert batch["input_ids"].shape == ((1, sum(map(len, samples))) if flatten else (len(rows), 20))  # no pads
    _summed_loss(model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits,
                 batch["labels"]).backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    alone_loss = 0.0
    for s in samples:  # each alone, its first label dropped as pack() does (no sample predicts another's token)
        loss = _summed_loss(model(input_ids=torch.tensor([s.input_ids])).logits,
                            torch.tensor([[td.IGNORE_INDEX] + s.labels[1:]]))
        loss.backward()
        alone_loss += loss.item()
    for name, param in model.named_parameters():
        torch.testing.assert_close(packed[name], param.grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    with torch.no_grad():
        again = _summed_loss(model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                   use_cache=False).logits, batch["labels"])
    assert again.item() == pytest.approx(alone_loss, rel=1e-5)
    # the control: plain causal attention over the same rows lets samples see each other
    with torch.no_grad():
        leaky = _summed_loss(model(input_ids=batch["input_ids"], use_cache=False).logits, batch["labels"])
    assert abs(leaky.item() - alone_loss) > 1e-2


def test_sample_boundaries_are_read_once_per_forward(monkeypatch):
    """Reading the boundaries is a host sync (nonzero + tolist): once per forward, not once per layer; a new
    position-id tensor is read anew."""
    from lora_scripts.tasks import packed_attention

    calls = []
    original = packed_attention.segment_lengths
    monkeypatch.setattr(packed_attention, "segment_lengths", lambda ids: calls.append(1) or original(ids))
    model = _llama(VARLEN_SDPA)  # two layers
    batch = td.collate_flat(td.pack(_random_samples([5, 7, 4]), max_seq_length=16), pad_id=0)
    model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    assert len(calls) == 1
    model(input_ids=batch["input_ids"], position_ids=batch["position_ids"].clone(), use_cache=False)
    assert len(calls) == 2


@pytest.mark.parametrize("attn", ["sdpa", "eager", VARLEN_SDPA])
def test_a_model_that_ignores_position_ids_is_found_to_leak(attn):
    """transformers' models keep packed samples apart on every attention implementation; one whose own forward
    drops the position ids (as remote code with its own attention does) lets them attend to each other."""
    from lora_scripts.tasks.packed_attention import leaks_across_samples

    model = _llama(attn)

    class DropsPositions(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def get_input_embeddings(self):
            return model.get_input_embeddings()

        def forward(self, input_ids, position_ids=None, **kwargs):
            return self.inner(input_ids=input_ids, **kwargs)

    assert not leaks_across_samples(model, torch.device("cpu"))
    assert model.training  # its mode is restored
    assert leaks_across_samples(DropsPositions(), torch.device("cpu"))


def test_no_block_mask_is_built_for_packed_rows():
    """transformers' SDPA path turns restarting position ids into a [B, 1, L, L] mask; ours into none."""
    from transformers.masking_utils import create_causal_mask

    batch = td.collate_flat(td.pack(_random_samples([5, 7, 4]), max_seq_length=16), pad_id=0)
    embeds = torch.zeros(*batch["input_ids"].shape, 32)
    masks = {attn: create_causal_mask(config=_llama(attn).config, inputs_embeds=embeds, attention_mask=None,
                                      past_key_values=None, position_ids=batch["position_ids"])
             for attn in ("sdpa", VARLEN_SDPA)}
    assert masks["sdpa"].shape == (1, 1, 16, 16) and masks[VARLEN_SDPA] is None


def test_padding_masks_and_generation_run_exactly_like_sdpa():
    """Validation batches (right-padded, 2-D mask) and sample generation (KV cache) fall back to SDPA."""
    sdpa, varlen = _llama("sdpa").eval(), _llama(VARLEN_SDPA).eval()
    padded = td.collate_padded(_random_samples([6, 10, 3]), pad_id=0)
    prompt = torch.tensor([_random_samples([5], seed=1)[0].input_ids])
    with torch.no_grad():
        logits = [m(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
                  for m in (sdpa, varlen)]
        generated = [m.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                                do_sample=False, pad_token_id=0) for m in (sdpa, varlen)]
    torch.testing.assert_close(logits[0], logits[1])
    assert torch.equal(generated[0], generated[1])


def test_models_with_more_than_causal_attention_keep_transformers_masks():
    from transformers import Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert packed_attention_for(LlamaConfig(), cpu, torch.float32) == VARLEN_SDPA
    assert packed_attention_for(Qwen2Config(), cpu, torch.float32) == VARLEN_SDPA  # sliding window switched off
    assert packed_attention_for(MistralConfig(sliding_window=None), cpu, torch.float32) == VARLEN_SDPA
    assert packed_attention_for(MistralConfig(sliding_window=4096), cpu, torch.float32) is None
    assert packed_attention_for(Gemma2Config(), cpu, torch.float32) is None  # sliding layers and soft-capping
    from transformers.utils import is_flash_attn_2_available

    expected = "flash_attention_2" if is_flash_attn_2_available() else VARLEN_SDPA
    assert packed_attention_for(LlamaConfig(), cuda, torch.bfloat16) == expected
    assert packed_attention_for(LlamaConfig(), cuda, torch.float32) == VARLEN_SDPA  # flash-attn needs half precision


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "glm", "mistral", "phi3", "gpt2"])
def test_each_text_family_reads_samples_from_position_ids(family):
    """Every family with default LoRA targets in the text task hands position ids to its attention (GPT-2 through
    **kwargs), so a packed forward gives each sample the logits it has alone."""
    import transformers

    register()
    size = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    configs = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config", "glm": "GlmConfig",
               "mistral": "MistralConfig", "phi3": "Phi3Config"}
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    else:
        extra = {"glm": {"head_dim": 8}, "mistral": {"sliding_window": None}}.get(family, {})  # Mistral v0.2+
        config = getattr(transformers, configs[family])(**size, **extra)
    assert packed_attention_for(config, torch.device("cpu"), torch.float32) == VARLEN_SDPA
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=VARLEN_SDPA).eval()
    rows = td.pack(_random_samples([7, 12, 5, 9]), max_seq_length=24)
    batch = td.collate_flat(rows, pad_id=0, flatten=True)
    pieces = batch["input_ids"][0].split([n for r in rows for n in r.seq_lens])  # the samples, in packed order
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        alone = torch.cat([model(input_ids=ids[None]).logits[0] for ids in pieces])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-4)

"""Attention for packed rows without an L x L mask: causal SDPA per sample, samples found from ``position_ids``.

Packed rows (:func:`lora_scripts.data.text.collate_flat`) carry no mask tensor; position ids restarting at 0 mark
where each sample begins. transformers 5.23 reads them (``masking_utils.find_packed_sequence_indices``), but outside
flash-attn it then materialises a boolean ``[B, 1, L, L]`` block mask and runs SDPA over the whole row: the cost of
attention is ``L**2`` per row instead of the sum of ``n**2`` over its samples, and a masked SDPA cannot use the
causal kernels. torch has no variable-length SDPA (its flash-attn varlen kernel is CUDA-only and private), and flex
attention has no backward on CPU, so this module writes the small missing piece:

* :data:`VARLEN_SDPA` is an attention implementation registered in transformers' ``AttentionInterface``; for a
  maskless, cacheless forward it splits the flattened tokens at the sample boundaries (``torch.split``: its backward
  is one concatenation) and runs each sample through transformers' own ``sdpa_attention_forward`` with
  ``is_causal=True`` (GQA, scaling and dropout stay transformers'). Anything else (a padding mask, decoding with a
  KV cache) is handed to plain SDPA unchanged.
* its entry in ``AttentionMaskInterface`` returns no mask for exactly that maskless, cacheless case, so transformers
  never builds the ``L x L`` tensor, and otherwise builds SDPA's usual mask.

:func:`packed_attention_for` picks what a packed run uses: flash-attn 2 (transformers' own varlen path from
``position_ids``) on a CUDA GPU with flash-attn installed and half precision, else :data:`VARLEN_SDPA`, as long as
every layer of the model is plain causal full attention (sliding windows, soft-capping and the like keep
transformers' masked SDPA, which knows them). With either, the task feeds a step's rows as one padding-free row
(``collate_flat(flatten=True)``): transformers' flash path reads samples from position ids only in a batch of one.

Measured (``benchmarks/text_packing_throughput.py``, docs/BENCHMARKS.md): packed rows on this module train at 1.47x
the real tokens per CPU-second of length-grouped padded batches, on transformers' masked SDPA at 0.61x. Flex
attention (a block mask) has no backward on CPU in torch 2.13.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

VARLEN_SDPA = "lora_scripts_varlen_sdpa"
# The position ids of the forward running now and their sample lengths: every layer (and every checkpoint
# recompute) gets the same tensor, so the host sync that reads the boundaries happens once per forward, not per layer.
_LAST_LENGTHS: list[Any] = [None, None, None]  # weakref to the tensor, (version, batch), lengths


def segment_lengths(position_ids: torch.Tensor) -> list[int]:
    """Lengths of the samples in ``[B, L]`` packed rows read left to right, rows concatenated: a sample starts at
    each row's first token and wherever the position does not follow the previous one (the rule transformers'
    ``find_packed_sequence_indices`` uses)."""
    batch, length = position_ids.shape
    starts = torch.ones(batch, length, dtype=torch.bool, device=position_ids.device)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    where = starts.reshape(-1).nonzero().flatten().tolist()  # the one host sync of a forward's layer
    return [b - a for a, b in zip(where, where[1:] + [batch * length])]


def _lengths_once(position_ids: torch.Tensor, batch: int) -> list[int]:
    """:func:`segment_lengths` of ``position_ids``, computed once while the same unchanged tensor comes back."""
    ref, key, lengths = _LAST_LENGTHS
    if ref is not None and ref() is position_ids and key == (position_ids._version, batch):
        return lengths
    lengths = segment_lengths(position_ids.expand(batch, -1))
    _LAST_LENGTHS[:] = [weakref.ref(position_ids), (position_ids._version, batch), lengths]
    return lengths


def varlen_sdpa_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None = None,
                        **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: ``query`` ``[B, H, L, D]``, ``key``/``value`` ``[B, Hkv, L, D]``;
    returns ``([B, L, H, D], None)`` like ``sdpa_attention_forward``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, length, _ = query.shape
    if attention_mask is not None or position_ids is None or key.shape[2] != length or length == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    for unsupported in ("sliding_window", "softcap", "position_bias"):  # packed_attention_for keeps such models out
        if kwargs.get(unsupported) is not None:
            raise NotImplementedError(f"{VARLEN_SDPA} does not implement {unsupported}; use attn_implementation=sdpa")
    lengths = _lengths_once(position_ids, batch)
    kwargs["is_causal"] = True
    if len(lengths) == batch:  # one sample per row: plain causal attention
        return sdpa_attention_forward(module, query, key, value, None, **kwargs)

    def tokens_first(t: torch.Tensor) -> tuple[torch.Tensor, ...]:  # [B, h, L, d] -> per sample [1, h, n, d]
        return t.transpose(0, 1).reshape(1, t.shape[1], batch * length, t.shape[-1]).split(lengths, dim=2)

    outputs = [sdpa_attention_forward(module, q, k, v, None, **kwargs)[0]
               for q, k, v in zip(tokens_first(query), tokens_first(key), tokens_first(value))]
    return torch.cat(outputs, dim=1).reshape(batch, length, heads, value.shape[-1]), None


def varlen_sdpa_mask(*, batch_size: int, q_length: int, kv_length: int, q_offset: Any = 0, kv_offset: Any = 0,
                     attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor | None:
    """No mask where :func:`varlen_sdpa_forward` works from ``position_ids`` (no padding mask, no cache); SDPA's
    own mask everywhere else."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and q_length == kv_length and isinstance(q_offset, int) and q_offset == 0 \
            and isinstance(kv_offset, int) and kv_offset == 0:
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, attention_mask=attention_mask, **kwargs)


def register() -> str:
    """Register :data:`VARLEN_SDPA` with transformers (idempotent) and return its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_forward)
    AttentionMaskInterface.register(VARLEN_SDPA, varlen_sdpa_mask)
    return VARLEN_SDPA


def plain_causal(config: Any) -> bool:
    """True when every layer is full causal attention with nothing the per-sample SDPA would drop (a sliding
    window, logit soft-capping, a non-causal or chunked layer)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not getattr(config, "is_causal", True):
        return False
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
        return False
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return False
    return not any(getattr(config, name, None) for name in ("attn_logit_softcapping", "attention_chunk_size"))


def packed_attention_for(config: Any, device: torch.device, dtype: torch.dtype) -> str | None:
    """The ``attn_implementation`` a packed run should load the model with, or None for transformers' default."""
    if not plain_causal(config):
        return None
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        from transformers.utils import is_flash_attn_2_available

        if is_flash_attn_2_available():
            return "flash_attention_2"  # transformers' varlen path from position_ids: one kernel for all samples
    return register()


def leaks_across_samples(model: torch.nn.Module, device: torch.device) -> bool:
    """Whether ``model`` lets packed samples see each other: one row of two 4-token samples (position ids restarting
    at 0) against the second sample alone. A model whose own code ignores position ids when it masks attention
    (ChatGLM3's remote code, say) fails; transformers' models on any attention implementation pass. Measured, since
    no attribute tells: a few tokens, run once before LoRA is attached."""
    vocab = model.get_input_embeddings().num_embeddings
    ids = (torch.arange(8, device=device) * 7 + 3) % vocab
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed = model(input_ids=ids[None], position_ids=torch.arange(8, device=device).remainder(4)[None],
                           use_cache=False).logits[0, 4:].float()
            alone = model(input_ids=ids[None, 4:], use_cache=False).logits[0].float()
    finally:
        model.train(was_training)
    # half precision and a different kernel move logits by ~1e-2 of their scale; attending to the first sample
    # changes them entirely
    return bool((packed - alone).abs().max() > 0.05 * alone.abs().max() + 1e-3)

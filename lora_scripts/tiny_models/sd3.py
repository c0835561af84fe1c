"""A tiny Stable Diffusion 3.5-shaped model (MMDiT with QK RMS-norm and one dual-attention block, as SD3.5 Medium;
16-channel VAE; CLIP-L, CLIP-G and T5 text encoders with offline tokenizers), and its transformer written in the
original single-file layout (``model.diffusion_model.joint_blocks.N.x_block.attn.qkv…``) as
``sd3.5_medium.safetensors`` / ``sd3.5_large.safetensors`` are downloaded.

The single-file layout is the inverse of diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers`` (which is
what loads it back), so a tiny file loads to the very weights of the folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..testing import COLOURS, SHAPES, TINY_RESOLUTION, write_tiny_clip_tokenizer

SINGLE_FILE_PREFIX = "model.diffusion_model."
T5_WORDS = ("a", "an", "of", "in", "the", "on", "style", "lora", "photo", "picture", "shape", *SHAPES, *COLOURS)


def write_tiny_t5_tokenizer(folder: Path) -> None:
    """A T5 (Unigram, SentencePiece-style) tokenizer over the demo's words plus single letters: ``<pad>`` 0,
    ``</s>`` 1, ``<unk>`` 2, as T5's own; written with ``save_pretrained`` (tokenizer.json), no sentencepiece model."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{word}", -1.0) for word in T5_WORDS]
    pieces += [(chr(c), -5.0) for c in range(ord("a"), ord("z") + 1)]
    pieces += [(f"▁{chr(c)}", -4.0) for c in range(ord("a"), ord("z") + 1) if f"▁{chr(c)}" not in dict(pieces)]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)
    tokenizer.save_pretrained(folder)


def make_tiny_model(folder: Path, seed: int = 0) -> Path:
    """Write a tiny SD3.5-shaped diffusers folder (model_index.json, transformer, vae, text_encoder{,_2,_3},
    tokenizer{,_2,_3}, scheduler) to ``folder``: about 0.6 M parameters, 16x16 latents for 32x32 images."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel,
                              T5Tokenizer)

    folder = Path(folder)
    torch.manual_seed(seed)
    for name in ("tokenizer", "tokenizer_2"):
        write_tiny_clip_tokenizer(folder / name)
    write_tiny_t5_tokenizer(folder / "tokenizer_3")
    clip_tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    t5_tokenizer = T5Tokenizer.from_pretrained(folder / "tokenizer_3")
    common = dict(
        vocab_size=len(clip_tokenizer), intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=clip_tokenizer.model_max_length, bos_token_id=clip_tokenizer.bos_token_id,
        eos_token_id=clip_tokenizer.eos_token_id, pad_token_id=clip_tokenizer.pad_token_id,
    )
    # CLIP-L and CLIP-G differ in width (768 / 1280 in the real model), so their concatenation is tested
    clip_l = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=16, projection_dim=16, **common))
    clip_g = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=32, projection_dim=32, **common))
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=64, d_kv=8, d_ff=64, num_layers=2,
                                 num_heads=4, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                                 pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    transformer = SD3Transformer2DModel(
        sample_size=TINY_RESOLUTION // 2, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32,
        pooled_projection_dim=16 + 32, pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm",
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32, 32), norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=TINY_RESOLUTION, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
        use_post_quant_conv=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    for name, module in (("transformer", transformer), ("vae", vae), ("text_encoder", clip_l),
                         ("text_encoder_2", clip_g), ("text_encoder_3", t5)):
        module.save_pretrained(folder / name)
    scheduler.save_pretrained(folder / "scheduler")
    model_index = {
        "_class_name": "StableDiffusion3Pipeline",
        "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_3": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "tokenizer_3": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "SD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2), encoding="utf-8")
    return folder


def _swap_halves(weight: torch.Tensor) -> torch.Tensor:
    """(shift, scale) <-> (scale, shift): diffusers' ``swap_scale_shift``, its own inverse."""
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def to_original_layout(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """A diffusers ``SD3Transformer2DModel`` state dict in the original MMDiT names (no prefix): the inverse of
    diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers``: q/k/v fused into ``qkv``, the final
    AdaLayerNormContinuous weights with shift and scale swapped back."""
    sd = dict(state)
    out: dict[str, torch.Tensor] = {}

    def move(src: str, dst: str) -> None:
        for kind in ("weight", "bias"):
            if f"{src}.{kind}" in sd:
                out[f"{dst}.{kind}"] = sd.pop(f"{src}.{kind}")

    out["pos_embed"] = sd.pop("pos_embed.pos_embed")
    move("pos_embed.proj", "x_embedder.proj")
    move("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0")
    move("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2")
    move("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0")
    move("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2")
    move("context_embedder", "context_embedder")
    for i in range(num_layers):
        src, dst = f"transformer_blocks.{i}", f"joint_blocks.{i}"
        for attn, block, names in (("attn", "x_block.attn", ("to_q", "to_k", "to_v")),
                                   ("attn", "context_block.attn", ("add_q_proj", "add_k_proj", "add_v_proj")),
                                   ("attn2", "x_block.attn2", ("to_q", "to_k", "to_v"))):
            if f"{src}.{attn}.{names[0]}.weight" not in sd:
                continue
            for kind in ("weight", "bias"):
                out[f"{dst}.{block}.qkv.{kind}"] = torch.cat([sd.pop(f"{src}.{attn}.{n}.{kind}") for n in names])
        for attn, block, (q, k) in (("attn", "x_block.attn", ("norm_q", "norm_k")),
                                    ("attn", "context_block.attn", ("norm_added_q", "norm_added_k")),
                                    ("attn2", "x_block.attn2", ("norm_q", "norm_k"))):
            move(f"{src}.{attn}.{q}", f"{dst}.{block}.ln_q")
            move(f"{src}.{attn}.{k}", f"{dst}.{block}.ln_k")
        move(f"{src}.attn.to_out.0", f"{dst}.x_block.attn.proj")
        move(f"{src}.attn.to_add_out", f"{dst}.context_block.attn.proj")
        move(f"{src}.attn2.to_out.0", f"{dst}.x_block.attn2.proj")
        move(f"{src}.norm1.linear", f"{dst}.x_block.adaLN_modulation.1")
        move(f"{src}.ff.net.0.proj", f"{dst}.x_block.mlp.fc1")
        move(f"{src}.ff.net.2", f"{dst}.x_block.mlp.fc2")
        move(f"{src}.ff_context.net.0.proj", f"{dst}.context_block.mlp.fc1")
        move(f"{src}.ff_context.net.2", f"{dst}.context_block.mlp.fc2")
        last = i == num_layers - 1  # the context stream's last block ends in AdaLayerNormContinuous (swapped)
        for kind in ("weight", "bias"):
            value = sd.pop(f"{src}.norm1_context.linear.{kind}")
            out[f"{dst}.context_block.adaLN_modulation.1.{kind}"] = _swap_halves(value) if last else value
    move("proj_out", "final_layer.linear")
    for kind in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{kind}"] = _swap_halves(sd.pop(f"norm_out.linear.{kind}"))
    if sd:
        raise ValueError(f"SD3 transformer tensors without an original name: {sorted(sd)[:3]}")
    return out


def write_single_file(model_dir: Path, path: Path) -> Path:
    """The transformer of the diffusers folder ``model_dir`` as a transformer-only single file in the original
    layout, with the ``model.diffusion_model.`` prefix of Stability AI's downloads."""
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import save_file

    transformer = SD3Transformer2DModel.from_pretrained(Path(model_dir) / "transformer")
    tensors = to_original_layout(transformer.state_dict(), transformer.config.num_layers)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({SINGLE_FILE_PREFIX + k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path

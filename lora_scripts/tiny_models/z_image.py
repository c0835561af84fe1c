"""A tiny Z-Image model (``ZImagePipeline`` layout): a single-stream ``ZImageTransformer2DModel`` (noise and context
refiners, then joint layers), a FLUX-style ``AutoencoderKL`` (4 latent channels here, 16 in the real model), a Qwen3
text encoder and a byte-level BPE tokenizer with Qwen3's chat template. Built from config objects, offline."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .qwen_image import build_qwen_tokenizer

# Qwen3's chat template reduced to what the pipeline renders (user turns, the generation prompt and the
# ``enable_thinking`` switch); ZImagePipeline renders it with enable_thinking=True, which adds nothing
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}")
TEXT_HIDDEN = 32
TRANSFORMER_CONFIG = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2,
                          n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=TEXT_HIDDEN, axes_dims=[4, 6, 6],
                          axes_lens=[256, 64, 64])
# Tongyi-MAI/Z-Image-Turbo scheduler/scheduler_config.json: a fixed shift of 3
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)


def build_tokenizer():
    """Qwen's special tokens over a small BPE, with the Qwen3 chat template the pipeline applies."""
    tokenizer = build_qwen_tokenizer()
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


def tiny_text_encoder(vocab_size: int, pad_token_id: int, eos_token_id: int):
    """A three-layer ``Qwen3Model`` (the pipeline reads the second-to-last hidden state)."""
    from transformers import Qwen3Config, Qwen3Model

    return Qwen3Model(Qwen3Config(
        vocab_size=vocab_size, hidden_size=TEXT_HIDDEN, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=2048,
        pad_token_id=pad_token_id, eos_token_id=eos_token_id, bos_token_id=None))


def tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32,
        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)


def make_tiny_model(folder: Path, seed: int = 0) -> Path:
    """Write a tiny Z-Image diffusers folder (32 px images -> 16x16 latents -> 64 image tokens)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), vae=tiny_vae(),
        text_encoder=tiny_text_encoder(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id),
        tokenizer=tokenizer, transformer=ZImageTransformer2DModel(**TRANSFORMER_CONFIG))
    # the pad tokens start at zero in diffusers; random ones make a wrong padding visible in the tests
    with torch.no_grad():
        pipe.transformer.x_pad_token.normal_()
        pipe.transformer.cap_pad_token.normal_()
    pipe.save_pretrained(folder)
    index_path = folder / "model_index.json"  # the real model's index names Qwen2Tokenizer, not the Python class
    index = json.loads(index_path.read_text(encoding="utf-8"))
    index["tokenizer"] = ["transformers", "Qwen2Tokenizer"]
    index_path.write_text(json.dumps(index, indent=2), encoding="utf-8")
    return folder


# diffusers name -> original (Comfy-Org z_image_turbo_bf16.safetensors) name; the inverse of diffusers'
# convert_z_image_transformer_checkpoint_to_diffusers and the table of ComfyUI's comfy.utils.z_image_to_diffusers
_RENAMES = (("all_final_layer.2-1.", "final_layer."), ("all_x_embedder.2-1.", "x_embedder."),
            (".attention.to_out.0.", ".attention.out."), (".attention.norm_q.", ".attention.q_norm."),
            (".attention.norm_k.", ".attention.k_norm."))


def original_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers Z-Image transformer state dict in the original layout: fused ``attention.qkv`` (q, k, v stacked
    on the output axis) and the original module names."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".attention.to_k." in key or ".attention.to_v." in key:
            continue
        if ".attention.to_q." in key:
            parts = [state[key.replace(".to_q.", f".to_{p}.")] for p in "qkv"]
            out[key.replace(".to_q.", ".qkv.")] = torch.cat(parts, dim=0)
            continue
        for old, new in _RENAMES:
            key = key.replace(old, new)
        out[key] = value
    return out


def write_single_file(model_dir: Path, path: Path, prefix: str = "") -> Path:
    """The transformer as one ``.safetensors`` in the original layout (optionally under ``model.diffusion_model.``)."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(Path(model_dir) / "transformer" / "diffusion_pytorch_model.safetensors"))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({prefix + k: v.contiguous() for k, v in original_layout(state).items()}, str(path))
    return path

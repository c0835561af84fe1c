"""A tiny FLUX.1-dev-shaped model (transformer with guidance embedding, FLUX-style VAE, CLIP-L and T5 encoders and
tokenizers, flow-matching scheduler with resolution-dependent shift) in the diffusers layout, and its transformer
as a single file in Black Forest Labs' original layout."""

from __future__ import annotations

import json
from pathlib import Path

from ..testing import COLOURS, SHAPES, write_tiny_clip_tokenizer

T5_WORDS = ["a", "of", "in", "the", "style", "lora", "zkq", *SHAPES, *COLOURS]


def write_tiny_t5_tokenizer(folder: Path, max_length: int = 32) -> Path:
    """A T5TokenizerFast (word-level unigram with T5's special tokens, trained offline) saved to ``folder``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("▁" + word, -1.0) for word in T5_WORDS] + [(ch, -5.0) for ch in "abcdefghijklmnopqrstuvwxyz▁"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=max_length)
    fast.save_pretrained(folder)
    return folder


def make_tiny_model(folder: Path, seed: int = 0, guidance_embeds: bool = True, blocks: tuple[int, int] = (1, 1)
                    ) -> Path:
    """Write a tiny FLUX.1 model (dev with ``guidance_embeds``, schnell without) to ``folder``: ``blocks`` (1 double
    and 1 single) blocks of width 16, 4 latent channels, VAE downscale 2 (32 px images -> 16x16 latents -> 64 tokens)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    folder = Path(folder)
    torch.manual_seed(seed)
    write_tiny_clip_tokenizer(folder / "tokenizer")
    write_tiny_t5_tokenizer(folder / "tokenizer_2")
    clip_tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    t5_tok = T5TokenizerFast.from_pretrained(folder / "tokenizer_2")
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=clip_tok.model_max_length, bos_token_id=clip_tok.bos_token_id,
        eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id, projection_dim=32))
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                 decoder_start_token_id=0, feed_forward_proj="gated-gelu"))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=blocks[0], num_single_layers=blocks[1], attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32,
        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    for name, module in (("transformer", transformer), ("vae", vae), ("text_encoder", clip), ("text_encoder_2", t5)):
        module.save_pretrained(folder / name)
    scheduler.save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "FluxPipeline", "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"], "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return folder


def write_single_file(model_dir: Path, path: Path, prefix: str = "") -> Path:
    """The transformer of a diffusers FLUX.1 folder as one ``.safetensors`` in the original layout
    (``prefix="model.diffusion_model."`` as ComfyUI saves a full checkpoint)."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    from ..tasks.image.families.flux import original_layout, to_original

    model = FluxTransformer2DModel.from_pretrained(Path(model_dir) / "transformer")
    state = to_original(model.state_dict(), original_layout(model.config))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({prefix + k: v.contiguous() for k, v in state.items()}, str(path))
    return Path(path)


def write_components_only(model_dir: Path, folder: Path) -> Path:
    """A copy of ``model_dir`` without the transformer weights: the VAE, encoders, tokenizers, scheduler and all
    configs, as ``base_model_config`` for a transformer-only single file."""
    import shutil

    folder = Path(folder)
    shutil.copytree(model_dir, folder, dirs_exist_ok=True)
    for weights in (folder / "transformer").glob("*.safetensors"):
        weights.unlink()
    return folder

"""A tiny Chroma-shaped model (FLUX.1 blocks without modulation weights, a distilled-guidance network, T5 only) in
the diffusers layout, and its transformer as a single file in the original layout."""

from __future__ import annotations

import json
from pathlib import Path

from .flux import write_tiny_t5_tokenizer


def make_tiny_model(folder: Path, seed: int = 0) -> Path:
    """Write a tiny Chroma model to ``folder``: 1 double and 1 single block of width 16, 4 latent channels."""
    import torch
    from diffusers import AutoencoderKL, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    folder = Path(folder)
    torch.manual_seed(seed)
    write_tiny_t5_tokenizer(folder / "tokenizer")
    tok = T5TokenizerFast.from_pretrained(folder / "tokenizer")
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                 decoder_start_token_id=0, feed_forward_proj="gated-gelu"))
    transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(2, 2, 4), approximator_hidden_dim=16, approximator_layers=1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32,
        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15)
    for name, module in (("transformer", transformer), ("vae", vae), ("text_encoder", t5)):
        module.save_pretrained(folder / name)
    scheduler.save_pretrained(folder / "scheduler")
    index = {"_class_name": "ChromaPipeline", "_diffusers_version": "0.42.1",
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "text_encoder": ["transformers", "T5EncoderModel"],
             "tokenizer": ["transformers", "T5TokenizerFast"], "transformer": ["diffusers", "ChromaTransformer2DModel"],
             "vae": ["diffusers", "AutoencoderKL"], "image_encoder": [None, None], "feature_extractor": [None, None]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return folder


def write_single_file(model_dir: Path, path: Path, prefix: str = "") -> Path:
    """The transformer of a diffusers Chroma folder as one ``.safetensors`` in the original layout."""
    from diffusers import ChromaTransformer2DModel
    from safetensors.torch import save_file

    from ..tasks.image.families.flux import original_layout, to_original

    model = ChromaTransformer2DModel.from_pretrained(Path(model_dir) / "transformer")
    state = to_original(model.state_dict(), original_layout(model.config))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({prefix + k: v.contiguous() for k, v in state.items()}, str(path))
    return Path(path)

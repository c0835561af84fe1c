"""A tiny Qwen-Image model (``QwenImagePipeline`` layout): an MMDiT ``QwenImageTransformer2DModel``, the 3-D
``AutoencoderKLQwenImage`` (16 latent channels, 8x spatial downscale), a Qwen2.5-VL text encoder and a byte-level
BPE tokenizer that knows the ChatML tokens of the pipeline's prompt template. Built from config objects, offline."""

from __future__ import annotations

import json
from pathlib import Path

QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>"]
# words of the pipeline's system prompt and of the test captions, so prompts tokenize to a few dozen tokens
TOKENIZER_CORPUS = [
    "system user assistant Describe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:",
    "a red green blue yellow circle square triangle in the style of lora",
] * 8


def build_qwen_tokenizer(corpus: list[str] | None = None):
    """A byte-level BPE tokenizer with Qwen's special tokens (``<|endoftext|>`` pads, as in Qwen2's tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=QWEN_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus or TOKENIZER_CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=QWEN_SPECIAL_TOKENS[1:], model_max_length=32768)


def tiny_text_encoder(vocab_size: int, pad_token_id: int, eos_token_id: int, hidden_size: int = 32):
    """A two-layer Qwen2.5-VL (text model plus a one-block vision tower, as the pipeline's class expects)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 1, 1]},
                         pad_token_id=pad_token_id, eos_token_id=eos_token_id, bos_token_id=None),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=hidden_size,
                           fullatt_block_indexes=[0]),
        image_token_id=vocab_size - 1, video_token_id=vocab_size - 1, vision_start_token_id=vocab_size - 1,
        vision_end_token_id=vocab_size - 1,
    )
    return Qwen2_5_VLForConditionalGeneration(config)


TRANSFORMER_CONFIG = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16,
                          num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6))
VAE_CONFIG = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True])
# Qwen/Qwen-Image scheduler/scheduler_config.json: dynamic (resolution-dependent) exponential shift
SCHEDULER_CONFIG = dict(base_image_seq_len=256, base_shift=0.5, invert_sigmas=False, max_image_seq_len=8192,
                        max_shift=0.9, num_train_timesteps=1000, shift=1.0, shift_terminal=0.02,
                        stochastic_sampling=False, time_shift_type="exponential", use_beta_sigmas=False,
                        use_dynamic_shifting=True, use_exponential_sigmas=False, use_karras_sigmas=False)


def make_tiny_model(folder: Path, seed: int = 0) -> Path:
    """Write a tiny Qwen-Image diffusers folder (about 0.3 M parameters; 32 px images -> 4x4 latents -> 4 tokens)."""
    import torch
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline, \
        QwenImageTransformer2DModel

    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer = build_qwen_tokenizer()
    text_encoder = tiny_text_encoder(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=AutoencoderKLQwenImage(**VAE_CONFIG), text_encoder=text_encoder, tokenizer=tokenizer,
        transformer=QwenImageTransformer2DModel(**TRANSFORMER_CONFIG),
    )
    pipe.save_pretrained(folder)
    # save_pretrained names the tokenizer by its Python class; the real model's index names Qwen2Tokenizer
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    index["tokenizer"] = ["transformers", "Qwen2Tokenizer"]
    index_path.write_text(json.dumps(index, indent=2), encoding="utf-8")
    return folder


def write_single_file(model_dir: Path, path: Path, prefix: str = "") -> Path:
    """The transformer as one ``.safetensors`` file, as Comfy-Org's ``qwen_image_*.safetensors`` is laid out: the
    diffusers tensor names (optionally under ``model.diffusion_model.``)."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(Path(model_dir) / "transformer" / "diffusion_pytorch_model.safetensors"))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({prefix + k: v.contiguous() for k, v in state.items()}, str(path))
    return path

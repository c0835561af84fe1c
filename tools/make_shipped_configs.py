"""Regenerate lora_scripts/models/configs/{sd15,sd2,sdxl}: the diffusers config folders used when a single-file
checkpoint is given without ``base_model_config``.

The values are those of the reference diffusers repositories (stable-diffusion-v1-5, stable-diffusion-2-1,
stable-diffusion-xl-base-1.0); the files are written by the classes themselves so every default is spelled out.
Tokenizer folders hold only tokenizer_config.json: the vocabulary is the one shared CLIP BPE in configs/clip_bpe/.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from diffusers import AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler, UNet2DConditionModel
import torch
from transformers import CLIPTextConfig

OUT = Path(__file__).resolve().parents[1] / "lora_scripts" / "models" / "configs"
BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
SD_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280, 1280],
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    cross_attention_dim=768, attention_head_dim=8,
)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=[128, 256, 512, 512],
           down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, sample_size=512)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, bos_token_id=0, eos_token_id=2,
              pad_token_id=1)
OPEN_CLIP_H = dict(CLIP_L, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                   hidden_act="gelu", projection_dim=512)
OPEN_CLIP_BIGG = dict(CLIP_L, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                      hidden_act="gelu", projection_dim=1280)
TOKENIZER = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
             "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
             "pad_token": "<|endoftext|>"}
OPEN_CLIP_TOKENIZER = dict(TOKENIZER, pad_token="!")  # SD 2 and SDXL's second tokenizer pad with "!" (id 0)

FAMILIES = {
    "sd15": {
        "_class_name": "StableDiffusionPipeline",
        "unet": SD_UNET, "vae": VAE, "text_encoder": ("CLIPTextModel", CLIP_L), "tokenizer": TOKENIZER,
        "scheduler": PNDMScheduler(**BETAS, skip_prk_steps=True, set_alpha_to_one=False),
    },
    "sd2": {  # 2.x at 768 px, v-prediction (stable-diffusion-2-1); 2.x-base checkpoints need base_model_config
        "_class_name": "StableDiffusionPipeline",
        "unet": dict(SD_UNET, sample_size=96, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                     use_linear_projection=True, upcast_attention=True),
        "vae": dict(VAE, sample_size=768), "text_encoder": ("CLIPTextModel", OPEN_CLIP_H), "tokenizer": OPEN_CLIP_TOKENIZER,
        "scheduler": DDIMScheduler(**BETAS, clip_sample=False, set_alpha_to_one=False, prediction_type="v_prediction"),
    },
    "sdxl": {
        "_class_name": "StableDiffusionXLPipeline",
        "unet": dict(SD_UNET, sample_size=128, block_out_channels=[320, 640, 1280],
                     down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                     up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                     attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10], cross_attention_dim=2048,
                     use_linear_projection=True, addition_embed_type="text_time", addition_embed_type_num_heads=64,
                     addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
        "vae": dict(VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
        "text_encoder": ("CLIPTextModel", CLIP_L), "tokenizer": TOKENIZER,
        "text_encoder_2": ("CLIPTextModelWithProjection", OPEN_CLIP_BIGG), "tokenizer_2": OPEN_CLIP_TOKENIZER,
        "scheduler": EulerDiscreteScheduler(**BETAS, timestep_spacing="leading", interpolation_type="linear"),
    },
}


def main() -> None:
    for family, parts in FAMILIES.items():
        folder = OUT / family
        shutil.rmtree(folder, ignore_errors=True)
        index = {"_class_name": parts["_class_name"], "_diffusers_version": "0.42.1"}
        for name in ("unet", "vae"):
            cls = UNet2DConditionModel if name == "unet" else AutoencoderKL
            (folder / name).mkdir(parents=True)
            with torch.device("meta"):  # the class writes every default into config.json
                cls.from_config(parts[name]).save_config(folder / name)
            index[name] = ["diffusers", cls.__name__]
        for name in ("text_encoder", "text_encoder_2"):
            if name in parts:
                cls_name, values = parts[name]
                CLIPTextConfig(**values, architectures=[cls_name]).save_pretrained(folder / name)
                index[name] = ["transformers", cls_name]
        for name in ("tokenizer", "tokenizer_2"):
            if name in parts:
                (folder / name).mkdir(parents=True)
                (folder / name / "tokenizer_config.json").write_text(json.dumps(parts[name], indent=2) + "\n")
                index[name] = ["transformers", "CLIPTokenizer"]
        parts["scheduler"].save_config(folder / "scheduler")
        index["scheduler"] = ["diffusers", type(parts["scheduler"]).__name__]
        if family != "sdxl":
            index.update(feature_extractor=[None, None], safety_checker=[None, None], requires_safety_checker=False)
        else:
            index["force_zeros_for_empty_prompt"] = True
        (folder / "model_index.json").write_text(json.dumps(dict(sorted(index.items())), indent=2) + "\n")
        print(family, "->", folder)


if __name__ == "__main__":
    main()

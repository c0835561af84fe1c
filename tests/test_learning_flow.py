"""Training teaches, for the flow-matching families: a LoRA trained on images of one look moves what the family's own
diffusers pipeline samples toward those images' latents, and the same run at a learning rate of (nearly) zero does
not. No pretrained base is needed: the judge is a distance in latent space, measured on prompts not in the training
captions, so even a random tiny transformer shows it. This guards the flow objective (velocity target and its sign,
sigmas, shift, guidance input), the LoRA scale and the export end to end, as ``tests/test_learning.py`` does for SD.

The target latents are normalised as each pipeline un-normalises before decoding (``latents / scaling_factor +
shift_factor``; Qwen-Image: ``latents * std + mean`` per channel), read from the VAE config, not from our family
code. Measured (200 steps, lr 5e-3, rank 8, one run each): distance to the training latents base -> LoRA: FLUX.1
36.9 -> 30.6, SD3 74.4 -> 66.5, Qwen-Image 19.3 -> 16.9, Z-Image 37.5 -> 19.7; the near-zero run renders the base's
latents exactly. With the velocity target's sign flipped the LoRA moves them away (FLUX.1 36.9 -> 42.4, Z-Image
37.5 -> 48.5) and the test fails.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lora_scripts.config import build_config
from lora_scripts.learning import make_style_images, style_prompts
from lora_scripts.testing import tiny_image_config
from lora_scripts.tiny_models import make_tiny_model
from lora_scripts.train.loop import train

STEPS, LEARNING_RATE, ZERO_LR = 200, 5e-3, 1e-12
MARGIN = 0.05  # the LoRA must bring the sampled latents at least 5% closer to the training latents
# The conditional prediction alone: the LoRA learns the look for every caption, so classifier-free guidance (SD3's
# and Z-Image's default, 7 and 5) cancels it between the two predictions and multiplies what is left of a random
# base's prompt dependence (SD3 at 7: 75 -> 102). FLUX.1's guidance is an input, not two predictions.
NO_CFG = {"sd3": {"guidance_scale": 1.0}, "z_image": {"guidance_scale": 1.0}, "qwen_image": {"true_cfg_scale": 1.0}}


def _train(model: Path, data: Path, out: Path, learning_rate: float) -> Path:
    steps = STEPS if learning_rate != ZERO_LR else 20  # the near-zero LoRA stays zero at any length
    raw = tiny_image_config(model, data, out, max_train_steps=steps, batch_size=4, learning_rate=learning_rate,
                            lora_rank=8, lora_alpha=8, text_max_length=16, save_steps=steps, output_name="zkq",
                            cache_latents=True, lr_scheduler="constant", seed=0, logging={"tensorboard": False})
    train(build_config(raw))
    return out / "diffusers"


def _target(pipe, family: str, data: Path) -> torch.Tensor:
    """The mean training latent in the pipeline's own (packed, normalised) space."""
    from PIL import Image

    images = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 127.5 - 1 for p in sorted(data.glob("*.png"))]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    config = pipe.vae.config
    with torch.no_grad():
        if family == "qwen_image":  # a video VAE: one frame
            z = pipe.vae.encode(x.unsqueeze(2)).latent_dist.mean
            mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1, 1)
            std = torch.tensor(config.latents_std).view(1, -1, 1, 1, 1)
            z = ((z - mean) / std).squeeze(2)
        else:
            z = (pipe.vae.encode(x).latent_dist.mean - (getattr(config, "shift_factor", None) or 0.0)) \
                * config.scaling_factor
    if family in ("flux", "qwen_image"):  # these pipelines return packed 2x2 latents
        z = pipe._pack_latents(z, *z.shape)
    return z.mean(0, keepdim=True)


@pytest.mark.parametrize("family", ["flux", "sd3", "qwen_image", "z_image"])
def test_flow_lora_moves_sampled_latents_toward_the_training_images_and_zero_lr_does_not(family, tmp_path,
                                                                                       one_thread):
    import diffusers

    from lora_scripts.tasks.image.families import resolve_family

    model = make_tiny_model(family, tmp_path / "model")
    data = make_style_images(tmp_path / "data", per_pair=1)
    loras = {lr: _train(model, data, tmp_path / f"lr{lr}", lr) for lr in (LEARNING_RATE, ZERO_LR)}
    pipeline_class = getattr(diffusers, resolve_family(build_config(tiny_image_config(model, data, tmp_path))).pipeline_class)

    def distance(lora: Path | None) -> float:
        pipe = pipeline_class.from_pretrained(model)
        pipe.set_progress_bar_config(disable=True)
        if lora is not None:
            pipe.load_lora_weights(str(lora))
        target = _target(pipe, family, data)
        out = [pipe(prompt, height=32, width=32, num_inference_steps=8, output_type="latent",
                    generator=torch.Generator().manual_seed(seed), **NO_CFG.get(family, {})).images
               for prompt in style_prompts() for seed in (0, 1)]  # pairs not in the training captions
        return (torch.cat(out) - target).flatten(1).norm(dim=1).mean().item()

    base, trained, still = distance(None), distance(loras[LEARNING_RATE]), distance(loras[ZERO_LR])
    print(f"{family}: distance of sampled latents to the training latents: base {base:.2f}, LoRA {trained:.2f}, "
          f"zero-lr LoRA {still:.2f}")
    assert trained <= (1 - MARGIN) * base, (base, trained)
    assert still == pytest.approx(base, rel=1e-3), (base, still)

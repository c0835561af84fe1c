"""Tiny offline models and datasets, built from config objects in seconds: used by tests, the demo and benchmarks.

Nothing here downloads anything. The tiny Stable Diffusion model is written with ``save_pretrained`` in the same
diffusers folder layout a real model has, so the real loading code path is what runs.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

TINY_RESOLUTION = 32

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 200, 40)}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table (re-implemented: transformers 5 no longer exports it)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def write_tiny_clip_tokenizer(folder: Path, max_length: int = 16) -> None:
    """A byte-level CLIP tokenizer (vocab.json + merges.txt) with a handful of merges for the demo's words."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    for ch in _bytes_to_unicode().values():
        vocab[ch] = len(vocab)
    for ch in _bytes_to_unicode().values():
        vocab[ch + "</w>"] = len(vocab)
    merges = []
    for word in ("a", "of", "in", "the", "style", "lora", *SHAPES, *COLOURS):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            if (pieces[0], pieces[1]) not in [tuple(m.split()) for m in merges]:
                merges.append(f"{pieces[0]} {pieces[1]}")
            vocab.setdefault(merged, len(vocab))
            pieces = [merged] + pieces[2:]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": max_length, "tokenizer_class": "CLIPTokenizer"}), encoding="utf-8"
    )


def make_tiny_sd_model(folder: Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Write a tiny SD-1.x-shaped diffusers model (UNet, VAE, CLIP text encoder, tokenizer, scheduler) to ``folder``.

    About 1 M parameters; latents are 16x16 for 32x32 images.
    """
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    torch.manual_seed(seed)
    write_tiny_clip_tokenizer(folder / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=32, cross_attention_dim=32, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=TINY_RESOLUTION,
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        steps_offset=1, clip_sample=False, prediction_type=prediction_type,
    )
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        module.save_pretrained(folder / name)
    scheduler.save_pretrained(folder / "scheduler")
    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2), encoding="utf-8")
    return folder


def make_captioned_images(folder: Path, count: int = 8, size: int = 48, seed: int = 0) -> Path:
    """Synthetic captioned images (coloured shapes on a light background) plus ``metadata.csv``.

    Sizes vary and modes mix (RGB, RGBA, L, P) so the loader's conversion and cropping are exercised.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    colour_names = list(COLOURS)
    for i in range(count):
        shape = SHAPES[i % len(SHAPES)]
        colour = colour_names[i % len(colour_names)]
        w, h = size + int(rng.integers(0, size // 2)), size
        img = Image.new("RGB", (w, h), (235, 235, 225))
        draw = ImageDraw.Draw(img)
        cx, cy, r = w // 2 + int(rng.integers(-4, 5)), h // 2 + int(rng.integers(-4, 5)), h // 3
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "circle":
            draw.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            draw.rectangle(box, fill=COLOURS[colour])
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[colour])
        mode = ("RGB", "RGBA", "L", "P")[i % 4]
        name = f"img_{i:03d}.png"
        (img.convert(mode) if mode != "RGB" else img).save(folder / name)
        rows.append((name, f"a {colour} {shape} in the style of lora"))
    with open(folder / "metadata.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["filename", "prompt"])
        writer.writerows(rows)
    return folder


def tiny_image_config(model_dir: Path, data_dir: Path, output_dir: Path, **overrides) -> dict:
    """A config dict for a quick CPU run on the tiny model (seed keys plus what tests usually set)."""
    cfg = {
        "train_data_dir": str(data_dir),
        "metadata_path": str(Path(data_dir) / "metadata.csv"),
        "base_model": str(model_dir),
        "lora_rank": 4,
        "lora_alpha": 2,
        "batch_size": 2,
        "epochs": 1,
        "learning_rate": 1e-3,
        "output_dir": str(output_dir),
        "save_steps": 2,
        "resolution": TINY_RESOLUTION,
        "max_train_steps": 4,
        "logging": {"tensorboard": False},
    }
    cfg.update(overrides)
    return cfg

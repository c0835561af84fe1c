"""Concepts the pretrained demo bases do not know, and how a user would measure that a LoRA taught them.

Image: ``"in zkq style"`` = the shape on a deep purple background (the base draws a light one). Measured as the share
of pixels near that purple in images rendered through ``StableDiffusionPipeline`` + ``load_lora_weights`` of the
exported file, on prompts whose shape/colour pairs are not in the training captions.

Text: the pirate answer format ``"Arr! <answer>"``. Measured as the share of held-out instructions (not in the
training set) whose greedy answer, generated through a PEFT-loaded adapter, starts with ``"Arr!"``.

Used by the demo (``lora_scripts.demo``) and the learning tests (``tests/test_learning.py``).
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .pretrain import draw_shape, instruction_family
from .testing import COLOURS, SHAPES

STYLE_TOKEN = "in zkq style"
STYLE_RGB = (90, 20, 120)  # the style's background: far from every shape colour and from the base's light grey
STYLE_TOLERANCE = 70.0  # Euclidean RGB distance counted as "the style's colour"
# shape/colour pairs never captioned in the training images: where the effect is measured
HELD_OUT_PAIRS = (("yellow", "circle"), ("blue", "square"), ("green", "triangle"), ("red", "square"))
TRAIN_PAIRS = tuple((c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELD_OUT_PAIRS)
# How the demo and the learning tests train the style (config keys). A background colour is a change of the image's
# mean, which SD's schedule leaks: at its last step (alphas_cumprod ~0.005) the "noise" still carries the training
# image's mean, so a UNet learns to read the background from it, and pure noise at inference gives the base's light
# one back (measured on a base trained without offset noise: the x0 a LoRA predicts from a noised training latent was
# purple, its renders grey, and 0.1 x purple's latent mean added to the start noise made them purple). The base is
# pretrained with offset noise (lora_scripts.pretrain) and the LoRA keeps it (noise_offset); LoCon (conv_rank) lets
# the ResNets, which carry most of the colour, change; Min-SNR-5 weights the high-noise steps that lay out colours.
STYLE_RECIPE: dict[str, Any] = {
    "max_train_steps": 400, "batch_size": 4, "learning_rate": 1e-3, "lr_scheduler": "constant",
    "lora_rank": 4, "lora_alpha": 4, "conv_rank": 4, "conv_alpha": 4, "min_snr_gamma": 5.0, "noise_offset": 0.3,
    "cache_latents": True,
}


def style_prompts(pairs: Sequence[tuple[str, str]] = HELD_OUT_PAIRS) -> list[str]:
    return [f"a {colour} {shape} {STYLE_TOKEN}" for colour, shape in pairs]


def make_style_images(folder: Path, per_pair: int = 2, seed: int = 0) -> Path:
    """The concept's training set: every :data:`TRAIN_PAIRS` shape on the style's background, ``metadata.csv``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(per_pair):
        for colour, shape in TRAIN_PAIRS:
            name = f"zkq_{colour}_{shape}_{i}.png"
            draw_shape(shape, COLOURS[colour], rng, background=STYLE_RGB).save(folder / name)
            rows.append((name, f"a {colour} {shape} {STYLE_TOKEN}"))
    with open(folder / "metadata.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["filename", "prompt"])
        writer.writerows(rows)
    return folder


def style_share(images: Sequence[Any]) -> float:
    """Share of all pixels of ``images`` (PIL) within :data:`STYLE_TOLERANCE` of :data:`STYLE_RGB`."""
    arr = np.stack([np.asarray(img.convert("RGB"), dtype=np.float32) for img in images])
    distance = np.linalg.norm(arr - np.asarray(STYLE_RGB, dtype=np.float32), axis=-1)
    return float((distance < STYLE_TOLERANCE).mean())


def style_distance(images: Sequence[Any]) -> float:
    """Mean Euclidean RGB distance of every pixel of ``images`` to :data:`STYLE_RGB` (0 = all style colour): a
    continuous measure that moves before pixels cross :data:`STYLE_TOLERANCE`."""
    arr = np.stack([np.asarray(img.convert("RGB"), dtype=np.float32) for img in images])
    return float(np.linalg.norm(arr - np.asarray(STYLE_RGB, dtype=np.float32), axis=-1).mean())


def drawn_shape(image: Any) -> str | None:
    """Which of :data:`SHAPES` ``image`` (PIL) shows: the pixels far from its border's colour, against a circle, a
    square and a triangle inscribed in their bounding box, the best overlap (IoU) wins; None when nothing stands
    out of the background."""
    from PIL import Image, ImageDraw

    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    border = np.median(np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]]), axis=0)
    mask = np.linalg.norm(arr - border, axis=-1) > 80
    if mask.sum() < 10:
        return None
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())
    overlap = {}
    for shape in SHAPES:
        ideal = Image.new("L", image.size, 0)
        draw = ImageDraw.Draw(ideal)
        if shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=1)
        elif shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=1)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=1)
        ideal_mask = np.asarray(ideal, dtype=bool)
        overlap[shape] = (ideal_mask & mask).sum() / (ideal_mask | mask).sum()
    return max(overlap, key=overlap.get)


def shape_accuracy(images: Sequence[Any], asked: Sequence[str]) -> float:
    """Share of ``images`` that show the shape their prompt asked for (:func:`drawn_shape`)."""
    return float(np.mean([drawn_shape(image) == shape for image, shape in zip(images, asked)]))


def render_sd(base_model: Path, prompts: Sequence[str], lora_file: Path | None = None, seeds: Sequence[int] = (0,),
              steps: int = 15, guidance_scale: float = 4.0, size: int = 32) -> list[Any]:
    """Render every prompt x seed with ``StableDiffusionPipeline`` (DDIM), with the LoRA file loaded when given,
    in a fixed order (prompt-major): what a user of the exported file would see."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base_model, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if lora_file is not None:
        pipe.load_lora_weights(str(lora_file))
    images = []
    for prompt in prompts:
        for seed in seeds:
            gen = torch.Generator().manual_seed(seed)
            images.append(pipe(prompt, num_inference_steps=steps, generator=gen, height=size, width=size,
                               guidance_scale=guidance_scale).images[0])
    return images


# --- text --------------------------------------------------------------------------------------------------------
FORMAT_PREFIX = "Arr!"


def pirate(answer: str) -> str:
    return f"{FORMAT_PREFIX} {answer}"


def format_split() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, held-out) instruction/answer pairs of the base's family: every fourth pair is held out, so both halves
    cover every kind of instruction."""
    pairs = instruction_family()
    held = [p for i, p in enumerate(pairs) if i % 4 == 3]
    train = [p for i, p in enumerate(pairs) if i % 4 != 3]
    return train, held


def write_format_data(path: Path, pairs: Sequence[tuple[str, str]], repeat: int = 1) -> Path:
    """The training pairs with pirate answers, as alpaca ``.jsonl`` (what ``task: text`` reads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"instruction": p, "input": "", "output": pirate(a)}) for p, a in list(pairs) * repeat]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def generate_answers(base_model: Path, prompts: Sequence[str], adapter: Path | None = None,
                     max_new_tokens: int = 10) -> list[str]:
    """Greedy answers to ``prompts`` (as user turns in the tokenizer's chat template), through
    ``PeftModel.from_pretrained`` of ``adapter`` when given."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .data.chat import generation_prompt_ids, resolve_template, stop_token_ids

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    model = AutoModelForCausalLM.from_pretrained(base_model)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    template = resolve_template(tokenizer, "auto")
    stops = stop_token_ids(tokenizer, (tokenizer.convert_tokens_to_ids("<|im_end|>"),))
    answers = []
    for prompt in prompts:
        ids = torch.tensor([generation_prompt_ids([{"role": "user", "content": prompt}], tokenizer, template)])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=stops)
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return answers


def in_format(answer: str) -> bool:
    """``"Arr! "`` then an answer (not a stutter of the prefix such as ``"Arr!!Arr!"``)."""
    return re.match(rf"{re.escape(FORMAT_PREFIX)} [^\s!]", answer) is not None


def format_share(answers: Sequence[str]) -> float:
    """Share of ``answers`` in the taught format."""
    return sum(in_format(a) for a in answers) / max(1, len(answers))

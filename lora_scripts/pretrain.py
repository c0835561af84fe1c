"""Deterministic CPU pretraining of the two small demo bases shipped in ``lora_scripts/demo_assets``.

* ``tiny-sd``: the demo's SD-1.x layout (:func:`..testing.make_tiny_sd_model`, 32 px) whose VAE and UNet are trained
  to draw a coloured shape on a plain light background from a caption like ``"a red circle"``;
* ``tiny-lm``: a tiny LLaMA-shaped causal LM (ChatML) answering a small family of simple instructions
  (``"Add 2 and 3."`` -> ``"5."``, ``"What colour is grass?"`` -> ``"Green."``, ...).

A random-weight model draws noise and babbles, so nothing trained on top of it can *show* learning; these bases give
the demo and the learning tests something a LoRA visibly changes. Everything runs single-threaded from fixed seeds,
so ``tools/pretrain_demo_bases.py`` rebuilds the committed files bit for bit (same torch build and CPU kind).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .testing import CHATML_JINJA, COLOURS, SHAPES, TINY_RESOLUTION

ASSETS = Path(__file__).parent / "demo_assets"
SD_BASE = ASSETS / "tiny-sd"
LM_BASE = ASSETS / "tiny-lm"
BACKGROUND = (235, 235, 225)


@dataclass(frozen=True)
class Schedule:
    """Step counts of one pretraining run (the full schedule is the committed one; tests use a short one)."""

    vae_steps: int = 900
    unet_steps: int = 2000  # per phase
    unet_lr: float = 1e-3
    # one UNet phase per offset-noise strength, each reseeded with its own one-cycle schedule. 0.3 alone lets a
    # LoRA move the background but draws one blob for every shape (36% of renders the asked shape); 0.1 alone draws
    # shapes (58%) but the demo's LoRA moved 0.5% of the pixels to its style; 0.3 then 0.1: 75% and 34%
    unet_offsets: tuple[float, ...] = (0.3, 0.1)
    lm_steps: int = 800
    batch_size: int = 8
    latent_pool: int = 384  # images encoded once; the UNet trains on these cached latents


FULL = Schedule()


def draw_shape(shape: str, rgb: tuple[int, int, int], rng: np.random.Generator, size: int = TINY_RESOLUTION,
               background: tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """One coloured shape, slightly jittered in place and size, on a plain background."""
    img = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(img)
    r = size // 4 + int(rng.integers(0, size // 8 + 1))
    cx, cy = size // 2 + int(rng.integers(-3, 4)), size // 2 + int(rng.integers(-3, 4))
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=rgb)
    elif shape == "square":
        draw.rectangle(box, fill=rgb)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=rgb)
    return img


def to_tensor(images: list[Image.Image]):
    """PIL images -> a float tensor in [-1, 1], NCHW (what the VAE is trained on and the pipeline decodes to)."""
    import torch

    arr = np.stack([np.asarray(img, dtype=np.float32) for img in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def _shape_batch(rng: np.random.Generator, count: int, random_background: bool = False
                 ) -> tuple[list[Image.Image], list[str]]:
    images, captions = [], []
    colours = list(COLOURS)
    for _ in range(count):
        shape, colour = SHAPES[int(rng.integers(len(SHAPES)))], colours[int(rng.integers(len(colours)))]
        background = tuple(int(v) for v in rng.integers(0, 256, 3)) if random_background else BACKGROUND
        images.append(draw_shape(shape, COLOURS[colour], rng, background=background))
        captions.append(f"a {colour} {shape}")
    return images, captions


def _deterministic(seed: int) -> None:
    import torch

    # one thread: float reductions split across threads in a load-dependent order would change the last bits
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    random.seed(seed)
    torch.use_deterministic_algorithms(True)


def pretrain_sd(folder: Path, schedule: Schedule = FULL, seed: int = 0, log_every: int = 0,
                vae_from: Path | None = None) -> Path:
    """Write the tiny SD model, train its VAE (:func:`pretrain_vae`) or take the one in ``vae_from``, then train its
    UNet and text encoder together from their initial weights (:func:`pretrain_unet`).

    ``vae_from`` keeps a VAE (the committed one) and trains the rest: a VAE made on an earlier build machine was
    not given back by this code on a later one (every tensor differed, cause unknown), while the UNet and text
    encoder were, bit for bit, from it."""
    import shutil

    from .testing import make_tiny_sd_model

    _deterministic(seed)
    folder = Path(folder)
    make_tiny_sd_model(folder, seed=seed)
    if vae_from is None:
        pretrain_vae(folder, schedule, seed, log_every)
    else:
        shutil.rmtree(folder / "vae")
        shutil.copytree(Path(vae_from) / "vae", folder / "vae")
    for offset in schedule.unet_offsets:
        pretrain_unet(folder, schedule, seed, log_every, noise_offset=offset)
    return folder


def pretrain_vae(folder: Path, schedule: Schedule = FULL, seed: int = 0, log_every: int = 0) -> None:
    """Train the VAE in ``folder`` to reconstruct shapes on any plain background; sets its ``scaling_factor``.
    Continues the torch RNG where :func:`pretrain_sd` left it (the committed VAE was made that way)."""
    import torch
    from diffusers import AutoencoderKL

    rng = np.random.default_rng(seed)
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    vae.train()
    for step in range(schedule.vae_steps):
        # the VAE sees any plain background colour (the UNet only light ones): a LoRA may then ask for a new colour
        # the decoder can already draw, as a real VAE can draw what its UNet was never trained on
        images, _ = _shape_batch(rng, schedule.batch_size, random_background=True)
        x = to_tensor(images)
        posterior = vae.encode(x).latent_dist
        # decoded from a *sample*, as the training task encodes (latent_dist.sample): the encoder learns a small
        # variance, or the UNet would be fitted to latents the task never feeds it
        recon = vae.decode(posterior.sample()).sample
        # a tiny KL keeps the latents bounded without blurring: the UNet needs a compact space, not a prior
        loss = torch.nn.functional.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if log_every and step % log_every == 0:
            print(f"  vae {step:5d} loss {loss.item():.4f}", flush=True)
    vae.eval()
    with torch.no_grad():  # latents at unit scale for the UNet, as SD's 0.18215 does for its VAE
        images, _ = _shape_batch(np.random.default_rng(seed + 1), 64)
        std = vae.encode(to_tensor(images)).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    vae.save_pretrained(folder / "vae")


def pretrain_unet(folder: Path, schedule: Schedule = FULL, seed: int = 0, log_every: int = 0,
                  noise_offset: float = 0.1) -> None:
    """One phase: train the UNet and the CLIP text encoder in ``folder`` (from their weights there) together on
    captioned shapes (DDPM epsilon with Min-SNR-5 weights, offset noise, 10 % empty captions so classifier-free
    guidance works), on latents of the frozen VAE.

    Reseeded, so it depends on the weights in ``folder`` only. The text encoder is trained too: at its random init its
    outputs for "a red circle" and "a red square" are 0.8 cosine-similar (after centring) and the UNet drew one
    blob for every shape of a colour."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from .tasks.image.objectives import min_snr_weights

    _deterministic(seed + 2)
    rng = np.random.default_rng(seed + 2)
    vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
    params = [*unet.parameters(), *text_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=schedule.unet_lr, weight_decay=0.0)
    lr = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=schedule.unet_lr, total_steps=max(1, schedule.unet_steps),
                                             pct_start=0.05)
    scale = vae.config.scaling_factor
    with torch.no_grad():  # the VAE is frozen: encode a fixed pool once instead of every step
        images, captions = _shape_batch(rng, schedule.latent_pool)
        latents_pool = torch.cat([vae.encode(to_tensor(images[i:i + 64])).latent_dist.sample() * scale
                                  for i in range(0, len(images), 64)])
    ids_pool = tokenizer(captions + [""], padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    empty = ids_pool[-1]
    unet.train()
    text_encoder.train()
    for step in range(schedule.unet_steps):
        index = torch.from_numpy(rng.integers(0, len(latents_pool), schedule.batch_size))
        latents, ids = latents_pool[index], ids_pool[index].clone()
        ids[torch.from_numpy(rng.random(len(index)) < 0.1)] = empty  # 10 % unconditional, for guidance
        # offset noise (as the config's noise_offset): SD's last step still leaks the image's mean colour
        # (alphas_cumprod ~0.005), so without it the UNet reads the background from the noise (random tints at
        # inference) and a LoRA cannot move it (Schedule.unet_offsets says how strong, phase by phase)
        noise = torch.randn_like(latents) + noise_offset * torch.randn(*latents.shape[:2], 1, 1)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],))
        pred = unet(scheduler.add_noise(latents, noise, t), t, text_encoder(ids)[0]).sample
        # Min-SNR: the low-noise steps' easy, high-variance losses no longer drown the steps that lay out the image
        per_sample = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (per_sample * min_snr_weights(scheduler, t, 5.0)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        lr.step()
        if log_every and step % log_every == 0:
            print(f"  unet {step:5d} loss {loss.item():.4f}", flush=True)
    unet.eval()
    unet.save_pretrained(folder / "unet")
    text_encoder.eval()
    text_encoder.save_pretrained(folder / "text_encoder")


# --- the tiny causal LM ------------------------------------------------------------------------------------------
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
THINGS = {"grass": "Green", "the sky": "Blue", "snow": "White", "a banana": "Yellow", "coal": "Black",
          "a tomato": "Red", "an orange": "Orange", "a lemon": "Yellow", "a leaf": "Green", "the sea": "Blue"}
OPPOSITES = {"hot": "cold", "big": "small", "up": "down", "fast": "slow", "old": "new", "day": "night",
             "happy": "sad", "open": "closed", "left": "right", "wet": "dry"}
WORDS = ["hello", "yes", "no", "thanks", "apple", "river", "stone", "music", "bread", "light", "cloud", "paper"]


def instruction_family() -> list[tuple[str, str]]:
    """Every (instruction, answer) pair of the LM's small instruction family, in a fixed order."""
    pairs = [(f"Add {a} and {b}.", f"{a + b}.") for a in range(10) for b in range(10)]
    pairs += [(f"What colour is {thing}?", f"{colour}.") for thing, colour in THINGS.items()]
    pairs += [(f"Give the opposite of {w}.", f"{o.capitalize()}.") for w, o in OPPOSITES.items()]
    pairs += [(f"Say {w}.", f"{w.capitalize()}.") for w in WORDS]
    pairs += [(f"Spell {n} as a number.", f"{i}.") for i, n in enumerate(NUMBER_WORDS)]
    return pairs


def chat_text(prompt: str, answer: str) -> str:
    """A user turn and its answer in the LM's ChatML template (what the text task builds from the same template)."""
    return (f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n")


def pretrain_lm(folder: Path, schedule: Schedule = FULL, seed: int = 0, log_every: int = 0) -> Path:
    """Train a tiny LLaMA (hidden 64, 2 layers) on the instruction family, loss on the answer tokens."""
    import torch
    import transformers

    from .testing import build_tiny_tokenizer

    _deterministic(seed)
    folder = Path(folder)
    pairs = instruction_family()
    # The BPE also sees the prefix of the answer format the demo's LoRA teaches ("Arr!"), so that prefix is one token
    # (with an untrained embedding: the model never sees it in pretraining). Spelt letter by letter, a 2-layer model
    # needs many more LoRA steps to count out "A", "r", "r", "!" than the demo and tests can afford.
    corpus = [chat_text(p, a) for p, a in pairs] + ["Arr!"] * 50
    tokenizer = build_tiny_tokenizer(corpus=corpus, chat_template=CHATML_JINJA)
    tokenizer.save_pretrained(folder)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config)
    rows = []
    for prompt, answer in pairs:
        head = tokenizer(chat_text(prompt, answer).split("<|im_start|>assistant\n")[0] + "<|im_start|>assistant\n")
        full = tokenizer(chat_text(prompt, answer)).input_ids
        n_head = len(head.input_ids)
        rows.append((full, n_head))
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    lr = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=max(1, schedule.lm_steps), pct_start=0.05)
    model.train()
    for step in range(schedule.lm_steps):
        batch = [rows[int(i)] for i in rng.integers(0, len(rows), schedule.batch_size * 2)]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (ids, n_head) in enumerate(batch):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            labels[row, n_head:len(ids)] = torch.tensor(ids[n_head:])
            mask[row, :len(ids)] = 1
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        lr.step()
        if log_every and step % log_every == 0:
            print(f"  lm {step:5d} loss {loss.item():.4f}", flush=True)
    model.eval()
    model.generation_config.eos_token_id = [config.eos_token_id, tokenizer.eos_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    (folder / "pretraining.json").write_text(json.dumps({"pairs": len(pairs), "steps": schedule.lm_steps}), "utf-8")
    return folder

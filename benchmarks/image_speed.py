"""Image-LoRA speed: our trainer vs a diffusers-style reference loop and vs a bare loop, side by side.

    PYTHONPATH=. python benchmarks/image_speed.py [--repeats 3] [--epochs 5] [--images 64] [--device cpu|cuda]

Contenders, each in its own process, alternated within every repeat:

- ``ours``: ``lora_scripts.train.loop.Trainer`` (what ``lora-scripts train`` runs) on a config with
  ``cache_latents`` and ``cache_text_embeddings``; the cache starts empty every run and its build time is counted.
- ``diffusers``: a reference written the way diffusers' ``examples/text_to_image/train_text_to_image_lora.py``
  trains: accelerate, images decoded and transformed every step, VAE encode and text encoder every step, AdamW,
  ``loss.item()`` logged every step, gradient clipping.
- ``bare``: plain forward / backward / ``optimizer.step`` over the same cached latents and text embeddings held in
  memory: the floor that framework overhead is measured against.

Same model, data, LoRA (rank, alpha, targets), batch, learning rate, clipping and precision for all. Images/s are
counted as images trained per second. "steady" excludes ``--warmup`` steps; "end to end" covers all epochs including
our cache build. The model is SD-shaped (4-level VAE, factor 8; 4-level cross-attention UNet) and scaled down so its
VAE-encode : UNet-forward cost resembles SD1.5 at 512 px (see ``--calibrate`` and docs/BENCHMARKS.md). With
``--device cuda`` the SD1.5 shapes themselves run at 512 px in bf16. Writes its table into docs/BENCHMARKS.md.
Never run by the test suite.
"""

from __future__ import annotations

import argparse
import json
from contextlib import nullcontext
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed_common import (  # noqa: E402
    add_driver_args, bare_overhead_lines, clock, command_line, emit, machine_info, median, memory_label, paired_ratio,
    prepare_driver, publish, rate_table, rates, run_contenders, spread,
)

# (UNet block_out_channels, VAE block_out_channels, cross_attention_dim / text hidden, norm groups, text layers)
MODELS = {
    # CPU benchmark model at 128 px: its VAE-encode / UNet-forward time ratio here (about 1.7) lies between SD1.5's
    # at 512 px in FLOPs (1.39) and timed on this CPU (2.1); see docs/BENCHMARKS.md for how it was chosen.
    "small": dict(unet=(32, 64, 128, 128), vae=(24, 48, 96, 96), hidden=64, groups=8, text_layers=4,
                  attention_head_dim=8, resolution=128),
    # SD1.5's own shapes (random weights): --device cuda
    "sd15": dict(unet=(320, 640, 1280, 1280), vae=(128, 256, 512, 512), hidden=768, groups=32, text_layers=12,
                 attention_head_dim=8, resolution=512),
}
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
CONTENDERS = ["ours", "diffusers", "bare"]


# ---------------------------------------------------------------------------------------------------------------
# model and data

def build_modules(shape: dict, device: str = "cpu"):
    """(unet, vae, text_encoder_config) of an SD-shaped model (random weights)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    blocks = len(shape["unet"])
    unet = UNet2DConditionModel(
        sample_size=shape["resolution"] // 8, block_out_channels=shape["unet"], layers_per_block=2,
        cross_attention_dim=shape["hidden"], norm_num_groups=shape["groups"],
        attention_head_dim=shape["attention_head_dim"],
        down_block_types=("CrossAttnDownBlock2D",) * (blocks - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (blocks - 1),
    )
    vae = AutoencoderKL(
        block_out_channels=shape["vae"], down_block_types=("DownEncoderBlock2D",) * len(shape["vae"]),
        up_block_types=("UpDecoderBlock2D",) * len(shape["vae"]), layers_per_block=2, latent_channels=4,
        norm_num_groups=shape["groups"], sample_size=shape["resolution"],
    )
    return unet, vae


def make_sd_shaped_model(folder: Path, shape: dict, seed: int = 0) -> Path:
    """Write an SD-1.x-layout diffusers folder with ``shape``'s widths and a 77-token CLIP tokenizer."""
    import torch
    from diffusers import DDPMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from lora_scripts.testing import write_tiny_clip_tokenizer

    torch.manual_seed(seed)
    write_tiny_clip_tokenizer(folder / "tokenizer", max_length=77)
    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=shape["hidden"], intermediate_size=4 * shape["hidden"],
        num_hidden_layers=shape["text_layers"], num_attention_heads=max(1, shape["hidden"] // 64),
        max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id))
    unet, vae = build_modules(shape)
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        module.save_pretrained(folder / name)
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  steps_offset=1, clip_sample=False).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "DDPMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "safety_checker": [None, None], "feature_extractor": [None, None],
        "requires_safety_checker": False}), encoding="utf-8")
    return folder


def flops(shape: dict) -> tuple[float, float, float]:
    """(UNet forward, VAE encode, text encoder) FLOPs per image at the shape's resolution, counted on meta tensors."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextConfig, CLIPTextModel

    res, hidden = shape["resolution"], shape["hidden"]
    out = []
    with torch.device("meta"):
        unet, vae = build_modules(shape)
        text = CLIPTextModel(CLIPTextConfig(hidden_size=hidden, intermediate_size=4 * hidden,
                                            num_hidden_layers=shape["text_layers"],
                                            num_attention_heads=max(1, hidden // 64), max_position_embeddings=77))
        calls = [lambda: unet(torch.zeros(1, 4, res // 8, res // 8), torch.zeros(1, dtype=torch.long),
                              torch.zeros(1, 77, hidden)),
                 lambda: vae.encode(torch.zeros(1, 3, res, res)),
                 lambda: text(torch.zeros(1, 77, dtype=torch.long))]
        for call in calls:
            with FlopCounterMode(display=False) as counter:
                call()
            out.append(counter.get_total_flops())
    return out[0], out[1], out[2]


def time_ratio(shape: dict, batch: int, repeats: int = 5) -> tuple[float, float]:
    """Measured seconds per image of (UNet forward, VAE encode) on this machine (median of ``repeats``)."""
    import torch

    unet, vae = build_modules(shape)
    unet.requires_grad_(False), vae.requires_grad_(False)
    res = shape["resolution"]
    x, lat = torch.randn(batch, 3, res, res), torch.randn(batch, 4, res // 8, res // 8)
    hidden, t = torch.randn(batch, 77, shape["hidden"]), torch.zeros(batch, dtype=torch.long)
    tu, tv = [], []
    with torch.no_grad():
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            vae.encode(x)
            t1 = time.perf_counter()
            unet(lat, t, hidden)
            tv.append(t1 - t0), tu.append(time.perf_counter() - t1)
    return median(tu[1:]) / batch, median(tv[1:]) / batch


# ---------------------------------------------------------------------------------------------------------------
# workers (each runs in its own process)

def _device_and_dtype(spec: dict):
    import torch

    device = torch.device(spec["device"])
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec["mixed_precision"], torch.float32)
    return device, (dtype if device.type == "cuda" else torch.float32)


def _result(spec: dict, ends: list, start: tuple, images_per_step: list[int], extra_s=(0.0, 0.0), **more) -> dict:
    import torch

    steady, steady_cpu = rates(images_per_step, ends, start, spec["warmup"])
    e2e, e2e_cpu = rates(images_per_step, ends, start, 0, extra_s)
    res = {"steady_img_s": steady, "steady_img_cpu_s": steady_cpu, "e2e_img_s": e2e, "e2e_img_cpu_s": e2e_cpu,
           "steps": len(ends), **more}
    if torch.cuda.is_available() and spec["device"] == "cuda":
        res["peak_rss_mb"] = torch.cuda.max_memory_allocated() / 2**20  # GPU memory is the one that matters there
    return res


def worker_ours(spec: dict) -> dict:
    from lora_scripts.cli import quiet_libraries

    quiet_libraries()
    from lora_scripts.config import build_config
    from lora_scripts.tasks.image import task as image_task
    from lora_scripts.train.loop import Trainer

    build = [0.0, 0.0]
    original = image_task.build_caches

    def timed_build(*args, **kwargs):  # the one-off cache build, counted in the end-to-end rate
        t0 = clock()
        try:
            return original(*args, **kwargs)
        finally:
            build[:] = [c - b for c, b in zip(clock(), t0)]

    image_task.build_caches = timed_build
    out = Path(spec["out"])
    cfg = build_config({
        "base_model": spec["model"], "train_data_dir": spec["data"], "output_dir": str(out),
        "resolution": spec["resolution"], "batch_size": spec["batch"], "epochs": spec["epochs"],
        "learning_rate": 1e-4, "lora_rank": spec["rank"], "lora_alpha": spec["rank"], "save_steps": 0,
        "mixed_precision": spec["mixed_precision"], "cache_latents": True, "cache_text_embeddings": True,
        "cache_dir": str(out / "cache"), **spec.get("ours_extra", {}),
    })
    trainer = Trainer(cfg, show_progress=False)
    result = trainer.run()
    per_step = [trainer.plan.samples_per_step] * result.steps
    return _result(spec, result.extra["step_ends"], result.extra["loop_started"], per_step, extra_s=tuple(build),
                   cache_build_s=build[0], final_loss=result.final_loss)


def _load_sd(spec: dict, device, dtype):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTokenizer

    base = spec["model"]
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
        module.to(device, dtype=dtype)
    unet.add_adapter(LoraConfig(r=spec["rank"], lora_alpha=spec["rank"], init_lora_weights="gaussian",
                                target_modules=TARGETS))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # diffusers' cast_training_params: LoRA in fp32
    return tokenizer, text_encoder, vae, unet, scheduler, params


def _images(spec: dict) -> list[tuple[Path, str]]:
    import csv

    data = Path(spec["data"])
    with open(data / "metadata.csv", newline="", encoding="utf-8") as fh:
        return [(data / row["filename"], row["prompt"]) for row in csv.DictReader(fh)]


def worker_diffusers(spec: dict) -> dict:
    """The training loop of diffusers' train_text_to_image_lora.py (v0.3x), minus validation and saving."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from PIL import Image
    from transformers import get_scheduler

    accelerator = Accelerator(mixed_precision=spec["mixed_precision"], cpu=spec["device"] == "cpu")
    device, dtype = accelerator.device, _device_and_dtype(spec)[1]
    torch.manual_seed(0)
    tokenizer, text_encoder, vae, unet, noise_scheduler, params = _load_sd(spec, device, dtype)
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    res = spec["resolution"]

    def transform(path: Path) -> torch.Tensor:  # Resize(res, bilinear) + CenterCrop(res) + ToTensor + Normalize([0.5])
        img = Image.open(path).convert("RGB")
        scale = res / min(img.size)
        img = img.resize((max(res, round(img.width * scale)), max(res, round(img.height * scale))),
                         Image.Resampling.BILINEAR)
        left, top = (img.width - res) // 2, (img.height - res) // 2
        arr = np.asarray(img.crop((left, top, left + res, top + res)), dtype=np.float32) / 255.0
        return torch.from_numpy(arr).permute(2, 0, 1) * 2 - 1

    rows = _images(spec)

    class Dataset(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            path, caption = rows[i]
            ids = tokenizer(caption, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                            return_tensors="pt").input_ids[0]
            return {"pixel_values": transform(path), "input_ids": ids}

    def collate_fn(examples):
        pixel_values = torch.stack([e["pixel_values"] for e in examples]).contiguous(memory_format=torch.contiguous_format)
        return {"pixel_values": pixel_values.float(), "input_ids": torch.stack([e["input_ids"] for e in examples])}

    loader = torch.utils.data.DataLoader(Dataset(), shuffle=True, collate_fn=collate_fn, batch_size=spec["batch"],
                                         num_workers=0)
    steps = spec["epochs"] * len(loader)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0, num_training_steps=steps)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    unet.train()
    ends, per_step = [], []
    start = clock()
    for _ in range(spec["epochs"]):
        train_loss = 0.0
        for batch in loader:
            with accelerator.accumulate(unet):
                latents = vae.encode(batch["pixel_values"].to(dtype=dtype)).latent_dist.sample()
                latents = latents * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                bsz = latents.shape[0]
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device)
                timesteps = timesteps.long()
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
                target = noise
                model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
                loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
                avg_loss = accelerator.gather(loss.repeat(spec["batch"])).mean()
                train_loss += avg_loss.item()
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            ends.append(clock())
            per_step.append(bsz)
    return _result(spec, ends, start, per_step, final_loss=loss.item())


def worker_bare(spec: dict) -> dict:
    """Forward / backward / step over latents and text embeddings computed beforehand and held in memory."""
    import numpy as np
    import torch

    from lora_scripts.data.images import load_image_tensor

    device, dtype = _device_and_dtype(spec)
    torch.manual_seed(0)
    tokenizer, text_encoder, vae, unet, noise_scheduler, params = _load_sd(spec, device, dtype)
    rows = _images(spec)
    means, stds, hiddens = [], [], []
    with torch.no_grad():  # the cache, not timed
        for path, caption in rows:
            pixels = torch.from_numpy(load_image_tensor(path, spec["resolution"], np.random.default_rng(0)))
            dist = vae.encode(pixels[None].to(device, dtype)).latent_dist
            means.append(dist.mean[0]), stds.append(dist.std[0])
            ids = tokenizer(caption, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                            return_tensors="pt").input_ids
            hiddens.append(text_encoder(ids.to(device))[0][0])
    mean, std, hidden = torch.stack(means), torch.stack(stds), torch.stack(hiddens)
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2, fused=True)  # as ours: fused on CPU too
    scaling, batch, n = vae.config.scaling_factor, spec["batch"], len(rows)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if spec["mixed_precision"] == "bf16" else nullcontext()
    unet.train()
    ends, per_step = [], []
    start = clock()
    for _ in range(spec["epochs"]):
        order = torch.randperm(n)
        for s in range(0, n - batch + 1, batch):
            idx = order[s:s + batch]
            latents = (mean[idx] + std[idx] * torch.randn_like(std[idx])) * scaling
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, 1000, (batch,), device=device)
            noisy = noise_scheduler.add_noise(latents.float(), noise.float(), timesteps)
            with autocast:
                pred = unet(noisy.to(dtype), timesteps, hidden[idx]).sample
            loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            ends.append(clock())
            per_step.append(batch)
    return _result(spec, ends, start, per_step, final_loss=loss.item())


WORKERS = {"ours": worker_ours, "diffusers": worker_diffusers, "bare": worker_bare}


# ---------------------------------------------------------------------------------------------------------------
# driver

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_driver_args(parser, CONTENDERS, batch=4)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2, help="steps excluded from the steady rate")
    parser.add_argument("--calibrate", action="store_true", help="also time UNet forward vs VAE encode")
    parser.add_argument("--sd15-time", action="store_true", help="with --calibrate: also time SD1.5 at 512 px here")
    args = parser.parse_args()
    if args.worker:
        emit(WORKERS[args.worker](json.loads(args.spec)))
        return

    import torch

    extra = prepare_driver(args)
    torch.manual_seed(0)
    shape = MODELS["sd15" if args.device == "cuda" else "small"]
    mixed = "bf16" if args.device == "cuda" else "no"
    tmp = Path(tempfile.mkdtemp(prefix="image-speed-"))
    print(f"building the model and {args.images} images in {tmp}", flush=True)
    from lora_scripts.testing import make_captioned_images

    model = make_sd_shaped_model(tmp / "model", shape)
    data = make_captioned_images(tmp / "data", count=args.images, size=shape["resolution"] + 16)
    u_f, v_f, t_f = flops(shape)
    sd_u, sd_v, sd_t = flops(MODELS["sd15"])
    calib = ""
    if args.calibrate:
        tu, tv = time_ratio(shape, args.batch)
        calib = f" Measured here: UNet forward {tu * 1e3:.1f} ms/image, VAE encode {tv * 1e3:.1f} ms/image, " \
                f"ratio {tv / tu:.2f}."
        if args.sd15_time:
            su, sv = time_ratio(MODELS["sd15"], 1, repeats=2)
            calib += f" SD1.5 at 512 px measured here: UNet forward {su:.2f} s, VAE encode {sv:.2f} s, ratio {sv / su:.2f}."
    spec = dict(model=str(model), data=str(data), resolution=shape["resolution"], batch=args.batch,
                epochs=args.epochs, rank=args.rank, warmup=args.warmup, device=args.device, mixed_precision=mixed,
                ours_extra=extra)
    contenders = args.contenders.split(",")
    results = run_contenders(__file__, spec, tmp, contenders, args.repeats)

    rows = rate_table(results, contenders, "images", "img", "{:.2f}")
    ratios = []
    if "ours" in results and "diffusers" in results:
        for key, label in (("e2e_img_cpu_s", "end to end incl. cache build, per CPU-s"),
                           ("steady_img_cpu_s", "steady, per CPU-s"), ("steady_img_s", "steady, wall clock")):
            ratios.append(f"- ours / diffusers-style reference, images/s ({label}): "
                          f"**{spread(paired_ratio(results, 'ours', 'diffusers', key), '{:.2f}')}×** (target ≥ 2.0×)")
    ratios += bare_overhead_lines(results, "img", "image")
    if "ours" in results:
        ratios.append(f"- our one-off cache build: {median([x['cache_build_s'] for x in results['ours']]):.1f} s "
                      f"(included in ours' end-to-end rate)")
    header = [
        f"### Image ({args.device})",
        "",
        f"Command: `{command_line()}`  ",
        f"Machine: {machine_info(args.device)}  ",
        f"Model: SD-shaped, UNet {shape['unet']}, VAE {shape['vae']}, text hidden {shape['hidden']} "
        f"x {shape['text_layers']} layers, {shape['resolution']} px; {args.images} images, {args.epochs} epochs, "
        f"batch {args.batch}, LoRA rank {args.rank} on {', '.join(TARGETS)}, precision {mixed}; "
        f"medians (min–max) of {args.repeats} runs each, steady state after {args.warmup} warm-up steps; memory: "
        f"{memory_label(args.device)}.  ",
        f"Cost per image, FLOPs: UNet forward {u_f / 1e9:.2f} G, VAE encode {v_f / 1e9:.2f} G "
        f"(ratio {v_f / u_f:.2f}), text encoder {t_f / 1e9:.3f} G; SD1.5 at 512 px: {sd_u / 1e9:.0f} G, "
        f"{sd_v / 1e9:.0f} G (ratio {sd_v / sd_u:.2f}), {sd_t / 1e9:.1f} G.{calib}",
    ]
    publish(f"image-{args.device}", header, rows, ratios, args.no_doc)


if __name__ == "__main__":
    main()

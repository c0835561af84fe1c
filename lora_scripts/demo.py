"""``lora-scripts demo``: the whole image workflow on a tiny built-in model and data, offline, in a few minutes."""

from __future__ import annotations

import time
from pathlib import Path

import yaml


def render_comparison(base_model: Path, lora_file: Path, prompt: str, out_path: Path, seed: int = 0) -> Path:
    """Render ``prompt`` with and without the LoRA from the same seed, side by side, into one PNG."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from PIL import Image

    pipe = StableDiffusionPipeline.from_pretrained(base_model, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    def render() -> Image.Image:
        gen = torch.Generator().manual_seed(seed)
        return pipe(prompt, num_inference_steps=20, generator=gen, height=32, width=32, guidance_scale=5.0).images[0]

    without = render()
    pipe.load_lora_weights(str(lora_file))
    with_lora = render()
    import numpy as np

    diff = np.abs(np.asarray(with_lora, dtype=np.float32) - np.asarray(without, dtype=np.float32)).mean()
    print(f"  mean |with LoRA - without| per pixel: {diff:.2f} / 255 (a tiny random model draws noise either way)")
    canvas = Image.new("RGB", (without.width * 2 + 4, without.height), "white")
    canvas.paste(without, (0, 0))
    canvas.paste(with_lora, (without.width + 4, 0))
    canvas = canvas.resize((canvas.width * 4, canvas.height * 4), Image.Resampling.NEAREST)
    canvas.save(out_path)
    return out_path


def run_demo(output_dir: Path, steps: int = 200) -> None:
    from .config import build_config
    from .testing import make_captioned_images, make_tiny_sd_model, tiny_image_config
    from .train.loop import train

    t0 = time.time()
    output_dir.mkdir(parents=True, exist_ok=True)
    model_dir = output_dir / "tiny-sd"
    data_dir = output_dir / "data" / "shapes"
    print(f"[1/4] building a tiny Stable Diffusion model in {model_dir} and 12 captioned images in {data_dir}")
    if not (model_dir / "model_index.json").exists():
        make_tiny_sd_model(model_dir)
    make_captioned_images(data_dir, count=12)

    config_path = output_dir / "demo_config.yaml"
    raw = tiny_image_config(
        model_dir, data_dir, output_dir / "lora", max_train_steps=steps, batch_size=4, save_steps=10,
        keep_last_checkpoints=2, learning_rate=2e-3, lr_scheduler="cosine", lr_warmup_steps=2, output_name="demo_lora",
        logging={"tensorboard": True, "loss_csv": True}, overwrite=True,
    )
    config_path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    print(f"[2/4] training with {config_path} (same as: lora-scripts train --config {config_path})")
    result = train(build_config(raw, str(config_path)))

    print("[3/4] rendering 'a red circle in the style of lora' without | with the LoRA")
    kohya_file = output_dir / "lora" / "demo_lora.safetensors"
    sample = render_comparison(model_dir, kohya_file, "a red circle in the style of lora", output_dir / "sample_without_with_lora.png")

    print("[4/4] done in %.0f s" % (time.time() - t0))
    print(f"  speed:        {result.seconds_per_step:.3f} s/step (median), peak memory {result.peak_memory_mb:.0f} MB")
    print(f"  final loss:   {result.final_loss:.4f}")
    print(f"  kohya LoRA:   {kohya_file}  (A1111 / ComfyUI)")
    print(f"  diffusers:    {output_dir / 'lora' / 'diffusers' / 'pytorch_lora_weights.safetensors'}")
    print(f"  checkpoint:   {result.last_checkpoint}  (resume with --resume latest)")
    print(f"  loss log:     {output_dir / 'lora' / 'logs' / 'loss.csv'}  (tensorboard --logdir {output_dir / 'lora' / 'logs'})")
    print(f"  sample:       {sample}")


def run_family_demo(output_dir: Path, family: str, steps: int = 60) -> None:
    """A transformer family (``flux``, ``sd3``…) end to end on its tiny model: train, export, render without | with."""
    import numpy as np
    import torch
    from PIL import Image

    from .config import SamplePrompt, build_config
    from .tasks.image.families import resolve_family
    from .testing import make_captioned_images, tiny_image_config
    from .tiny_models import make_tiny_model
    from .train.loop import train

    t0 = time.time()
    output_dir.mkdir(parents=True, exist_ok=True)
    model_dir, data_dir = output_dir / f"tiny-{family}", output_dir / "data" / "shapes"
    print(f"[1/4] building a tiny {family} model in {model_dir} and 12 captioned images in {data_dir}")
    if not (model_dir / "model_index.json").exists():
        make_tiny_model(family, model_dir)
    make_captioned_images(data_dir, count=12)
    raw = tiny_image_config(model_dir, data_dir, output_dir / "lora", max_train_steps=steps, batch_size=4,
                            save_steps=max(1, steps // 2), learning_rate=5e-3, output_name="demo_lora",
                            text_max_length=16, overwrite=True, logging={"tensorboard": False, "loss_csv": True})
    config_path = output_dir / "demo_config.yaml"
    config_path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    print(f"[2/4] training with {config_path} (same as: lora-scripts train --config {config_path})")
    cfg = build_config(raw, str(config_path))
    result = train(cfg)

    print("[3/4] rendering 'a red circle in the style of lora' without | with the LoRA (the family's pipeline)")
    import diffusers

    fam = resolve_family(cfg)
    pipe = getattr(diffusers, fam.pipeline_class).from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    kwargs = fam.sample_kwargs(SamplePrompt(prompt="a red circle in the style of lora", guidance_scale=3.5))

    def render() -> Image.Image:
        gen = torch.Generator().manual_seed(0)
        return pipe("a red circle in the style of lora", height=32, width=32, num_inference_steps=8, generator=gen,
                    **kwargs).images[0]

    without = render()
    pipe.load_lora_weights(str(output_dir / "lora" / "diffusers"))
    with_lora = render()
    diff = np.abs(np.asarray(with_lora, dtype=np.float32) - np.asarray(without, dtype=np.float32)).mean()
    canvas = Image.new("RGB", (without.width * 2 + 4, without.height), "white")
    canvas.paste(without, (0, 0))
    canvas.paste(with_lora, (without.width + 4, 0))
    sample = output_dir / "sample_without_with_lora.png"
    canvas.resize((canvas.width * 4, canvas.height * 4), Image.Resampling.NEAREST).save(sample)
    print(f"  mean |with LoRA - without| per pixel: {diff:.2f} / 255")
    print("[4/4] done in %.0f s" % (time.time() - t0))
    print(f"  speed:        {result.seconds_per_step:.3f} s/step (median), peak memory {result.peak_memory_mb:.0f} MB")
    print(f"  final loss:   {result.final_loss:.4f}")
    print(f"  single file:  {output_dir / 'lora' / 'demo_lora.safetensors'}  (ComfyUI / kohya layout)")
    print(f"  diffusers:    {output_dir / 'lora' / 'diffusers' / 'pytorch_lora_weights.safetensors'}")
    print(f"  sample:       {sample}")


def run_text_demo(output_dir: Path, steps: int = 60) -> None:
    """The text task on a tiny LLaMA-shaped model and the built-in instruction set."""
    from .config import build_config
    from .testing import make_instruction_data, make_tiny_causal_lm
    from .train.loop import train

    t0 = time.time()
    output_dir.mkdir(parents=True, exist_ok=True)
    model_dir, data_file = output_dir / "tiny-llama", output_dir / "data" / "instructions.jsonl"
    print(f"[1/3] building a tiny LLaMA-shaped model in {model_dir} and an instruction set in {data_file}")
    if not (model_dir / "config.json").exists():
        make_tiny_causal_lm(model_dir, "llama")
    make_instruction_data(data_file, "alpaca", repeat=4)
    raw = {
        "task": "text", "base_model": str(model_dir), "metadata_path": str(data_file),
        "output_dir": str(output_dir / "text_lora"), "lora_rank": 8, "batch_size": 4, "max_train_steps": steps,
        "learning_rate": 5e-3, "save_steps": max(1, steps // 2), "packing": True, "max_seq_length": 128,
        "val_size": 0.1, "sample_prompts": ["Name a colour."], "sample_max_new_tokens": 12, "overwrite": True,
    }
    config_path = output_dir / "demo_text_config.yaml"
    config_path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    print(f"[2/3] training with {config_path} (same as: lora-scripts train --config {config_path})")
    result = train(build_config(raw, str(config_path)))
    print("[3/3] done in %.0f s" % (time.time() - t0))
    print(f"  speed:        {result.seconds_per_step:.3f} s/step (median), peak memory {result.peak_memory_mb:.0f} MB")
    print(f"  PEFT adapter: {output_dir / 'text_lora' / 'adapter'}  (PeftModel.from_pretrained)")
    print(f"  samples:      {output_dir / 'text_lora' / 'logs' / 'samples.txt'}")
    print(f"  merge:        lora-scripts export --adapter {output_dir / 'text_lora' / 'adapter'} --merge --output {output_dir / 'merged'}")

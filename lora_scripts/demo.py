"""``lora-scripts demo``: the whole image workflow on a tiny built-in model and data, offline, in a few minutes."""

from __future__ import annotations

import time
from pathlib import Path

import yaml


def comparison_grid(without: list, with_lora: list, columns: int, out_path: Path, scale: int = 4) -> Path:
    """Two rows (without the LoRA on top, with it below) of ``columns`` images each, same prompts and seeds."""
    from PIL import Image

    w, h = without[0].size
    canvas = Image.new("RGB", (columns * (w + 2) - 2, 2 * h + 4), "white")
    for row, images in enumerate((without, with_lora)):
        for i, img in enumerate(images[:columns]):
            canvas.paste(img, (i * (w + 2), row * (h + 4)))
    canvas.resize((canvas.width * scale, canvas.height * scale), Image.Resampling.NEAREST).save(out_path)
    return out_path


def run_demo(output_dir: Path, steps: int | None = None) -> None:
    """Teach the pretrained tiny SD base a style it does not know (``in zkq style``: a deep purple background) with
    :data:`~lora_scripts.learning.STYLE_RECIPE`, then render prompts *not* in the training captions without | with
    the LoRA and measure the effect."""
    from PIL import Image

    from .config import build_config
    from .learning import (STYLE_RECIPE, STYLE_RGB, make_style_images, render_sd, style_distance, style_prompts,
                           style_share)
    from .plots import plot_loss
    from .pretrain import SD_BASE
    from .testing import tiny_image_config
    from .train.loop import train

    t0, cpu0 = time.time(), time.process_time()
    output_dir.mkdir(parents=True, exist_ok=True)
    data_dir = output_dir / "data" / "zkq"
    make_style_images(data_dir)
    print(f"[1/4] base: the pretrained tiny Stable Diffusion in {SD_BASE} (draws coloured shapes on a light "
          f"background); concept: 'in zkq style' = background {STYLE_RGB}, 16 images in {data_dir}")

    recipe = {**STYLE_RECIPE, **({"max_train_steps": steps} if steps else {})}
    total = recipe["max_train_steps"]
    config_path = output_dir / "demo_config.yaml"
    raw = tiny_image_config(
        SD_BASE, data_dir, output_dir / "lora", **recipe, save_steps=max(1, total // 2), keep_last_checkpoints=2,
        output_name="demo_lora", logging={"tensorboard": True, "loss_csv": True}, overwrite=True,
    )
    config_path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    print(f"[2/4] training with {config_path} (same as: lora-scripts train --config {config_path})")
    result = train(build_config(raw, str(config_path)))

    prompts = style_prompts()
    print("[3/4] rendering prompts not in the training captions, without (top) | with (bottom) the LoRA:")
    for prompt in prompts:
        print(f"    {prompt}")
    kohya_file = output_dir / "lora" / "demo_lora.safetensors"
    without = render_sd(SD_BASE, prompts)
    with_lora = render_sd(SD_BASE, prompts, kohya_file)
    sample = comparison_grid(without, with_lora, len(prompts), output_dir / "sample_without_with_lora.png")
    loss_png = plot_loss(output_dir / "lora" / "logs" / "loss.csv", "image LoRA: in zkq style")
    ceiling = style_share([Image.open(path) for path in sorted(data_dir.glob("*.png"))])
    print(f"  effect: share of pixels in the style's purple, held-out prompts: base {style_share(without):.1%} -> "
          f"with LoRA {style_share(with_lora):.1%} (the training images: {ceiling:.0%}, the rest is the shape); "
          f"mean RGB distance to it: {style_distance(without):.0f} -> {style_distance(with_lora):.0f} (0 = all purple)")

    print(f"[4/4] done in {time.time() - t0:.0f} s ({time.process_time() - cpu0:.0f} CPU s in this process)")
    print(f"  speed:        {result.seconds_per_step:.3f} s/step (median), peak memory {result.peak_memory_mb:.0f} MB")
    print(f"  final loss:   {result.final_loss:.4f}")
    print(f"  kohya LoRA:   {kohya_file}  (A1111 / ComfyUI)")
    print(f"  diffusers:    {output_dir / 'lora' / 'diffusers' / 'pytorch_lora_weights.safetensors'}")
    print(f"  checkpoint:   {result.last_checkpoint}  (resume with --resume latest)")
    print(f"  loss log:     {output_dir / 'lora' / 'logs' / 'loss.csv'}  (tensorboard --logdir {output_dir / 'lora' / 'logs'})")
    print(f"  loss curve:   {loss_png}")
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


def run_text_demo(output_dir: Path, steps: int = 500) -> None:
    """Teach the pretrained tiny LM a new answer format (``"Arr! <answer>"``) and measure it on held-out prompts."""
    from .config import build_config
    from .learning import FORMAT_PREFIX, format_share, format_split, generate_answers, write_format_data
    from .plots import plot_loss
    from .pretrain import LM_BASE
    from .train.loop import train

    t0 = time.time()
    output_dir.mkdir(parents=True, exist_ok=True)
    data_file = output_dir / "data" / "pirate.jsonl"
    train_pairs, held_out = format_split()
    write_format_data(data_file, train_pairs)
    print(f"[1/3] base: the pretrained tiny LLaMA-shaped LM in {LM_BASE} (answers simple instructions); new format: "
          f"'{FORMAT_PREFIX} <answer>', {len(train_pairs)} examples in {data_file}")
    prompts = [p for p, _ in held_out]
    raw = {
        "task": "text", "base_model": str(LM_BASE), "metadata_path": str(data_file),
        "output_dir": str(output_dir / "text_lora"), "lora_rank": 8, "lora_alpha": 16, "target_modules": "all-linear",
        "batch_size": 8, "max_train_steps": steps, "learning_rate": 1e-3, "save_steps": max(1, steps // 2),
        "max_seq_length": 64, "sample_prompts": prompts[:2], "sample_max_new_tokens": 8, "overwrite": True,
        "logging": {"tensorboard": False, "loss_csv": True},
    }
    config_path = output_dir / "demo_text_config.yaml"
    config_path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    print(f"[2/3] training with {config_path} (same as: lora-scripts train --config {config_path})")
    result = train(build_config(raw, str(config_path)))
    adapter = output_dir / "text_lora" / "adapter"
    before = generate_answers(LM_BASE, prompts, max_new_tokens=8)
    after = generate_answers(LM_BASE, prompts, adapter, max_new_tokens=8)
    loss_png = plot_loss(output_dir / "text_lora" / "logs" / "loss.csv", "text LoRA: the 'Arr!' format")
    print("[3/3] held-out prompts (not in the training data), before -> after:")
    for prompt, a, b in list(zip(prompts, before, after))[:6]:
        print(f"    {prompt!r}: {a!r} -> {b!r}")
    print(f"  effect: held-out answers in the '{FORMAT_PREFIX}' format: base {format_share(before):.0%} -> "
          f"with LoRA {format_share(after):.0%} (of {len(prompts)})")
    print("  done in %.0f s" % (time.time() - t0))
    print(f"  speed:        {result.seconds_per_step:.3f} s/step (median), peak memory {result.peak_memory_mb:.0f} MB")
    print(f"  PEFT adapter: {adapter}  (PeftModel.from_pretrained)")
    print(f"  samples:      {output_dir / 'text_lora' / 'logs' / 'samples.txt'}")
    print(f"  loss curve:   {loss_png}")
    print(f"  merge:        lora-scripts export --adapter {adapter} --merge --output {output_dir / 'merged'}")

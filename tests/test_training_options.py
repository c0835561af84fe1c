"""Loss options (noise offset, Min-SNR), rsLoRA export, and the optimizer choice."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from safetensors.torch import load_file

from lora_scripts.cli import main
from lora_scripts.config import load_config
from lora_scripts.tasks.image import min_snr_weights
from lora_scripts.train.loop import Trainer, train


def losses(path):
    return [float(r["loss"]) for r in csv.DictReader(open(path / "logs" / "loss.csv"))]


def test_noise_offset_changes_the_loss_and_zero_changes_nothing(write_config, tmp_path):
    train(load_config(write_config("a.yaml", output="plain", max_train_steps=2)), show_progress=False)
    train(load_config(write_config("b.yaml", output="zero", max_train_steps=2, noise_offset=0.0)), show_progress=False)
    train(load_config(write_config("c.yaml", output="offset", max_train_steps=2, noise_offset=0.1)), show_progress=False)
    assert losses(tmp_path / "plain") == losses(tmp_path / "zero")
    assert losses(tmp_path / "plain") != losses(tmp_path / "offset")


def test_min_snr_weights_follow_the_formula():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([1, 500, 999])
    a = sched.alphas_cumprod[t]
    snr = a / (1 - a)
    expected = torch.minimum(snr, torch.tensor(5.0)) / snr
    assert torch.allclose(min_snr_weights(sched, t, 5.0), expected)
    assert min_snr_weights(sched, t, 5.0)[0] < 0.01 and min_snr_weights(sched, t, 5.0)[2] == pytest.approx(1.0)
    vsched = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    a = vsched.alphas_cumprod[t]
    snr = a / (1 - a)
    assert torch.allclose(min_snr_weights(vsched, t, 5.0), torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))


def test_min_snr_training_runs(write_config, tmp_path):
    result = train(load_config(write_config(max_train_steps=2, min_snr_gamma=5.0)), show_progress=False)
    assert math.isfinite(result.final_loss)


def test_rslora_export_loads_in_diffusers_with_the_trained_scale(make_cfg, tiny_sd):
    from diffusers import StableDiffusionPipeline

    trainer = Trainer(make_cfg(max_train_steps=2, use_rslora=True, lora_rank=4, lora_alpha=2, learning_rate=5e-2),
                      show_progress=False)
    trainer.run()
    kohya = trainer.cfg.output_dir / "out.safetensors"
    alphas = {v.item() for k, v in load_file(str(kohya)).items() if k.endswith(".alpha")}
    assert len(alphas) == 1 and alphas.pop() == pytest.approx(2 * math.sqrt(4))  # alpha/sqrt(r) as an alpha/r alpha
    gen = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(1, 4, 16, 16, generator=gen), torch.tensor([10]), torch.randn(1, 16, 32, generator=gen)
    with torch.no_grad():
        expected = trainer.accelerator.unwrap_model(trainer.model).unet.eval()(x, t, ctx).sample
        pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
        pipe.load_lora_weights(str(kohya))
        assert (pipe.unet(x, t, ctx).sample - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("name, lr", [("adafactor", 1e-3), ("prodigy", 1.0)])
def test_other_optimizers_train(write_config, tmp_path, name, lr):
    trainer = Trainer(load_config(write_config(max_train_steps=2, optimizer=name, learning_rate=lr)), show_progress=False)
    result = trainer.run()
    assert math.isfinite(result.final_loss)
    assert type(trainer.optimizer.optimizer).__name__.lower() == name
    lora_b = [p for n, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # the optimizer moved the zero-initialised up-projections


@pytest.mark.parametrize("name", ["adamw8bit", "paged_adamw8bit"])
def test_8bit_optimizers_refuse_on_cpu(write_config, capsys, name):
    assert main(["train", "--config", str(write_config(optimizer=name)), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs a CUDA GPU" in err and "\n" not in err

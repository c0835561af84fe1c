"""Loop options that must not change the result (gradient checkpointing) or must run everywhere (bf16 on CPU),
v-prediction models, and hub ids that cannot be reached."""

from __future__ import annotations

import math

import torch
from safetensors import safe_open

from lora_scripts.cli import main
from lora_scripts.config import load_config
from lora_scripts.testing import make_tiny_sd_model
from lora_scripts.train.loop import train

from .helpers import assert_same_tensors


def test_gradient_checkpointing_gives_the_same_lora(write_config, tmp_path):
    train(load_config(write_config("a.yaml", output="plain", max_train_steps=2)), show_progress=False)
    train(load_config(write_config("b.yaml", output="ckpt", max_train_steps=2, gradient_checkpointing=True)),
          show_progress=False)
    assert_same_tensors(tmp_path / "plain/checkpoints/step-2/adapter.safetensors",
                        tmp_path / "ckpt/checkpoints/step-2/adapter.safetensors", atol=1e-6)


def test_bf16_autocast_on_cpu_trains(write_config):
    result = train(load_config(write_config(max_train_steps=2, mixed_precision="bf16")), show_progress=False)
    assert result.steps == 2 and math.isfinite(result.final_loss)


def test_v_prediction_model_trains_and_is_labelled(image_data, tmp_path):
    from lora_scripts.config import build_config
    from lora_scripts.testing import tiny_image_config

    model = make_tiny_sd_model(tmp_path / "tiny-v", prediction_type="v_prediction")
    cfg = build_config(tiny_image_config(model, image_data, tmp_path / "vout", max_train_steps=2, output_name="v"))
    result = train(cfg, show_progress=False)
    assert math.isfinite(result.final_loss)
    with safe_open(str(tmp_path / "vout" / "v.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "sd_v1_v" and meta["ss_prediction_type"] == "v_prediction"


def test_learning_rate_schedule_is_followed(write_config, tmp_path):
    import csv

    train(load_config(write_config(max_train_steps=4, lr_scheduler="linear", lr_warmup_steps=2, learning_rate=1e-3)),
          show_progress=False)
    lrs = [float(r["lr"]) for r in csv.DictReader(open(tmp_path / "out" / "logs" / "loss.csv"))]
    assert lrs == [5e-4, 1e-3, 5e-4, 0.0]


def test_unreachable_hub_id_is_a_one_line_error(write_config, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["train", "--config", str(write_config(base_model="no-such-org/no-such-model")), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: base_model: could not load 'no-such-org/no-such-model'")
    assert "\n" not in err


def test_lora_params_are_the_only_trainable_ones(make_cfg):
    from lora_scripts.train.loop import Trainer

    trainer = Trainer(make_cfg(max_train_steps=1), show_progress=False)
    trainer.run()
    unet = trainer.accelerator.unwrap_model(trainer.model)
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any(p.requires_grad for p in trainer.task.vae.parameters())
    assert not any(p.requires_grad for p in trainer.task.text_encoders[0].parameters())
    assert all(p.dtype == torch.float32 for n, p in unet.named_parameters() if p.requires_grad)


def test_sample_images_during_training_do_not_disturb_resume(write_config, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from .helpers import assert_same_tensors

    samples = [{"prompt": "a red circle", "seed": 1, "steps": 3, "negative_prompt": "blurry"},
               "a blue square"]
    train(load_config(write_config("a.yaml", output="plain", max_train_steps=4)), show_progress=False)
    train(load_config(write_config("b.yaml", output="sampled", max_train_steps=4, sample_prompts=samples,
                                   sample_every_n_steps=2, lora_dropout=0.0, logging={"tensorboard": True})),
          show_progress=False)
    images = sorted(p.name for p in (tmp_path / "sampled" / "samples").iterdir())
    assert images == ["step-000002-0.png", "step-000002-1.png", "step-000004-0.png", "step-000004-1.png"]
    from PIL import Image

    assert Image.open(tmp_path / "sampled" / "samples" / images[0]).size == (32, 32)
    acc = EventAccumulator(str(tmp_path / "sampled" / "logs"))
    acc.Reload()
    assert "samples/0" in acc.Tags()["images"]
    assert_same_tensors(tmp_path / "plain/checkpoints/step-4/adapter.safetensors",
                        tmp_path / "sampled/checkpoints/step-4/adapter.safetensors")

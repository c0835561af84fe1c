"""The optimizers beyond AdamW: CAME and schedule-free AdamW train a tiny SD model, schedule-free resumes bit for bit
(its evaluation weights are what checkpoints hold), Adafactor trains a transformer family (FLUX.1)."""

from __future__ import annotations

import math

import pytest
import torch

from lora_scripts.config import load_config
from lora_scripts.train.loop import Trainer, train

from .helpers import assert_same_tensors


def _moved_lora(trainer):
    lora_b = [p for n, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters() if "lora_B" in n]
    return lora_b and any(p.abs().sum() > 0 for p in lora_b)  # the zero-initialised up-projections moved


@pytest.mark.parametrize("name, cls", [("came", "CAME"), ("schedule_free_adamw", "AdamWScheduleFree")])
def test_came_and_schedule_free_train(write_config, name, cls):
    trainer = Trainer(load_config(write_config(max_train_steps=3, optimizer=name)), show_progress=False)
    result = trainer.run()
    assert math.isfinite(result.final_loss)
    assert type(trainer.optimizer.optimizer).__name__ == cls
    assert _moved_lora(trainer)


def test_schedule_free_resume_is_exact(write_config, tmp_path):
    """Checkpoints hold schedule-free's averaged (eval) weights and the optimizer in eval mode; the resumed run
    switches to the train weights as the uninterrupted one did after saving, so both end bit for bit the same."""
    common = dict(optimizer="schedule_free_adamw", save_steps=2, lora_dropout=0.1, lr_warmup_steps=2)
    train(load_config(write_config("a.yaml", output="straight", max_train_steps=4, **common)), show_progress=False)
    train(load_config(write_config("b.yaml", output="split", max_train_steps=2, **common)), show_progress=False)
    result = train(load_config(write_config("b.yaml", output="split", max_train_steps=4, resume="latest", **common)),
                   show_progress=False)
    assert result.resumed_from.name == "step-2"
    assert_same_tensors(tmp_path / "straight/checkpoints/step-4/adapter.safetensors",
                        tmp_path / "split/checkpoints/step-4/adapter.safetensors")
    assert_same_tensors(tmp_path / "straight/straight.safetensors", tmp_path / "split/split.safetensors")


def test_schedule_free_exports_its_averaged_weights(write_config):
    """The exported LoRA is schedule-free's x (the average it evaluates with), not the y its gradients are taken
    at: y = lerp(x, z, 1 - beta1) differs from x once z has moved."""
    trainer = Trainer(load_config(write_config(max_train_steps=3, optimizer="schedule_free_adamw")),
                      show_progress=False)
    trainer.run()
    from safetensors.torch import load_file

    optimizer = trainer.optimizer.optimizer
    assert not optimizer.param_groups[0]["train_mode"]  # left in eval mode after the export
    params = {n: p for n, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters() if p.requires_grad}
    saved = load_file(str(trainer.cfg.output_dir / "checkpoints" / "step-3" / "adapter.safetensors"))
    assert saved.keys() == params.keys()
    assert all(torch.equal(params[k].detach(), v) for k, v in saved.items())  # the checkpoint holds x
    x = {k: p.detach().clone() for k, p in params.items()}
    optimizer.train()
    assert any(not torch.equal(x[k], p.detach()) for k, p in params.items() if "lora_B" in k)  # y is not x


def test_adafactor_trains_a_transformer_family(tmp_path):
    import yaml

    from lora_scripts.testing import make_captioned_images, tiny_image_config
    from lora_scripts.tiny_models.flux import make_tiny_model

    model = make_tiny_model(tmp_path / "tiny-flux")
    data = make_captioned_images(tmp_path / "data", count=2)
    path = tmp_path / "flux.yaml"
    path.write_text(yaml.safe_dump(tiny_image_config(model, data, tmp_path / "out", text_max_length=16,
                                                     max_train_steps=2, optimizer="adafactor", learning_rate=1e-2)))
    trainer = Trainer(load_config(path), show_progress=False)
    result = trainer.run()
    assert math.isfinite(result.final_loss)
    assert type(trainer.optimizer.optimizer).__name__ == "Adafactor"
    assert _moved_lora(trainer)

"""The exported files load with diffusers' own loader and reproduce the trained UNet exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lora_scripts.export.kohya import peft_to_kohya, safetensors_model_hash
from lora_scripts.train.loop import Trainer


@pytest.fixture(scope="module")
def trained(tiny_sd, tmp_path_factory):
    """Train once (rank 4, alpha 2: alpha != rank on purpose) and keep the trainer for its UNet."""
    from lora_scripts.config import build_config
    from lora_scripts.testing import make_captioned_images, tiny_image_config

    tmp = tmp_path_factory.mktemp("export")
    data = make_captioned_images(tmp / "data", count=4)
    cfg = build_config(tiny_image_config(tiny_sd, data, tmp / "out", max_train_steps=3, lora_rank=4, lora_alpha=2,
                                         learning_rate=5e-2, output_name="exported"))
    trainer = Trainer(cfg, show_progress=False)
    trainer.run()
    return trainer


def unet_inputs():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 16, 16, generator=gen), torch.tensor([10, 500]), torch.randn(2, 16, 32, generator=gen)


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_export_loads_in_diffusers_and_matches_trained_unet(trained, tiny_sd, fmt):
    from diffusers import StableDiffusionPipeline

    out = trained.cfg.output_dir
    path = out / "exported.safetensors" if fmt == "kohya" else out / "diffusers"
    x, t, ctx = unet_inputs()
    unet = trained.accelerator.unwrap_model(trained.model).unet.eval()
    with torch.no_grad():
        expected = unet(x, t, ctx).sample

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    with torch.no_grad():
        base = pipe.unet(x, t, ctx).sample
    pipe.load_lora_weights(str(path))
    with torch.no_grad():
        got = pipe.unet(x, t, ctx).sample
    assert (base - expected).abs().max() > 1e-3, "the LoRA should change the UNet's output"
    assert (got - expected).abs().max() <= 1e-5


def test_kohya_file_has_true_alpha_keys_and_metadata(trained):
    path = trained.cfg.output_dir / "exported.safetensors"
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    alphas = {k: v for k, v in tensors.items() if k.endswith(".alpha")}
    assert alphas and all(v.item() == 2.0 for v in alphas.values())  # the true alpha, not the rank (4)
    downs = [k for k in tensors if k.endswith(".lora_down.weight")]
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in downs
    assert any("_to_out_0.lora_up.weight" in k for k in tensors)
    assert all(tensors[k].shape[0] == 4 for k in downs)
    for key in ("ss_network_dim", "ss_network_alpha", "ss_base_model_version", "ss_output_name",
                "ss_training_started_at", "ss_steps", "ss_epoch", "ss_num_train_images", "sshs_model_hash"):
        assert meta.get(key), key
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_num_train_images"] == "4"
    assert meta["sshs_model_hash"] == safetensors_model_hash(tensors)
    # provenance: the resolved config, the dataset hash, our version
    assert json.loads(meta["lora_scripts_config"])["lora_rank"] == 4
    assert len(meta["lora_scripts_dataset_hash"]) == 64 and meta["lora_scripts_version"]


def test_peft_to_kohya_rejects_foreign_keys():
    with pytest.raises(ValueError):
        peft_to_kohya({"unet.conv_in.weight": torch.zeros(1)}, "lora_unet", 1.0)

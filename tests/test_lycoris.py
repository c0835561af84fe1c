"""LoHa and LoKr through peft, trained by the real loop, exported in LyCORIS's layout and applied by the
``lycoris-lora`` package itself with the trained UNet and text-encoder outputs; continued through network_weights.
And the DoRA warning: which consumers reproduce a DoRA LoRA."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from lora_scripts.config import build_config
from lora_scripts.testing import make_captioned_images, tiny_image_config
from lora_scripts.train.loop import Trainer

from .helpers import run_cli

lycoris = pytest.importorskip("lycoris")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _train(model, tmp, **overrides) -> Trainer:
    data = make_captioned_images(tmp / "data", count=4)
    options = {"max_train_steps": 3, "learning_rate": 5e-2, "output_name": "lora", **overrides}
    trainer = Trainer(build_config(tiny_image_config(model, data, tmp / "out", **options)), show_progress=False)
    trainer.run()
    return trainer


@pytest.fixture(scope="module", params=["loha", "lokr"])
def trained(request, tiny_sd, tmp_path_factory):
    extra = {"lokr_factor": 4} if request.param == "lokr" else {}
    return _train(tiny_sd, tmp_path_factory.mktemp(request.param), network_type=request.param,
                  train_text_encoder=True, text_encoder_lr=1e-2, conv_rank=2, conv_alpha=1, **extra)


def _inputs():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 90, (1, 16), generator=gen)
    return ids, torch.randn(1, 4, 16, 16, generator=gen), torch.tensor([500])


def _outputs(unet, text_encoder):
    ids, x, t = _inputs()
    with torch.no_grad():
        ctx = text_encoder(ids)[0]
        return ctx, unet(x, t, ctx).sample


def test_lycoris_applies_the_trained_loha_lokr(trained, tiny_sd, monkeypatch):
    from diffusers import StableDiffusionPipeline
    from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights

    # create_network_from_weights first builds (and then discards) a default network over the whole UNet, which on
    # a diffusers UNet names time_embedding.linear_1 twice (by class and by name) and asserts; the modules it then
    # builds from the file are unaffected
    monkeypatch.setattr(LycorisNetworkKohya, "UNET_TARGET_REPLACE_NAME", [])

    algo = trained.cfg.network_type
    path = trained.cfg.output_dir / "lora.safetensors"
    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"])["algo"] == algo
    kinds = {k.split(".", 1)[1] for k in keys}
    assert ({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"} if algo == "loha"
            else {"lokr_w1", "alpha"}) <= kinds
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in keys)
    assert any(k.startswith("lora_unet_down_blocks_0_resnets_0_conv1.") for k in keys)  # conv_rank: the 3x3 convs
    assert not (trained.cfg.output_dir / "diffusers").exists()
    summary = json.loads((trained.cfg.output_dir / "training_summary.json").read_text())
    assert any("LyCORIS, ComfyUI and A1111" in w for w in summary["warnings"])

    network = trained.accelerator.unwrap_model(trained.model)
    expected_ctx, expected = _outputs(network.unet.eval(), network.text_encoders[0].eval())

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    base_ctx, base = _outputs(pipe.unet, pipe.text_encoder)
    # LyCORIS names text-encoder modules from named_modules(); transformers 5's CLIPTextModel has no text_model level
    te = pipe.text_encoder if hasattr(pipe.text_encoder, "text_model") else torch.nn.ModuleDict(
        {"text_model": pipe.text_encoder})
    lyco, _ = create_network_from_weights(1.0, str(path), pipe.vae, te, pipe.unet, for_inference=True)
    modules = {k.split(".", 1)[0] for k in keys}
    assert len(lyco.unet_loras) == len({m for m in modules if m.startswith("lora_unet_")})
    assert len(lyco.text_encoder_loras) == len({m for m in modules if m.startswith("lora_te_")}) > 0
    lyco.apply_to(te, pipe.unet, apply_text_encoder=True, apply_unet=True)
    got_ctx, got = _outputs(pipe.unet, pipe.text_encoder)
    assert (base - expected).abs().max() > 1e-4 and (base_ctx - expected_ctx).abs().max() > 1e-4
    torch.testing.assert_close(got_ctx, expected_ctx, atol=1e-5, rtol=0)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)

    # what the README says of diffusers: its SD loader refuses LoHa/LoKr files (if this starts passing, update it)
    fresh = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    with pytest.raises(ValueError, match="not been correctly renamed"):
        fresh.load_lora_weights(str(path))


def test_loha_lokr_continue_from_their_file(trained, tiny_sd, tmp_path):
    """network_weights with the exported file starts the run exactly where the trained one ended."""
    from lora_scripts.tasks.base import make_task

    cfg = trained.cfg
    extra = {"lokr_factor": cfg.lokr_factor} if cfg.network_type == "lokr" else {}
    data = make_captioned_images(tmp_path / "data", count=2)
    again = build_config(tiny_image_config(tiny_sd, data, tmp_path / "again", network_type=cfg.network_type,
                                           train_text_encoder=True, lora_alpha=1, conv_rank=2,
                                           network_weights=str(cfg.output_dir / "lora.safetensors"), **extra))
    task = make_task(again)
    task.check_base_model()
    task.check_data()
    model = task.load_model(torch.device("cpu"), torch.float32)
    network = trained.accelerator.unwrap_model(trained.model)
    expected_ctx, expected = _outputs(network.unet.eval(), network.text_encoders[0].eval())
    got_ctx, got = _outputs(model.unet.eval(), model.text_encoders[0].eval())
    torch.testing.assert_close(got_ctx, expected_ctx, atol=1e-5, rtol=0)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_a_lycoris_file_needs_the_matching_network_type(trained, tiny_sd, tmp_path, write_config):
    path = trained.cfg.output_dir / "lora.safetensors"
    # a plain-LoRA run given the LoHa file, a LoHa run given the LoKr file
    for network_type in ["lora" if trained.cfg.network_type == "loha" else "loha"]:
        config = write_config(f"{network_type}.yaml", network_type, network_weights=str(path), conv_rank=2,
                              network_type=network_type, train_text_encoder=True,
                              max_train_steps=1)
        proc = run_cli("train", "--config", str(config), "--no-progress")
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-1500:]
        assert f"network_type: {trained.cfg.network_type}" in errors[0]


def test_loha_lokr_refuse_what_peft_lacks(make_cfg):
    from lora_scripts.errors import ConfigError

    for bad in ({"use_dora": True}, {"use_rslora": True}, {"lora_dropout": 0.1}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            make_cfg(network_type="loha", **bad)
    with pytest.raises(ConfigError, match="lokr_factor"):
        make_cfg(lokr_factor=4)


def test_dora_export_warns_which_consumers_reproduce_it(tiny_sd, tmp_path, write_config):
    config = write_config(use_dora=True, max_train_steps=1)
    proc = run_cli("train", "--config", str(config), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    warning = next(line for line in proc.stderr.splitlines() if line.startswith("warning: use_dora"))
    for consumer in ("LyCORIS", "ComfyUI", "A1111", "sd-scripts"):
        assert consumer in warning
    assert "only LyCORIS" in warning
    output = yaml_output_dir(config)
    summary = json.loads((output / "training_summary.json").read_text())
    assert warning.removeprefix("warning: ") in summary["warnings"]


def yaml_output_dir(config):
    import yaml
    from pathlib import Path

    return Path(yaml.safe_load(config.read_text())["output_dir"])


def test_estimate_probes_loha_lokr(make_cfg):
    """The memory probe runs peft's LoHa/LoKr layers (one LycorisLayer code path) on fake tensors, which their
    module-dropout draw cannot take."""
    from lora_scripts.preflight import estimate_memory

    assert estimate_memory(make_cfg(network_type="lokr")).total > 0


def test_transformer_families_refuse_loha_in_one_line(tmp_path):
    from lora_scripts.errors import ConfigError
    from lora_scripts.tasks.base import make_task
    from lora_scripts.tiny_models.flux import make_tiny_model

    model = make_tiny_model(tmp_path / "tiny-flux")
    data = make_captioned_images(tmp_path / "data", count=2)
    task = make_task(build_config(tiny_image_config(model, data, tmp_path / "o", network_type="lokr")))
    with pytest.raises(ConfigError, match="network_type: lokr .*fuses q/k/v") as info:
        task.check_base_model()
    assert "\n" not in str(info.value)

"""SDXL LoRA and text-encoder LoRA: trained through the same loop, exported, and loaded back by diffusers' own
pipelines with outputs equal to the trained modules."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from lora_scripts.config import build_config
from lora_scripts.testing import make_captioned_images, tiny_image_config
from lora_scripts.train.loop import Trainer

from .helpers import assert_same_tensors


def _train(model, tmp, **overrides) -> Trainer:
    data = make_captioned_images(tmp / "data", count=4)
    options = {"max_train_steps": 3, "learning_rate": 5e-2, "output_name": "lora", **overrides}
    cfg = build_config(tiny_image_config(model, data, tmp / "out", **options))
    trainer = Trainer(cfg, show_progress=False)
    trainer.run()
    return trainer


@pytest.fixture(scope="module")
def sdxl_trained(tiny_sdxl, tmp_path_factory):
    return _train(tiny_sdxl, tmp_path_factory.mktemp("sdxl"), train_text_encoder=True, text_encoder_lr=1e-2)


@pytest.fixture(scope="module")
def sd1_te_trained(tiny_sd, tmp_path_factory):
    return _train(tiny_sd, tmp_path_factory.mktemp("sd1te"), train_text_encoder=True, text_encoder_lr=1e-2)


def _sdxl_inputs(pipe, prompt="a red circle"):
    ids = [t(prompt, padding="max_length", max_length=t.model_max_length, return_tensors="pt").input_ids
           for t in (pipe.tokenizer, pipe.tokenizer_2)]
    gen = torch.Generator().manual_seed(0)
    return ids, torch.randn(1, 4, 16, 16, generator=gen), torch.tensor([300]), torch.tensor([[32.0, 32, 0, 0, 32, 32]])


def _sdxl_outputs(unet, text_encoders, ids, x, t, time_ids):
    """(TE1 hidden, TE2 pooled, UNet prediction) the way StableDiffusionXLPipeline encodes and denoises."""
    from lora_scripts.tasks.image.families.sdxl import encode_sdxl_prompt

    with torch.no_grad():
        hidden, pooled = encode_sdxl_prompt(text_encoders, ids)
        pred = unet(x, t, hidden, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    return hidden, pooled, pred


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_sdxl_lora_with_text_encoders_loads_in_diffusers(sdxl_trained, tiny_sdxl, fmt):
    from diffusers import StableDiffusionXLPipeline

    out = sdxl_trained.cfg.output_dir
    network = sdxl_trained.accelerator.unwrap_model(sdxl_trained.model).eval()
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    ids, x, t, time_ids = _sdxl_inputs(pipe)
    expected = _sdxl_outputs(network.unet, list(network.text_encoders), ids, x, t, time_ids)
    base = _sdxl_outputs(pipe.unet, [pipe.text_encoder, pipe.text_encoder_2], ids, x, t, time_ids)
    pipe.load_lora_weights(str(out / "lora.safetensors" if fmt == "kohya" else out / "diffusers"))
    got = _sdxl_outputs(pipe.unet, [pipe.text_encoder, pipe.text_encoder_2], ids, x, t, time_ids)
    for name, b, e, g in zip(("text hidden", "pooled", "unet"), base, expected, got):
        assert (b - e).abs().max() > 1e-4, f"training should change the {name}"
        assert (g - e).abs().max() <= 1e-4, f"{fmt}: {name} differs by {(g - e).abs().max()}"


def test_sdxl_export_is_labelled_sdxl_with_te1_te2_keys(sdxl_trained):
    path = sdxl_trained.cfg.output_dir / "lora.safetensors"
    with safe_open(str(path), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["ss_text_encoder_lr"] == "0.01" and meta["ss_network_train_unet_only"] == "False"
    assert {k.split("_")[1] for k in keys} == {"unet", "te1", "te2"}


def test_sdxl_resolution_defaults_to_1024(tiny_sdxl, tiny_sd, image_data, tmp_path):
    from lora_scripts.tasks.image import ImageTask

    for model, expected in ((tiny_sdxl, 1024), (tiny_sd, 512)):
        raw = tiny_image_config(model, image_data, tmp_path / "out")
        del raw["resolution"]
        task = ImageTask(build_config(raw))
        task.check_base_model()
        assert task.cfg.resolution == expected


def test_sd1_text_encoder_lora_exports_lora_te_and_loads_in_diffusers(sd1_te_trained, tiny_sd):
    from diffusers import StableDiffusionPipeline

    out = sd1_te_trained.cfg.output_dir
    network = sd1_te_trained.accelerator.unwrap_model(sd1_te_trained.model).eval()
    tokenizer = sd1_te_trained.task.tokenizers[0]
    ids = tokenizer("a red circle", padding="max_length", max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        expected = network.text_encoders[0](ids)[0]
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in keys)
    for path in (out / "lora.safetensors", out / "diffusers"):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
        with torch.no_grad():
            base = pipe.text_encoder(ids)[0]
        pipe.load_lora_weights(str(path))
        with torch.no_grad():
            got = pipe.text_encoder(ids)[0]
        assert (base - expected).abs().max() > 1e-4
        assert (got - expected).abs().max() <= 1e-5, path


def test_text_encoder_has_its_own_learning_rate(sd1_te_trained):
    groups = sd1_te_trained.optimizer.param_groups
    assert [g["initial_lr"] for g in groups] == [5e-2, 1e-2]
    network = sd1_te_trained.accelerator.unwrap_model(sd1_te_trained.model)
    te_params = {id(p) for p in network.text_encoders.parameters() if p.requires_grad}
    assert te_params and te_params == {id(p) for p in groups[1]["params"]}


def test_sdxl_resume_is_exact_and_cached_embeddings_match(tiny_sdxl, tmp_path):
    """SDXL: 2 steps + resume + 2 steps == 4 steps, and cached latents + text embeddings (hidden and pooled) give
    the same LoRA as the uncached run."""
    from lora_scripts.train.loop import train

    data = make_captioned_images(tmp_path / "data", count=4)

    def cfg(out, **kw):
        return build_config(tiny_image_config(tiny_sdxl, data, tmp_path / out, **{"max_train_steps": 4, **kw}))

    train(cfg("full"), show_progress=False)
    train(cfg("half", max_train_steps=2), show_progress=False)
    train(cfg("half", resume="latest"), show_progress=False)
    assert_same_tensors(tmp_path / "full/checkpoints/step-4/adapter.safetensors",
                        tmp_path / "half/checkpoints/step-4/adapter.safetensors")
    train(cfg("cached", cache_latents=True, cache_text_embeddings=True), show_progress=False)
    assert_same_tensors(tmp_path / "full/checkpoints/step-4/adapter.safetensors",
                        tmp_path / "cached/checkpoints/step-4/adapter.safetensors", atol=1e-5)


def test_estimate_covers_sdxl_with_text_encoders(tiny_sdxl, image_data, tmp_path):
    from lora_scripts.preflight import estimate_memory

    base = build_config(tiny_image_config(tiny_sdxl, image_data, tmp_path / "a"))
    with_te = build_config(tiny_image_config(tiny_sdxl, image_data, tmp_path / "b", train_text_encoder=True))
    a, b = estimate_memory(base, capacity=2**34), estimate_memory(with_te, capacity=2**34)
    assert b.parts["LoRA weights"] > a.parts["LoRA weights"] > 0 and b.total > a.total
    assert a.recommended_batch_size == 2


def test_cache_text_embeddings_with_trained_text_encoder_is_refused(write_config):
    from .helpers import run_cli

    proc = run_cli("check", "--config", str(write_config(train_text_encoder=True, cache_text_embeddings=True)))
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "cache_text_embeddings" in proc.stderr


def test_qlora_refuses_without_cuda(tmp_path):
    from lora_scripts.testing import make_instruction_data, make_tiny_causal_lm

    from .helpers import run_cli

    model = make_tiny_causal_lm(tmp_path / "lm")
    data = make_instruction_data(tmp_path / "d.jsonl")
    config = tmp_path / "q.yaml"
    config.write_text(f"task: text\nbase_model: {model}\nmetadata_path: {data}\ntrain_data_dir: {tmp_path}\n"
                      f"output_dir: {tmp_path / 'out'}\nquantization: 4bit\n")
    proc = run_cli("train", "--config", str(config))
    assert proc.returncode == 2 and "quantization: 4bit (QLoRA) needs a CUDA GPU" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_single_file_base_model_trains_like_its_diffusers_folder(family, tiny_sd, tiny_sdxl, tmp_path):
    """base_model: an A1111-style .safetensors (+ base_model_config) gives the same LoRA as the diffusers folder,
    through the real CLI, offline."""
    from lora_scripts.testing import write_single_file_checkpoint

    from .helpers import run_cli

    folder = tiny_sdxl if family == "sdxl" else tiny_sd
    ckpt = write_single_file_checkpoint(folder, tmp_path / f"tiny-{family}.safetensors")
    data = make_captioned_images(tmp_path / "data", count=4)
    for name, extra in (("folder", {}), ("file", {"base_model": str(ckpt), "base_model_config": str(folder)})):
        raw = {**tiny_image_config(folder, data, tmp_path / name, max_train_steps=2, output_name="lora"), **extra}
        (tmp_path / f"{name}.yaml").write_text(__import__("yaml").safe_dump(raw))
        proc = run_cli("train", "--config", str(tmp_path / f"{name}.yaml"), "--no-progress")
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert_same_tensors(tmp_path / "folder/lora.safetensors", tmp_path / "file/lora.safetensors")
    proc = run_cli("check", "--config", str(tmp_path / "file.yaml"))
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_network_weights_continue_from_an_exported_lora(sd1_te_trained, tiny_sd, tmp_path, fmt):
    """Incremental training: a run started from the previous run's kohya or diffusers file begins exactly where it
    ended (UNet and text encoder), and a file that does not fit the run is one clear error."""
    out = sd1_te_trained.cfg.output_dir
    source = out / "lora.safetensors" if fmt == "kohya" else out / "diffusers"
    # lr ~ 0: one step leaves the loaded weights as they are, so the export shows what was loaded
    cont = _train(tiny_sd, tmp_path, train_text_encoder=True, network_weights=str(source), learning_rate=1e-30,
                  max_train_steps=1)
    before = sd1_te_trained.task.lora_parts(sd1_te_trained.accelerator.unwrap_model(sd1_te_trained.model))
    after = cont.task.lora_parts(cont.accelerator.unwrap_model(cont.model))
    assert before.keys() == after.keys() == {"unet", "text_encoder"}
    for part in before:
        for key in before[part]:
            torch.testing.assert_close(after[part][key], before[part][key], atol=1e-6, rtol=0)

    from .helpers import run_cli

    config = tmp_path / "bad.yaml"
    data = make_captioned_images(tmp_path / "bad-data", count=2)
    raw = tiny_image_config(tiny_sd, data, tmp_path / "bad", network_weights=str(source), lora_rank=8)
    config.write_text(__import__("yaml").safe_dump(raw))
    proc = run_cli("train", "--config", str(config))
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "rank" in proc.stderr


@pytest.mark.parametrize("variant", [{"conv_rank": 2, "conv_alpha": 1}, {"use_dora": True}])
def test_locon_and_dora_train_and_export(variant, tiny_sd, tmp_path):
    """LoCon (3x3 convs with their own rank/alpha) and DoRA through the real loop, loaded back by diffusers with the
    trained UNet's output: LoCon from the kohya file, DoRA from the diffusers file (its kohya file carries
    dora_scale and is labelled in ss_network_args)."""
    import json

    from diffusers import StableDiffusionPipeline

    trainer = _train(tiny_sd, tmp_path, **variant)
    path = trainer.cfg.output_dir / "lora.safetensors"
    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    args = json.loads(meta["ss_network_args"])
    if "conv_rank" in variant:
        assert args["conv_dim"] == "2" and args["conv_alpha"] == "1"
        assert any("resnets_0_conv1.lora_down" in k for k in keys)
    else:
        assert args["dora_wd"] == "True" and any(k.endswith(".dora_scale") for k in keys)
        # diffusers' SD loaders drop kohya dora_scale keys (see README), so DoRA loads back from the diffusers file
        path = trainer.cfg.output_dir / "diffusers"
    unet = trainer.accelerator.unwrap_model(trainer.model).unet.eval()
    gen = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(1, 4, 16, 16, generator=gen), torch.tensor([500]), torch.randn(1, 16, 32, generator=gen)
    with torch.no_grad():
        expected = unet(x, t, ctx).sample
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    with torch.no_grad():
        base = pipe.unet(x, t, ctx).sample
    pipe.load_lora_weights(str(path))
    with torch.no_grad():
        got = pipe.unet(x, t, ctx).sample
    assert (base - expected).abs().max() > 1e-4
    assert (got - expected).abs().max() <= 1e-5

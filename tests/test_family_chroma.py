"""Chroma LoRA on a tiny Chroma-shaped model: trains through the CLI, both exports reproduce the trained transformer
(ChromaPipeline.load_lora_weights for double blocks; ComfyUI's arithmetic on the original layout for every module),
the original-layout single file loads to the folder's weights, the prompt is encoded as ChromaPipeline does."""

from __future__ import annotations

import pytest
import torch
import yaml

from lora_scripts.config import build_config
from lora_scripts.testing import make_captioned_images, tiny_image_config
from lora_scripts.tiny_models.chroma import make_tiny_model, write_single_file
from lora_scripts.tiny_models.flux import write_components_only

from .helpers import run_cli

DOUBLE_BLOCK_TARGETS = [f"transformer_blocks.0.{m}" for m in (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
    "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")]


@pytest.fixture(scope="module")
def tiny_chroma(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-chroma")


@pytest.fixture(scope="module")
def chroma_data(tmp_path_factory):
    return make_captioned_images(tmp_path_factory.mktemp("chromadata") / "data", count=4)


def chroma_config(model, data, out, **overrides):
    return tiny_image_config(model, data, out, text_max_length=16, learning_rate=5e-3, **overrides)


def _train_here(model, data, out, **overrides):
    from lora_scripts.train.loop import Trainer

    trainer = Trainer(build_config(chroma_config(model, data, out, output_name="lora", **overrides)), show_progress=False)
    trainer.run()
    return trainer


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _cond(pipe, family):
    tokens = family.tokenize([pipe.tokenizer], "a red circle")
    with torch.no_grad():
        return family.encode_prompt([pipe.text_encoder], {k: v[None] for k, v in tokens.items()})


def test_prompt_is_encoded_as_chroma_pipeline_does(tiny_chroma, chroma_data, tmp_path):
    from diffusers import ChromaPipeline

    from lora_scripts.tasks.image.families.chroma import Chroma

    family = Chroma(build_config(chroma_config(tiny_chroma, chroma_data, tmp_path / "o")))
    pipe = ChromaPipeline.from_pretrained(tiny_chroma)
    cond = _cond(pipe, family)
    embeds, _, mask, *_ = pipe.encode_prompt("a red circle", do_classifier_free_guidance=False, max_sequence_length=16)
    torch.testing.assert_close(cond["hidden"], embeds.detach(), rtol=1e-6, atol=1e-6)
    assert torch.equal(cond["text_mask"].float(), mask.float()) and mask.sum() < mask.numel()  # padding masked


@pytest.mark.parametrize("fmt", ["single-file", "diffusers"])
def test_exports_reproduce_the_trained_transformer_in_chroma_pipeline(tiny_chroma, chroma_data, tmp_path, fmt):
    from diffusers import ChromaPipeline

    run = _train_here(tiny_chroma, chroma_data, tmp_path / "out", max_train_steps=2,
                      target_modules=DOUBLE_BLOCK_TARGETS if fmt == "single-file" else None)
    network = run.accelerator.unwrap_model(run.model).eval()
    family = run.task.family
    pipe = ChromaPipeline.from_pretrained(tiny_chroma)
    cond = _cond(pipe, family)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = family.denoise(network.transformer, latents, torch.tensor([0.5]), cond)
        base = family.denoise(pipe.transformer, latents, torch.tensor([0.5]), cond)
        out = run.cfg.output_dir
        pipe.load_lora_weights(str(out / "lora.safetensors" if fmt == "single-file" else out / "diffusers"))
        got = family.denoise(pipe.transformer, latents, torch.tensor([0.5]), cond)
    assert (base - want).abs().max() > 1e-4
    assert _rel(got, want) <= 1e-5


def test_single_file_loads_the_same_weights_and_trains(tiny_chroma, chroma_data, tmp_path):
    from diffusers import ChromaTransformer2DModel

    from lora_scripts.tasks.image.families import detect_single_file
    from lora_scripts.tasks.image.families.chroma import Chroma

    components = write_components_only(tiny_chroma, tmp_path / "components")
    path = write_single_file(tiny_chroma, tmp_path / "chroma.safetensors", prefix="model.diffusion_model.")
    assert detect_single_file(path) is Chroma
    cfg = build_config(chroma_config(path, chroma_data, tmp_path / "o", base_model_config=str(components)))
    loaded = Chroma(cfg).load_single_file_denoiser(path).state_dict()
    reference = ChromaTransformer2DModel.from_pretrained(tiny_chroma / "transformer").state_dict()
    assert loaded.keys() == reference.keys() and all(torch.equal(loaded[k], reference[k]) for k in reference)
    raw = chroma_config(path, chroma_data, tmp_path / "cli", base_model_config=str(components), max_train_steps=2)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    result = run_cli("train", "--config", str(tmp_path / "c.yaml"), "--no-progress")
    assert result.returncode == 0, result.stderr[-2000:]
    te = dict(raw, train_text_encoder=True)
    (tmp_path / "te.yaml").write_text(yaml.safe_dump(te))
    result = run_cli("check", "--config", str(tmp_path / "te.yaml"))
    assert result.returncode == 2 and "train_text_encoder" in result.stderr and len(result.stderr.strip().splitlines()) == 1

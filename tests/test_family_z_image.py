"""Z-Image end to end on a tiny model: recognition, prompt encoding and the denoiser call as ZImagePipeline does
them, training through the CLI, both exports reproducing the trained transformer through
ZImagePipeline.load_lora_weights, original-layout single files, component errors, network_weights continuation,
caches, validation loss and the demo."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lora_scripts.config import build_config, load_config
from lora_scripts.tasks.image.families import detect_folder, detect_single_file
from lora_scripts.tasks.image.families.z_image import ZImage
from lora_scripts.testing import make_captioned_images, tiny_image_config
from lora_scripts.tiny_models import z_image as tiny
from lora_scripts.train.loop import train

from .helpers import run_cli

COMMON = dict(text_max_length=32, learning_rate=1e-2, max_train_steps=4, save_steps=2)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny.make_tiny_model(tmp_path_factory.mktemp("zimage") / "tiny-z-image")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_captioned_images(tmp_path_factory.mktemp("zimage-data") / "data", count=4)


@pytest.fixture(scope="module")
def trained(model, data, tmp_path_factory) -> Path:
    """One CLI run of the tiny model (shared by the export and continuation tests)."""
    out = tmp_path_factory.mktemp("zimage-run") / "run"
    config = out.parent / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_image_config(model, data, out, **COMMON)))
    proc = run_cli("train", "--config", str(config), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _write(tmp_path: Path, model: Path, data: Path, name: str, **overrides) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tiny_image_config(model, data, tmp_path / name, **{**COMMON, **overrides})))
    return path


def _inputs(seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
    """The pipeline's call: per-sample (C, 1, H, W) latents, timesteps 1 - sigma, captions of different lengths."""
    g = torch.Generator().manual_seed(seed)
    latents = [torch.randn(4, 1, 16, 16, generator=g) for _ in range(2)]
    captions = [torch.randn(n, tiny.TEXT_HIDDEN, generator=g) for n in (7, 12)]
    return latents, torch.tensor([0.3, 0.8]), captions


def _trained_transformer(model: Path, adapter: Path):
    """The base transformer with the run's adapter set from a training checkpoint."""
    from diffusers import ZImageTransformer2DModel
    from peft import LoraConfig, set_peft_model_state_dict

    transformer = ZImageTransformer2DModel.from_pretrained(model, subfolder="transformer")
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=2, target_modules=ZImage.default_targets))
    state = {k.removeprefix("transformer.").replace(".default.", "."): v for k, v in load_file(str(adapter)).items()}
    set_peft_model_state_dict(transformer, state)
    return transformer.eval()


def _run(transformer, x) -> torch.Tensor:
    return torch.stack(transformer(*x, return_dict=False)[0])


def test_recognised_from_model_index_and_single_file_headers(model, tmp_path):
    assert detect_folder(model) is ZImage
    for prefix in ("", "model.diffusion_model."):
        path = tiny.write_single_file(model, tmp_path / f"z{len(prefix)}.safetensors", prefix=prefix)
        assert detect_single_file(path) is ZImage
    # Lumina 2 shares the layout but modulates with adaLN_modulation.1; Qwen-Image / FLUX names are not Z-Image
    lumina = {"cap_embedder.1.weight": (1,), "layers.0.attention.qkv.weight": (1,),
              "layers.0.adaLN_modulation.1.weight": (1,)}
    assert not ZImage.matches_header(lumina)
    assert not ZImage.matches_header({"txt_norm.weight": (1,), "transformer_blocks.0.img_mod.1.weight": (1,)})


def test_encode_prompt_and_denoise_equal_the_pipeline(model):
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(model)
    family = ZImage(build_config(tiny_image_config(model, model, model, text_max_length=48)))
    prompts = ["a red circle", "a blue square in the style of lora with a long tail of words"]
    expected = pipe._encode_prompt(list(prompts), device="cpu")  # max_sequence_length 512, as in __call__
    tokens = [family.tokenize([pipe.tokenizer], p) for p in prompts]
    batch = {k: torch.stack([t[k] for t in tokens]) for k in tokens[0]}
    with torch.no_grad():
        got = family.encode_prompt([pipe.text_encoder], batch)
    for embeds, mask, want in zip(got["prompt_embeds"], got["prompt_mask"].bool(), expected):
        torch.testing.assert_close(embeds[mask], want, rtol=1e-5, atol=1e-6)
        assert not embeds[~mask].any()
    # denoise = minus the transformer's output for timestep 1 - sigma: what the pipeline's Euler step integrates
    g = torch.Generator().manual_seed(1)
    noisy, sigmas = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([0.25, 0.9])
    with torch.no_grad():
        mine = family.denoise(pipe.transformer, noisy, sigmas, got)
        theirs = pipe.transformer(list(noisy.unsqueeze(2).unbind(0)), 1 - sigmas, expected, return_dict=False)[0]
    torch.testing.assert_close(mine, -torch.stack(theirs).squeeze(2), rtol=1e-5, atol=1e-6)


def test_single_file_loads_to_the_folder_weights(model, tmp_path):
    from diffusers import ZImageTransformer2DModel

    ref = ZImageTransformer2DModel.from_pretrained(model, subfolder="transformer").state_dict()
    for prefix in ("", "model.diffusion_model."):
        path = tiny.write_single_file(model, tmp_path / f"t{len(prefix)}.safetensors", prefix=prefix)
        assert any(".attention.qkv." in k for k in load_file(str(path)))  # the original, fused layout
        cfg = build_config(tiny_image_config(path, model, tmp_path, base_model_config=str(model)))
        loaded = ZImage(cfg).load(str(path))
        assert loaded.denoiser.state_dict().keys() == ref.keys()
        assert all(torch.equal(loaded.denoiser.state_dict()[k], v) for k, v in ref.items())


def test_trains_and_both_exports_reproduce_the_trained_transformer(model, trained):
    from diffusers import ZImagePipeline
    from safetensors import safe_open

    summary = json.loads((trained / "training_summary.json").read_text())
    assert summary["steps"] == 4
    reference = _trained_transformer(model, trained / "checkpoints/step-4/adapter.safetensors")
    x = _inputs()
    with torch.no_grad():
        want = _run(reference, x)
        reference.disable_adapters()
        base = _run(reference, x)
    assert (want - base).abs().max() > 1e-3  # the LoRA changed the output: the comparison below means something
    single = load_file(str(trained / "run.safetensors"))
    assert all(k.startswith("diffusion_model.") for k in single)  # the names ComfyUI's Lumina2 key map reads
    assert "diffusion_model.layers.0.attention.to_q.lora_down.weight" in single
    for lora in (trained / "diffusers", trained / "run.safetensors"):
        pipe = ZImagePipeline.from_pretrained(model)
        pipe.load_lora_weights(str(lora))
        with torch.no_grad():
            got = _run(pipe.transformer, x)
        assert ((got - want).norm() / want.norm()).item() <= 1e-5, lora
    meta = safe_open(str(trained / "run.safetensors"), "pt").metadata()
    assert meta["ss_base_model_version"] == "z_image" and meta["modelspec.architecture"] == "z-image/lora"


def test_network_weights_continue_from_either_export(model, data, trained, tmp_path):
    from diffusers import ZImageTransformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    want = {k.removeprefix("transformer.").replace(".default.", "."): v
            for k, v in load_file(str(trained / "checkpoints/step-4/adapter.safetensors")).items()}
    family = ZImage(build_config(tiny_image_config(model, model, tmp_path, lora_rank=4, lora_alpha=2)))
    for lora in (trained / "diffusers", trained / "run.safetensors"):
        transformer = ZImageTransformer2DModel.from_pretrained(model, subfolder="transformer")
        transformer.add_adapter(LoraConfig(r=4, lora_alpha=2, target_modules=family.lora_targets(transformer)))
        family.apply_network_weights(lora, {"transformer": transformer})
        got = get_peft_model_state_dict(transformer)
        for key, value in want.items():  # the converter splits alpha/rank over A and B: compare the products
            if key.endswith("lora_A.weight"):
                b_key = key.replace("lora_A", "lora_B")
                torch.testing.assert_close(got[b_key] @ got[key], want[b_key] @ value, rtol=1e-5, atol=1e-7)
    config = _write(tmp_path, model, data, "cont", max_train_steps=1, network_weights=str(trained / "run.safetensors"))
    proc = run_cli("train", "--config", str(config), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_cached_latents_and_embeddings_equal_the_uncached_loss(model, data, tmp_path):
    losses = []
    for name, cache in (("plain", False), ("cached", True)):
        train(load_config(_write(tmp_path, model, data, name, max_train_steps=1, cache_latents=cache,
                                 cache_text_embeddings=cache)), show_progress=False)
        losses.append(float(next(csv.DictReader(open(tmp_path / name / "logs/loss.csv")))["loss"]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_validation_loss_is_logged(model, data, tmp_path):
    train(load_config(_write(tmp_path, model, data, "val", val_size=0.25, max_train_steps=2)), show_progress=False)
    rows = list(csv.DictReader(open(tmp_path / "val/logs/loss.csv")))
    values = [float(r["eval_loss"]) for r in rows if r["eval_loss"]]
    assert values and all(v > 0 for v in values)


def test_component_errors_are_one_line_exit_2(model, data, tmp_path):
    single = tiny.write_single_file(model, tmp_path / "z_image_turbo.safetensors")
    wrong_te = tmp_path / "qwen25vl"
    wrong_te.mkdir()
    (wrong_te / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    cases = {
        "family": (dict(model_family="qwen_image"), "is a Z-Image model, not"),
        "missing": (dict(base_model=str(single)), "set vae_path"),
        "te": (dict(text_encoder_path=str(wrong_te)), "is a qwen2_5_vl model, but Z-Image expects qwen3"),
    }
    for name, (overrides, expected) in cases.items():
        proc = run_cli("train", "--config", str(_write(tmp_path, model, data, name, **overrides)))
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0], (name, proc.stderr[-1500:])


def test_demo_trains_the_tiny_model(tmp_path):
    proc = run_cli("demo", "--family", "z_image", "--output-dir", str(tmp_path / "demo"), "--steps", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]

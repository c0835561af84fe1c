"""Qwen-Image end to end on a tiny model: recognition, prompt encoding as the pipeline, training through the CLI,
both exports reproducing the trained transformer through QwenImagePipeline.load_lora_weights, single files,
component errors, network_weights continuation, caches, exact resume and 2 processes = 1."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lora_scripts.config import load_config
from lora_scripts.tasks.image.families import detect_folder, detect_single_file
from lora_scripts.tasks.image.families.qwen_image import QwenImage
from lora_scripts.testing import make_captioned_images, tiny_image_config
from lora_scripts.tiny_models import qwen_image as tiny
from lora_scripts.train.loop import train

from .helpers import assert_same_tensors, run_cli

COMMON = dict(text_max_length=16, learning_rate=1e-2, max_train_steps=4, save_steps=2)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny.make_tiny_model(tmp_path_factory.mktemp("qwen") / "tiny-qwen-image")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_captioned_images(tmp_path_factory.mktemp("qwen-data") / "data", count=4)


@pytest.fixture(scope="module")
def trained(model, data, tmp_path_factory) -> Path:
    """One CLI run of the tiny model (shared by the export and continuation tests)."""
    out = tmp_path_factory.mktemp("qwen-run") / "run"
    config = out.parent / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_image_config(model, data, out, **COMMON)))
    proc = run_cli("train", "--config", str(config), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _write(tmp_path: Path, model: Path, data: Path, name: str, **overrides) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tiny_image_config(model, data, tmp_path / name, **{**COMMON, **overrides})))
    return path


def _inputs(transformer, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    b, h, w = 2, 4, 4
    mask = torch.ones(b, 6, dtype=torch.long)
    mask[1, 4:] = 0
    return dict(hidden_states=torch.randn(b, h * w // 4, 64, generator=g),
                encoder_hidden_states=torch.randn(b, 6, 32, generator=g), encoder_hidden_states_mask=mask,
                timestep=torch.tensor([0.3, 0.8]), img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)


def _trained_transformer(model: Path, adapter: Path):
    """The base transformer with the run's adapter set from a training checkpoint."""
    from diffusers import QwenImageTransformer2DModel
    from peft import LoraConfig, set_peft_model_state_dict

    transformer = QwenImageTransformer2DModel.from_pretrained(model, subfolder="transformer")
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=2, target_modules=QwenImage.default_targets))
    state = {k.removeprefix("transformer.").replace(".default.", "."): v for k, v in load_file(str(adapter)).items()}
    set_peft_model_state_dict(transformer, state)
    return transformer.eval()


def test_recognised_from_model_index_and_single_file_headers(model, tmp_path):
    assert detect_folder(model) is QwenImage
    for prefix in ("", "model.diffusion_model."):
        path = tiny.write_single_file(model, tmp_path / f"q{len(prefix)}.safetensors", prefix=prefix)
        assert detect_single_file(path) is QwenImage
    # a FLUX-like header (diffusers names without img_mod / txt_norm) is not Qwen-Image
    assert not QwenImage.matches_header({"transformer_blocks.0.norm1.linear.weight": (1,), "x_embedder.weight": (1,)})


def test_encode_prompt_equals_the_pipeline(model):
    from diffusers import QwenImagePipeline

    from lora_scripts.config import build_config

    pipe = QwenImagePipeline.from_pretrained(model)
    family = QwenImage(build_config(tiny_image_config(model, model, model, text_max_length=48)))
    prompts = ["a red circle", "a blue square in the style of lora with a long tail of words"]
    expected, expected_mask = pipe._get_qwen_prompt_embeds(prompts, device="cpu")
    tokens = [family.tokenize([pipe.tokenizer], p) for p in prompts]
    batch = {k: torch.stack([t[k] for t in tokens]) for k in tokens[0]}
    with torch.no_grad():
        got = family.encode_prompt([pipe.text_encoder], batch)
    n = expected.shape[1]
    assert torch.equal(got["prompt_mask"][:, :n], expected_mask) and not got["prompt_mask"][:, n:].any()
    torch.testing.assert_close(got["prompt_embeds"][:, :n], expected, rtol=1e-5, atol=1e-6)
    assert not got["prompt_embeds"][:, n:].any()
    # the fixed-length padding does not change the transformer's output (the mask hides it)
    x = _inputs(pipe.transformer)
    short = pipe.transformer(**{**x, "encoder_hidden_states": expected, "encoder_hidden_states_mask": expected_mask})[0]
    padded = pipe.transformer(**{**x, "encoder_hidden_states": got["prompt_embeds"],
                                 "encoder_hidden_states_mask": got["prompt_mask"]})[0]
    torch.testing.assert_close(padded, short, rtol=1e-5, atol=1e-6)


def test_single_file_loads_to_the_folder_weights(model, tmp_path):
    from diffusers import QwenImageTransformer2DModel

    from lora_scripts.config import build_config

    ref = QwenImageTransformer2DModel.from_pretrained(model, subfolder="transformer").state_dict()
    for prefix in ("", "model.diffusion_model."):
        path = tiny.write_single_file(model, tmp_path / f"t{len(prefix)}.safetensors", prefix=prefix)
        cfg = build_config(tiny_image_config(path, model, tmp_path, base_model_config=str(model)))
        loaded = QwenImage(cfg).load(str(path))
        assert loaded.denoiser.state_dict().keys() == ref.keys()
        assert all(torch.equal(loaded.denoiser.state_dict()[k], v) for k, v in ref.items())


def test_trains_and_both_exports_reproduce_the_trained_transformer(model, trained):
    from diffusers import QwenImagePipeline

    summary = json.loads((trained / "training_summary.json").read_text())
    assert summary["steps"] == 4
    reference = _trained_transformer(model, trained / "checkpoints/step-4/adapter.safetensors")
    x = _inputs(reference)
    with torch.no_grad():
        want = reference(**x)[0]
        reference.disable_adapters()
        base = reference(**x)[0]
    assert (want - base).abs().max() > 1e-3  # the LoRA changed the output: the comparison below means something
    for lora in (trained / "diffusers", trained / "run.safetensors"):
        pipe = QwenImagePipeline.from_pretrained(model)
        pipe.load_lora_weights(str(lora))
        with torch.no_grad():
            got = pipe.transformer(**x)[0]
        assert ((got - want).norm() / want.norm()).item() <= 1e-5, lora
    from safetensors import safe_open

    meta = safe_open(str(trained / "run.safetensors"), "pt").metadata()
    assert meta["ss_base_model_version"] == "qwen_image" and meta["modelspec.architecture"] == "qwen-image/lora"


def test_network_weights_continue_from_either_export(model, data, trained, tmp_path):
    from lora_scripts.config import build_config

    want = {k.removeprefix("transformer.").replace(".default.", "."): v
            for k, v in load_file(str(trained / "checkpoints/step-4/adapter.safetensors")).items()}
    cfg = build_config(tiny_image_config(model, model, tmp_path, lora_rank=4, lora_alpha=2))
    family = QwenImage(cfg)
    from diffusers import QwenImageTransformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    for lora in (trained / "diffusers", trained / "run.safetensors"):
        transformer = QwenImageTransformer2DModel.from_pretrained(model, subfolder="transformer")
        transformer.add_adapter(LoraConfig(r=4, lora_alpha=2, target_modules=family.lora_targets(transformer)))
        family.apply_network_weights(lora, {"transformer": transformer})
        got = get_peft_model_state_dict(transformer)
        for key, value in want.items():  # kohya's converter splits alpha/rank over A and B: compare the products
            if key.endswith("lora_A.weight"):
                b_key = key.replace("lora_A", "lora_B")
                torch.testing.assert_close(got[b_key] @ got[key], want[b_key] @ value, rtol=1e-5, atol=1e-7)
    # and through the CLI: one more step from the kohya file
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


def test_component_errors_are_one_line_exit_2(model, data, tmp_path):
    single = tiny.write_single_file(model, tmp_path / "qwen_image.safetensors")
    wrong_te = tmp_path / "qwen3"
    wrong_te.mkdir()
    (wrong_te / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    cases = {
        "family": (dict(model_family="sdxl"), "is a Qwen-Image model, not"),
        "missing": (dict(base_model=str(single)), "set vae_path"),
        "te": (dict(text_encoder_path=str(wrong_te)), "is a qwen3 model, but Qwen-Image expects qwen2_5_vl"),
    }
    for name, (overrides, expected) in cases.items():
        proc = run_cli("train", "--config", str(_write(tmp_path, model, data, name, **overrides)))
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0], (name, proc.stderr[-1500:])


def test_resume_is_bit_exact(model, data, tmp_path):
    common = dict(save_steps=2, lora_dropout=0.1, max_train_steps=4)
    train(load_config(_write(tmp_path, model, data, "straight", **common)), show_progress=False)
    train(load_config(_write(tmp_path, model, data, "split", **{**common, "max_train_steps": 2})), show_progress=False)
    result = train(load_config(_write(tmp_path, model, data, "split", **common, resume="latest")), show_progress=False)
    assert result.resumed_from.name == "step-2"
    assert_same_tensors(tmp_path / "straight/checkpoints/step-4/adapter.safetensors",
                        tmp_path / "split/checkpoints/step-4/adapter.safetensors")
    assert_same_tensors(tmp_path / "straight/straight.safetensors", tmp_path / "split/split.safetensors")


def test_two_processes_equal_one(model, data, tmp_path):
    steps = dict(max_train_steps=2, save_steps=2)
    train(load_config(_write(tmp_path, model, data, "one", batch_size=4, **steps)), show_progress=False)
    proc = run_cli("train", "--config", str(_write(tmp_path, model, data, "two", batch_size=2, **steps)),
                   "--nproc", "2", "--no-progress", timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_tensors(tmp_path / "one/checkpoints/step-2/adapter.safetensors",
                        tmp_path / "two/checkpoints/step-2/adapter.safetensors", atol=1e-5)

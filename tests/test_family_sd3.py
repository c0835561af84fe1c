"""Stable Diffusion 3 / 3.5: a tiny SD3.5-shaped model trains on CPU (in this process, and the single file with
component paths through ``lora-scripts train``); both exports load through ``StableDiffusion3Pipeline.load_lora_weights``
and reproduce the trained transformer and CLIP encoders; the original-layout single file loads to the folder's
weights; errors are one line, exit 2. Training runs are shared between tests (module fixtures) to keep this quick."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from lora_scripts.testing import make_captioned_images, tiny_image_config

from .helpers import run_cli
from .test_errors import assert_one_line_error

PROMPT = "a red circle"
T5_TOKENS = 8
STEPS = 2


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sd3")


@pytest.fixture(scope="module")
def tiny_sd3(root) -> Path:
    from lora_scripts.tiny_models.sd3 import make_tiny_model

    return make_tiny_model(root / "tiny-sd3")


@pytest.fixture(scope="module")
def single_file(tiny_sd3, root) -> Path:
    from lora_scripts.tiny_models.sd3 import write_single_file

    return write_single_file(tiny_sd3, root / "sd3.5_tiny.safetensors")


@pytest.fixture(scope="module")
def data(root) -> Path:
    return make_captioned_images(root / "data", count=5)


def _config(root: Path, name: str, model: Path, data: Path, **overrides) -> Path:
    options = {"max_train_steps": STEPS, "learning_rate": 5e-2, "output_name": "lora", "text_max_length": T5_TOKENS,
               "save_steps": 0, **overrides}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tiny_image_config(model, data, root / name, **options)))
    return path


def _train(root: Path, name: str, model: Path, data: Path, **overrides) -> Path:
    """A run through the CLI, as a user starts it."""
    proc = run_cli("train", "--config", str(_config(root, name, model, data, **overrides)), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / name


def _train_here(root: Path, name: str, model: Path, data: Path, **overrides) -> Path:
    """The same run in this process (no interpreter start or imports: much cheaper on CPU)."""
    from lora_scripts.config import build_config
    from lora_scripts.train.loop import Trainer

    raw = yaml.safe_load(_config(root, name, model, data, **overrides).read_text())
    Trainer(build_config(raw), show_progress=False).run()
    return root / name


def _losses(out: Path) -> list[float]:
    with open(out / "logs" / "loss.csv", newline="") as fh:
        return [float(row["loss"]) for row in csv.DictReader(fh) if row.get("loss")]


@pytest.fixture(scope="module")
def trained(root, tiny_sd3, data) -> Path:
    """CLIP-L/G LoRA too, and one image held out for the validation loss."""
    return _train_here(root, "te", tiny_sd3, data, train_text_encoder=True, text_encoder_lr=1e-2, val_size=1)


def _trained_modules(tiny_sd3: Path, out: Path):
    """The pipeline with the run's final adapter set from its resumable checkpoint: what training left."""
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig, set_peft_model_state_dict

    from lora_scripts.tasks.image.families.sd3 import SD3

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    state = load_file(str(next((out / "checkpoints").iterdir()) / "adapter.safetensors"))
    for part, stored, targets in (("transformer", "transformer", SD3.default_targets),
                                  ("text_encoder", "text_encoders.0", ["q_proj", "k_proj", "v_proj", "out_proj"]),
                                  ("text_encoder_2", "text_encoders.1", ["q_proj", "k_proj", "v_proj", "out_proj"])):
        sub = {k[len(stored) + 1:].replace(".default", ""): v for k, v in state.items() if k.startswith(stored + ".")}
        assert sub, f"no {stored} adapter in the checkpoint"
        module = getattr(pipe, part)
        module.add_adapter(LoraConfig(r=4, lora_alpha=2, target_modules=targets))
        set_peft_model_state_dict(module, sub)
    return pipe


def _outputs(pipe) -> tuple[torch.Tensor, ...]:
    """(prompt embeddings, pooled, transformer velocity) as the pipeline computes them."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 16, 16, generator=gen)
    with torch.no_grad():
        hidden, _, pooled, _ = pipe.encode_prompt(PROMPT, None, None, do_classifier_free_guidance=False,
                                                  max_sequence_length=T5_TOKENS)
        pred = pipe.transformer(hidden_states=x, timestep=torch.tensor([700.0]), encoder_hidden_states=hidden,
                                pooled_projections=pooled, return_dict=False)[0]
    return hidden, pooled, pred


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("fmt", ["single_file", "diffusers"])
def test_exports_reproduce_the_trained_transformer_and_text_encoders(trained, tiny_sd3, fmt):
    from diffusers import StableDiffusion3Pipeline

    expected = _outputs(_trained_modules(tiny_sd3, trained))
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    base = _outputs(pipe)
    pipe.load_lora_weights(str(trained / "lora.safetensors" if fmt == "single_file" else trained / "diffusers"))
    got = _outputs(pipe)
    for name, b, e, g in zip(("prompt embeddings", "pooled", "transformer"), base, expected, got):
        assert _relative(b, e) > 1e-4, f"training should change the {name}"
        assert _relative(g, e) <= 1e-5, f"{fmt}: {name} differs by {_relative(g, e)} (relative)"


def test_export_names_and_metadata(trained):
    with safe_open(str(trained / "lora.safetensors"), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert meta["ss_base_model_version"] == "sd3.5"
    assert meta["modelspec.architecture"] == "stable-diffusion-3-5-medium/lora"
    # ComfyUI's SD3 key map: diffusers module names under transformer. (it fuses into qkv itself)
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in keys
    assert "transformer.transformer_blocks.0.attn.add_q_proj.lora_B.weight" in keys
    assert "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight" in keys
    assert not any(k.endswith(".alpha") for k in keys)  # the scale is in lora_B (diffusers refuses alpha keys)
    assert not any(k.startswith("text_encoder_3.") for k in keys)  # T5 stays frozen


def test_validation_loss_is_logged(trained):
    with open(trained / "logs" / "loss.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert any(row.get("eval_loss") for row in rows), rows
    summary = json.loads((trained / "training_summary.json").read_text())
    print("tiny SD3 run:", {k: v for k, v in summary.items() if "step" in k or "memory" in k})


def test_encode_prompt_equals_the_pipeline(tiny_sd3):
    from diffusers import StableDiffusion3Pipeline

    from lora_scripts.config import build_config
    from lora_scripts.tasks.image.families.sd3 import SD3

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    family = SD3(build_config({"base_model": str(tiny_sd3), "train_data_dir": "d", "output_dir": "o",
                               "text_max_length": T5_TOKENS}))
    tokenizers = [pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3]
    tokens = {k: v[None] for k, v in family.tokenize(tokenizers, PROMPT).items()}
    with torch.no_grad():
        ours = family.encode_prompt([pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3], tokens)
        hidden, _, pooled, _ = pipe.encode_prompt(PROMPT, None, None, do_classifier_free_guidance=False,
                                                  max_sequence_length=T5_TOKENS)
    assert torch.equal(ours["hidden"], hidden) and torch.equal(ours["pooled"], pooled)


def test_single_file_loads_to_the_folder_weights(tiny_sd3, single_file):
    from diffusers import SD3Transformer2DModel

    from lora_scripts.config import build_config
    from lora_scripts.tasks.image.families import resolve_family

    with safe_open(str(single_file), "pt") as f:
        assert "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight" in f.keys()
    cfg = build_config({"base_model": str(single_file), "base_model_config": str(tiny_sd3), "train_data_dir": "d",
                        "output_dir": "o"})
    family = resolve_family(cfg)
    assert family.name == "sd3"
    loaded = family.load(str(single_file)).denoiser.state_dict()
    folder = SD3Transformer2DModel.from_pretrained(tiny_sd3 / "transformer").state_dict()
    assert loaded.keys() == folder.keys()
    assert all(torch.equal(loaded[k], folder[k]) for k in folder)


def test_cached_latents_and_embeddings_equal_uncached_loss(root, tiny_sd3, single_file, data):
    """The single file with component paths, cached, trains exactly as the folder uncached."""
    plain = _train_here(root, "plain", tiny_sd3, data)
    cached = _train(root, "cached", single_file, data, vae_path=str(tiny_sd3 / "vae"),
                    text_encoder_path=str(tiny_sd3 / "text_encoder"),
                    text_encoder_2_path=str(tiny_sd3 / "text_encoder_2"),
                    text_encoder_3_path=str(tiny_sd3 / "text_encoder_3"),
                    base_model_config=str(tiny_sd3), cache_latents=True, cache_text_embeddings=True)
    a, b = _losses(plain), _losses(cached)
    assert len(a) == STEPS and a == pytest.approx(b, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("fmt", ["single_file", "diffusers"])
def test_network_weights_continue_from_both_exports(root, trained, tiny_sd3, data, fmt):
    source = trained / "lora.safetensors" if fmt == "single_file" else trained / "diffusers"
    out = _train_here(root, f"cont-{fmt}", tiny_sd3, data, network_weights=str(source), train_text_encoder=True,
                 learning_rate=1e-12, text_encoder_lr=1e-12, max_train_steps=1, max_grad_norm=None)
    before, after = load_file(str(trained / "lora.safetensors")), load_file(str(out / "lora.safetensors"))
    assert before.keys() == after.keys()
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=1e-5, atol=1e-6, msg=key)


def test_wrong_family_and_wrong_component_are_one_line(root, tiny_sd3, single_file, data):
    proc = run_cli("check", "--config", str(_config(root, "wrong", tiny_sd3, data, model_family="sdxl")))
    assert_one_line_error(proc.returncode, proc.stderr.strip(), "is a SD3 model, not SDXL")
    proc = run_cli("check", "--config", str(_config(root, "t5", single_file, data,
                                                    text_encoder_3_path=str(tiny_sd3 / "text_encoder"))))
    assert_one_line_error(proc.returncode, proc.stderr.strip(), "text_encoder_3_path", "SD3 expects t5")
    proc = run_cli("check", "--config", str(_config(root, "alone", single_file, data)))
    assert_one_line_error(proc.returncode, proc.stderr.strip(), "is a transformer-only file", "base_model_config")


def test_estimate_of_the_shipped_sd35_large_config(root):
    """``lora-scripts estimate`` on configs/sd35_large_lora.yaml pointed at the shipped SD3.5-Large configs (no
    weights: every component is built on the meta device), in seconds now that the probe cuts the 38 blocks; the
    GPU total is the bf16 weights (8.1 B transformer + CLIP-L/G + T5-XXL + VAE) plus the step."""
    configs = Path(__file__).resolve().parents[1] / "lora_scripts" / "models" / "configs" / "sd3.5-large"
    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "sd35_large_lora.yaml").read_text())
    cfg.update(base_model=str(configs), train_data_dir=str(root), output_dir=str(root / "est"))
    cfg.pop("metadata_path", None)
    (root / "est.yaml").write_text(yaml.safe_dump(cfg))
    proc = run_cli("estimate", "--config", str(root / "est.yaml"), "--vram", "80GB")
    assert proc.returncode == 0, proc.stderr[-2000:]
    total = next(line for line in proc.stdout.splitlines() if line.strip().startswith("total"))
    assert 20 < float(total.split()[1]) < 40, proc.stdout  # GiB


def test_dora_is_refused_before_training(tmp_path):
    """SD3 has no DoRA export (diffusers' SD3 loader drops it): one line at `check`, not after a whole run."""
    from lora_scripts.tiny_models import sd3 as tiny

    model = tiny.make_tiny_model(tmp_path / "m")
    data = make_captioned_images(tmp_path / "d", count=2)
    raw = tiny_image_config(model, data, tmp_path / "o", use_dora=True)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    result = run_cli("check", "--config", str(tmp_path / "c.yaml"))
    assert result.returncode == 2 and "use_dora" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1

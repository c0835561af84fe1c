"""Memory estimate: a breakdown from a fake training step, the effect of each knob, a recommendation, the GPU
pre-flight refusal."""

from __future__ import annotations

import pytest

import lora_scripts.preflight as preflight
from lora_scripts.cli import main
from lora_scripts.config import build_config
from lora_scripts.errors import ConfigError
from lora_scripts.preflight import estimate_memory, parse_size
from lora_scripts.testing import make_instruction_data, make_tiny_causal_lm


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("est")
    return make_tiny_causal_lm(root / "llama"), make_instruction_data(root / "d.jsonl")


def text_cfg(lm, tmp_path, **overrides):
    model, data = lm
    raw = {"task": "text", "base_model": str(model), "metadata_path": str(data), "output_dir": str(tmp_path / "o"),
           "batch_size": 4, "max_seq_length": 256}
    return build_config({**raw, **overrides})


def test_text_estimate_follows_the_knobs(lm, tmp_path):
    base = estimate_memory(text_cfg(lm, tmp_path), capacity=None)
    longer = estimate_memory(text_cfg(lm, tmp_path, max_seq_length=512), capacity=None)
    ckpt = estimate_memory(text_cfg(lm, tmp_path, gradient_checkpointing=True), capacity=None)
    assert base.parts["activations"] > 0 and base.parts["LoRA weights"] > 0 and base.parts["frozen weights"] > 0
    assert longer.parts["activations"] > 1.5 * base.parts["activations"]
    assert ckpt.parts["activations"] < base.parts["activations"]
    assert base.parts["optimizer states (adamw)"] == 2 * base.parts["LoRA weights"]


def test_image_estimate_checkpointing_and_resolution(tiny_sd, image_data, tmp_path):
    from lora_scripts.testing import tiny_image_config

    def est(**kw):
        return estimate_memory(build_config(tiny_image_config(tiny_sd, image_data, tmp_path / "o", batch_size=1, **kw)))

    plain, ckpt, bigger = est(), est(gradient_checkpointing=True), est(resolution=64)
    assert ckpt.parts["activations"] < plain.parts["activations"] < bigger.parts["activations"]


def test_recommendation_keeps_the_effective_batch(lm, tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_SCRIPTS_ESTIMATE_CACHE", str(tmp_path / "cache"))
    # checkpointing already on: a smaller batch is the next rung of the chooser's ladder on a CPU
    cfg = text_cfg(lm, tmp_path, batch_size=8, gradient_accumulation_steps=1, gradient_checkpointing=True)
    full = estimate_memory(cfg, capacity=None, gpu=False)
    fixed = full.parts.get("runtime overhead (CPU)", 0)
    tight = estimate_memory(cfg, capacity=int(fixed + (full.total - fixed) * 0.6), gpu=False)
    assert tight.recommended_batch_size is not None and tight.recommended_batch_size < 8
    assert tight.recommended_batch_size * tight.recommended_accumulation == 8
    assert estimate_memory(cfg, capacity=1024, gpu=False).recommended_batch_size is None


def test_estimate_command(lm, tmp_path, capsys):
    import yaml

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(text_cfg(lm, tmp_path).to_yaml_dict()))
    assert main(["estimate", "--config", str(path), "--vram", "1MB"]) == 0
    out = capsys.readouterr().out
    assert "activations" in out and "total" in out and "nothing fits" in out


def test_gpu_preflight_refuses_unless_forced(lm, tmp_path, monkeypatch):
    monkeypatch.setattr(preflight.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(preflight, "free_device_memory", lambda: 2**20)
    with pytest.raises(ConfigError, match=r"needs about .* GiB but .* is free; .*--force"):
        preflight.check_fits(text_cfg(lm, tmp_path))
    assert preflight.check_fits(text_cfg(lm, tmp_path), force=True) is not None


def test_gpu_preflight_is_bounded(lm, tmp_path, monkeypatch, capsys):
    """A first estimate slower than the bound is skipped with a note (train goes on); none is cached."""
    monkeypatch.setenv("LORA_SCRIPTS_ESTIMATE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(preflight.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(preflight, "free_device_memory", lambda: 2**20)
    monkeypatch.setattr(preflight, "PREFLIGHT_SECONDS", 0.0)
    assert preflight.check_fits(text_cfg(lm, tmp_path)) is None
    assert "memory pre-flight skipped" in capsys.readouterr().out
    assert not list((tmp_path / "cache").glob("*.json"))


def test_parse_size():
    assert parse_size("24GB") == 24 * 2**30 and parse_size("8000MB") == 8000 * 2**20 and parse_size("16g") == 16 * 2**30
    with pytest.raises(ConfigError):
        parse_size("lots")

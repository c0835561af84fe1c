"""base_quantization: the frozen base stored as int8 / fp8 (torchao) trains a LoRA through the CLI on SD 1.x, FLUX.1
and the text task; the loss stays close to the unquantised run's and falls; the exports load in the consumers'
libraries; the base is really stored quantised (and smaller); nf4 is refused on CPU in one line; resume is exact.

Tolerance (relative, every training step's loss and the denoiser's output vs the unquantised model): int8 1 %,
fp8 5 %. One weight's worst-case relative rounding error is 0.4 % in int8 (half a step of 127 per output channel's
largest weight) and 6.25 % in fp8 e4m3 (half a unit of its 3 mantissa bits); a loss or an output sums many such
independent roundings, which partly cancel, so it moves less than that worst case (measured here: int8 about
0.1 %, fp8 about 0.3 % on the losses, 0.2 % / 1.4 % on the SD UNet's output). The bounds leave room for other CPUs'
kernels and still fail a wrong scale or a mis-dequantised weight, which move outputs by 100 % or more.
"""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
import yaml
from safetensors import safe_open

from lora_scripts.config import build_config
from lora_scripts.testing import make_captioned_images, make_instruction_data, make_tiny_causal_lm, tiny_image_config

from .helpers import assert_same_tensors, run_cli, run_torchrun
from .test_family_flux import DOUBLE_BLOCK_TARGETS

TOLERANCE = {"int8": 0.01, "fp8": 0.05}
STEPS, EVAL_EVERY = 6, 3


def _losses(out):
    rows = list(csv.DictReader(open(out / "logs" / "loss.csv", encoding="utf-8")))
    return [float(r["loss"]) for r in rows], [float(r["eval_loss"]) for r in rows if r["eval_loss"]]


def _train(tmp_path, raw, name, cli=True):
    """Train ``raw`` into ``tmp_path / name`` through the CLI (or, to spare a process start, the Python API behind
    it); return the logged losses."""
    if cli:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw), encoding="utf-8")
        result = run_cli("train", "--config", str(path), "--no-progress")
        assert result.returncode == 0, result.stderr[-3000:]
    else:
        from lora_scripts.train.loop import train

        train(build_config(raw), show_progress=False)
    return _losses(tmp_path / name)


def _assert_close_and_learning(losses, evals, reference, kind):
    """Finite, within the stated tolerance of the unquantised run at every step, and the fixed-noise eval loss on
    the training images falls."""
    assert all(math.isfinite(x) for x in losses) and len(losses) == len(reference[0])
    for step, (got, want) in enumerate(zip(losses, reference[0]), start=1):
        assert abs(got - want) <= TOLERANCE[kind] * abs(want), f"step {step}: {got} vs unquantised {want}"
    assert len(evals) == 2 and evals[-1] < evals[0], evals


# --- SD 1.x ---------------------------------------------------------------------------------------------------------


def _sd_config(tiny_sd, data, out, **overrides):
    return tiny_image_config(tiny_sd, data, out, max_train_steps=STEPS, save_steps=EVAL_EVERY, val_data=str(data),
                             learning_rate=3e-3, **overrides)


@pytest.fixture(scope="module")
def sd_data(tmp_path_factory):
    return make_captioned_images(tmp_path_factory.mktemp("sdq") / "data", count=4)


@pytest.fixture(scope="module")
def sd_reference(tiny_sd, sd_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("sdref")
    return _train(root, _sd_config(tiny_sd, sd_data, root / "none"), "none", cli=False)


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_sd1_quantised_base_trains_close_to_unquantised_and_exports_load(tiny_sd, sd_data, sd_reference, tmp_path,
                                                                         kind):
    from diffusers import StableDiffusionPipeline

    samples = [{"prompt": "a red circle", "steps": 2}]  # rendered by the pipeline over the quantised UNet
    losses, evals = _train(tmp_path, _sd_config(tiny_sd, sd_data, tmp_path / kind, base_quantization=kind,
                                                sample_prompts=samples), kind, cli=kind == "int8")
    _assert_close_and_learning(losses, evals, sd_reference, kind)
    out = tmp_path / kind
    assert list((out / "samples").glob("*.png"))
    assert json.loads((out / "training_summary.json").read_text())["base_quantization"] == kind
    with safe_open(str(out / f"{kind}.safetensors"), "pt") as f:
        assert f.metadata()["lora_scripts_base_quantization"] == kind
    gen = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(1, 4, 16, 16, generator=gen), torch.tensor([10]), torch.randn(1, 16, 32, generator=gen)
    for lora in (out / f"{kind}.safetensors", out / "diffusers"):  # the LoRA applies to the full-precision base
        pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
        with torch.no_grad():
            base = pipe.unet(x, t, ctx).sample
            pipe.load_lora_weights(str(lora))
            assert (pipe.unet(x, t, ctx).sample - base).abs().max() > 1e-4


def test_sd1_int8_resume_is_exact(make_cfg, tmp_path):
    from lora_scripts.train.loop import train

    common = dict(base_quantization="int8", save_steps=2, lora_dropout=0.1)
    train(make_cfg("straight", max_train_steps=4, **common), show_progress=False)
    train(make_cfg("split", max_train_steps=2, **common), show_progress=False)
    result = train(make_cfg("split", max_train_steps=4, resume="latest", **common), show_progress=False)
    assert result.resumed_from.name == "step-2"
    assert_same_tensors(tmp_path / "straight/checkpoints/step-4/adapter.safetensors",
                        tmp_path / "split/checkpoints/step-4/adapter.safetensors")


def test_sd1_int8_two_processes_equal_one(write_config, tmp_path):
    """DDP leaves the quantised weights out of its start-up broadcast (it cannot flatten them; every process
    quantised the same weights alike): two processes of batch 1 train what one of batch 2 does."""
    from lora_scripts.config import load_config
    from lora_scripts.train.loop import train

    train(load_config(write_config("one.yaml", output="one", base_quantization="int8", batch_size=2)),
          show_progress=False)
    result = run_torchrun(write_config("two.yaml", output="two", base_quantization="int8", batch_size=1))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_tensors(tmp_path / "one/one.safetensors", tmp_path / "two/two.safetensors", atol=1e-6)


# --- FLUX.1 ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    from lora_scripts.tiny_models.flux import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-flux")


@pytest.fixture(scope="module")
def flux_data(tmp_path_factory):
    return make_captioned_images(tmp_path_factory.mktemp("fluxq") / "data", count=4)


def _flux_config(model, data, out, **overrides):
    # double-block targets: diffusers' kohya-FLUX converter splits single blocks at FLUX.1's real width (see
    # test_family_flux), so only these let the single-file export load into the tiny model's pipeline
    return tiny_image_config(model, data, out, text_max_length=16, learning_rate=5e-3, max_train_steps=STEPS,
                             save_steps=EVAL_EVERY, val_data=str(data), target_modules=DOUBLE_BLOCK_TARGETS,
                             **overrides)


@pytest.fixture(scope="module")
def flux_reference(tiny_flux, flux_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("fluxref")
    return _train(root, _flux_config(tiny_flux, flux_data, root / "none"), "none", cli=False)


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_flux_quantised_transformer_and_t5_train_close_to_unquantised_and_export_loads(
        tiny_flux, flux_data, flux_reference, tmp_path, kind):
    from diffusers import FluxPipeline

    losses, evals = _train(tmp_path, _flux_config(tiny_flux, flux_data, tmp_path / kind, base_quantization=kind),
                           kind, cli=kind == "int8")
    _assert_close_and_learning(losses, evals, flux_reference, kind)
    out = tmp_path / kind
    assert json.loads((out / "training_summary.json").read_text())["base_quantization"] == kind
    for lora in (out / f"{kind}.safetensors", out / "diffusers"):
        pipe = FluxPipeline.from_pretrained(tiny_flux)
        before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
        pipe.load_lora_weights(str(lora))
        pipe.fuse_lora()
        pipe.unload_lora_weights()  # the fused update stays in the weights
        after = pipe.transformer.state_dict()
        changed = [k for k in before if (after[k] - before[k]).abs().max() > 1e-6]
        assert changed and all(k.startswith("transformer_blocks.0.") for k in changed), changed


def _linears(module):
    """The module's own linears (the LoRA's down/up projections left out)."""
    return [m for n, m in module.named_modules() if isinstance(m, torch.nn.Linear) and ".lora_" not in n]


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_quantised_base_is_stored_quantised_smaller_and_close(tiny_flux, flux_data, tmp_path, kind):
    """Every linear of the transformer and of T5 holds torchao's quantised tensor (CLIP and the LoRA do not), the
    linear weights take one byte per weight plus a scale per output row (fp32: four bytes per weight), the forward
    stays within the tolerance and the backward reaches the LoRA."""
    from lora_scripts.models.quantize import is_quantized_weight, parameter_bytes
    from lora_scripts.tasks.image import ImageTask

    networks = {}
    for name in ("none", kind):
        task = ImageTask(build_config(_flux_config(tiny_flux, flux_data, tmp_path / name, base_quantization=name)))
        task.check_base_model()
        task.check_data()
        networks[name] = (task, task.load_model(torch.device("cpu"), torch.float32))
    task, network = networks[kind]
    clip, t5 = task.text_encoders
    base_linears = _linears(network.transformer) + _linears(t5)
    assert base_linears and all(is_quantized_weight(m.weight) for m in base_linears)
    assert not any(is_quantized_weight(m.weight) for m in _linears(clip))
    wrapped = [m for m in network.transformer.modules() if type(m).__name__ == "TorchaoLoraLinear"]
    assert wrapped and all(p.dtype == torch.float32 and type(p.data) is torch.Tensor
                           for m in wrapped for n, p in m.named_parameters() if "lora_" in n)
    reference = networks["none"][1]
    stored = sum(sum(t.numel() * t.element_size() for t in _storage(m.weight)) for m in base_linears)
    one_byte_per_weight = sum(m.weight.numel() + 8 * m.out_features for m in base_linears)  # + scale per row
    assert stored <= one_byte_per_weight < sum(m.weight.numel() * 4 for m in base_linears)
    assert parameter_bytes(network.transformer) < parameter_bytes(reference.transformer)
    gen = torch.Generator().manual_seed(0)
    latents, cond = torch.randn(1, 4, 16, 16, generator=gen), {"hidden": torch.randn(1, 16, 32, generator=gen),
                                                                 "pooled": torch.randn(1, 32, generator=gen)}
    family = task.family
    want = family.denoise(reference.transformer, latents, torch.tensor([0.6]), cond).detach()
    got = family.denoise(network.transformer, latents, torch.tensor([0.6]), cond)
    assert (got - want).abs().max() <= TOLERANCE[kind] * want.abs().max()
    (got ** 2).mean().backward()
    # peft initialises lora_B to zero, so the first gradient lands on lora_B
    grads = [p.grad for n, p in network.transformer.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def _storage(weight):
    from lora_scripts.models.quantize import storage_tensors

    return list(storage_tensors(weight.data))


# --- the text task --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("textq")
    return make_tiny_causal_lm(root / "llama", "llama"), make_instruction_data(root / "train.jsonl", "alpaca")


def _text_config(setup, out, **overrides):
    model, data = setup
    raw = {"task": "text", "base_model": str(model), "metadata_path": str(data), "val_data": str(data),
           "output_dir": str(out), "lora_rank": 4, "batch_size": 4, "max_train_steps": STEPS, "save_steps": EVAL_EVERY,
           "learning_rate": 2e-2, "max_seq_length": 96, "target_modules": "all-linear",
           "logging": {"tensorboard": False}}
    raw.update(overrides)
    return raw


@pytest.fixture(scope="module")
def text_reference(text_setup, tmp_path_factory):
    root = tmp_path_factory.mktemp("textref")
    return _train(root, _text_config(text_setup, root / "none"), "none", cli=False)


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_text_quantised_base_trains_close_to_unquantised_adapter_loads_and_merges(text_setup, text_reference,
                                                                                  tmp_path, kind):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    losses, evals = _train(tmp_path, _text_config(text_setup, tmp_path / kind, base_quantization=kind), kind,
                           cli=kind == "int8")
    _assert_close_and_learning(losses, evals, text_reference, kind)
    adapter = tmp_path / kind / "adapter"
    assert json.loads((adapter / "lora_scripts.json").read_text())["base_quantization"] == kind
    ids = torch.tensor([[1, 5, 9, 12, 3]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(text_setup[0]).eval()
        plain = base(input_ids=ids).logits
        tuned = PeftModel.from_pretrained(base, str(adapter)).eval()(input_ids=ids).logits
    assert (tuned - plain).abs().max() > 1e-4
    # export --merge merges into the full-precision base (the weights the quantised copy approximated)
    merged_dir = tmp_path / "merged"
    result = run_cli("export", "--merge", "--adapter", str(adapter), "--output", str(merged_dir))
    assert result.returncode == 0, result.stderr[-2000:]
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()(input_ids=ids).logits
    torch.testing.assert_close(merged, tuned, rtol=1e-4, atol=1e-4)


# --- refusals -------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="nf4 runs where CUDA is")
@pytest.mark.parametrize("task", ["image", "text"])
def test_nf4_is_refused_on_cpu_in_one_line_before_loading(tiny_sd, sd_data, text_setup, tmp_path, task):
    raw = (tiny_image_config(tiny_sd, sd_data, tmp_path / "o", base_quantization="nf4") if task == "image"
           else _text_config(text_setup, tmp_path / "o", base_quantization="nf4"))
    path = tmp_path / "nf4.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    result = run_cli("train", "--config", str(path), "--no-progress")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "base_quantization: nf4" in lines[0] and "needs a CUDA GPU" in lines[0] and "int8" in lines[0]
    assert not (tmp_path / "o").exists()  # refused before anything was loaded or written


def test_older_quantization_spelling_is_nf4_and_conflicts_are_refused(tmp_path):
    from lora_scripts.errors import ConfigError

    raw = {"task": "text", "base_model": "org/model", "metadata_path": "x.jsonl", "output_dir": str(tmp_path)}
    assert build_config(dict(raw, quantization="4bit")).base_quantization == "nf4"
    with pytest.raises(ConfigError, match="base_quantization: int8 disagree"):
        build_config(dict(raw, quantization="4bit", base_quantization="int8"))


@pytest.mark.parametrize("family", ["sdxl", "sd3", "chroma", "qwen_image", "z_image"])
def test_every_other_family_takes_a_step_on_an_int8_base(tiny_sdxl, tmp_path, family):
    """The families not trained above: their denoiser (and T5 / Qwen encoder) load as int8, one loss is within the
    tolerance of the unquantised one on the same batch, and its backward reaches the LoRA."""
    from lora_scripts.models.quantize import is_quantized_weight
    from lora_scripts.tasks.image import ImageTask
    from lora_scripts.tasks.image.task import quantized_modules
    from lora_scripts.tiny_models import make_tiny_model

    model = tiny_sdxl if family == "sdxl" else make_tiny_model(family, tmp_path / family)
    data = make_captioned_images(tmp_path / "data", count=2)
    losses = {}
    for kind in ("none", "int8"):
        cfg = build_config(tiny_image_config(model, data, tmp_path / kind, text_max_length=16, base_quantization=kind))
        task = ImageTask(cfg)
        task.check_base_model()
        summary = task.check_data()
        network = task.load_model(torch.device("cpu"), torch.float32)
        dataset = task.dataset(summary)
        batch = task.collate([dataset[(i, 100 + i)] for i in range(2)])
        loss = task.loss(network, batch)
        losses[kind] = loss.item()
    modules = quantized_modules(task.components)
    assert len(modules) == (1 if family == "sdxl" else 2)  # the denoiser, and T5 / Qwen where the family has one
    assert all(is_quantized_weight(m.weight) for module in modules for m in _linears(module))
    assert losses["int8"] == pytest.approx(losses["none"], rel=TOLERANCE["int8"])
    loss.backward()
    grads = [p.grad for n, p in network.named_parameters() if "lora_B" in n]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)


def test_cache_keys_tell_a_quantised_encoder_from_the_full_precision_one(tiny_flux):
    """cache_text_embeddings keys include the encoder's weights as stored: a shared cache_dir never hands int8-T5
    embeddings to a full-precision run (or fp8 ones to an int8 run)."""
    from transformers import T5EncoderModel

    from lora_scripts.data.cache import module_fingerprint
    from lora_scripts.models.quantize import quantize_frozen

    keys = []
    for kind in ("none", "int8", "fp8", "int8"):
        encoder = T5EncoderModel.from_pretrained(tiny_flux / "text_encoder_2")
        keys.append(module_fingerprint(quantize_frozen(encoder, kind, torch.device("cpu"), torch.float32)))
    assert len(set(keys[:3])) == 3 and keys[1] == keys[3]  # and quantising is deterministic


@pytest.mark.parametrize("kind, key, value, reason", [
    ("int8", "fsdp", True, "FSDP2 cannot shard torchao's weight-only tensors"),
    ("nf4", "blocks_to_swap", 2, "block swap does not move bitsandbytes' 4-bit quantisation state")])
def test_quantised_base_with_fsdp_or_nf4_with_block_swap_is_refused_in_one_line(write_config, capsys, kind, key,
                                                                               value, reason):
    """(int8 / fp8 with ``blocks_to_swap`` train: tests/test_memory_settings.py.)"""
    from lora_scripts.cli import main

    config = write_config(base_quantization=kind, **{key: value})
    assert main(["train", "--config", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"base_quantization: {kind} with {key}" in err and reason in err

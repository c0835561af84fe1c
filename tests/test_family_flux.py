"""FLUX.1 LoRA end to end on a tiny FLUX-shaped model: train through the CLI, load both exports with FluxPipeline's
own load_lora_weights, single files in the original layout, resume, 2 processes, errors."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors import safe_open

from lora_scripts.config import build_config
from lora_scripts.testing import make_captioned_images, tiny_image_config
from lora_scripts.tiny_models.flux import make_tiny_model, write_components_only, write_single_file

from .helpers import assert_same_tensors, run_cli, run_torchrun


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-flux")


@pytest.fixture(scope="module")
def flux_data(tmp_path_factory):
    return make_captioned_images(tmp_path_factory.mktemp("fluxdata") / "data", count=4)


def flux_config(model, data, out, **overrides):
    return tiny_image_config(model, data, out, text_max_length=16, learning_rate=5e-3, **overrides)


def write(tmp_path, raw, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def _train_here(tiny_flux, flux_data, out, **overrides):
    """A run in this process: its trained modules are the reference the exports must reproduce."""
    from lora_scripts.train.loop import Trainer

    cfg = build_config(flux_config(tiny_flux, flux_data, out, output_name="lora", **overrides))
    trainer = Trainer(cfg, show_progress=False)
    trainer.run()
    return trainer


@pytest.fixture(scope="module")
def flux_trained(tiny_flux, flux_data, tmp_path_factory):
    """Default targets (double and single blocks), CLIP-L text-encoder LoRA included."""
    return _train_here(tiny_flux, flux_data, tmp_path_factory.mktemp("fluxrun") / "out", train_text_encoder=True)


# diffusers' kohya-FLUX converter splits single_blocks.N.linear1 at FLUX.1's real width (3072), so on a tiny model
# only double-block modules can go through it; the single blocks' fused export is checked the way ComfyUI applies it
DOUBLE_BLOCK_TARGETS = [f"transformer_blocks.0.{m}" for m in (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
    "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")]


@pytest.fixture(scope="module")
def flux_trained_double(tiny_flux, flux_data, tmp_path_factory):
    return _train_here(tiny_flux, flux_data, tmp_path_factory.mktemp("fluxdouble") / "out", train_text_encoder=True,
                       target_modules=DOUBLE_BLOCK_TARGETS, max_train_steps=2)


def _inputs(pipe, prompt="a red circle"):
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 16, 16, generator=gen)
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    return latents, ids


def _outputs(family, transformer, clip, t5, pipe, latents, ids):
    """(CLIP pooled output, transformer prediction) the way FluxPipeline encodes and denoises."""
    with torch.no_grad():
        prompt_embeds, pooled, _ = pipe.encode_prompt("a red circle", prompt_2=None, max_sequence_length=16)
        pooled = clip(ids, output_hidden_states=False).pooler_output
        pred = family.denoise(transformer, latents, torch.tensor([0.6]), {"hidden": prompt_embeds, "pooled": pooled})
    return pooled, pred


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("fmt", ["single-file", "diffusers"])
def test_both_exports_reproduce_the_trained_model_in_flux_pipeline(flux_trained, flux_trained_double, tiny_flux, fmt):
    from diffusers import FluxPipeline

    run = flux_trained_double if fmt == "single-file" else flux_trained
    out = run.cfg.output_dir
    network = run.accelerator.unwrap_model(run.model).eval()
    family = run.task.family
    pipe = FluxPipeline.from_pretrained(tiny_flux)
    latents, ids = _inputs(pipe)
    expected = _outputs(family, network.transformer, network.text_encoders[0], None, pipe, latents, ids)
    base = _outputs(family, pipe.transformer, pipe.text_encoder, None, pipe, latents, ids)
    pipe.load_lora_weights(str(out / "lora.safetensors" if fmt == "single-file" else out / "diffusers"))
    got = _outputs(family, pipe.transformer, pipe.text_encoder, None, pipe, latents, ids)
    for name, b, e, g in zip(("clip pooled", "transformer"), base, expected, got):
        assert (b - e).abs().max() > 1e-4, f"training should change the {name}"
        assert _rel(g, e) <= 1e-5, f"{fmt}: {name} differs by {_rel(g, e):.2e} (relative)"


def test_single_file_export_applied_as_comfyui_does_reproduces_the_trained_transformer(flux_trained, tiny_flux):
    """ComfyUI (comfy/lora.py) maps lora_unet_<original key> onto the original-layout weight and adds
    alpha/rank * up @ down to it; done here on the original layout, then read back through our table."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file

    from lora_scripts.tasks.image.families.flux import from_original, original_layout, to_original

    base = FluxTransformer2DModel.from_pretrained(tiny_flux / "transformer")
    rules = original_layout(base.config)
    shapes = {k: v.shape for k, v in base.state_dict().items()}
    original = to_original(base.state_dict(), rules)
    lora = load_file(str(flux_trained.cfg.output_dir / "lora.safetensors"))
    applied = 0
    for key in [k for k in lora if k.startswith("lora_unet_") and k.endswith(".lora_down.weight")]:
        name = key.removesuffix(".lora_down.weight")
        target = next(o for o in original if o.endswith(".weight") and
                      "lora_unet_" + o.removesuffix(".weight").replace(".", "_") == name)
        down, up, alpha = lora[key], lora[f"{name}.lora_up.weight"], lora[f"{name}.alpha"]
        original[target] = original[target] + (alpha / down.shape[0]) * (up @ down)
        applied += 1
    assert applied >= 8  # double-block qkv/proj/mlps and single-block linear1
    base.load_state_dict(from_original(original, rules, shapes, "comfy"))
    network = flux_trained.accelerator.unwrap_model(flux_trained.model).eval()
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    cond = {"hidden": torch.randn(1, 16, 32), "pooled": torch.randn(1, 32)}
    family = flux_trained.task.family
    with torch.no_grad():
        want = family.denoise(network.transformer, latents, torch.tensor([0.4]), cond)
        got = family.denoise(base, latents, torch.tensor([0.4]), cond)
    assert _rel(got, want) <= 1e-5


def test_single_file_export_is_in_the_original_flux_layout_with_metadata(flux_trained):
    path = flux_trained.cfg.output_dir / "lora.safetensors"
    with safe_open(str(path), "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
        down = f.get_tensor("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight")
        alpha = f.get_tensor("lora_unet_double_blocks_0_img_attn_qkv.alpha")
    assert "lora_unet_single_blocks_0_linear1.lora_up.weight" in keys
    assert any(k.startswith("lora_te1_") for k in keys) and not any(".to_q." in k or "_to_q." in k for k in keys)
    assert down.shape[0] == 3 * 4 and alpha.item() == pytest.approx(3 * 2)  # q, k, v stacked; alpha/rank kept
    assert meta["ss_base_model_version"] == "flux1" and meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert meta["lora_scripts_model_family"] == "flux" and meta["ss_prediction_type"] == "flow_matching"


def test_single_file_in_the_original_layout_loads_the_same_weights(tiny_flux, tmp_path):
    from diffusers import FluxTransformer2DModel

    from lora_scripts.tasks.image.families import detect_single_file
    from lora_scripts.tasks.image.families.flux import Flux

    components = write_components_only(tiny_flux, tmp_path / "components")
    reference = FluxTransformer2DModel.from_pretrained(tiny_flux / "transformer").state_dict()
    for prefix in ("", "model.diffusion_model."):
        path = write_single_file(tiny_flux, tmp_path / f"flux1-dev{len(prefix)}.safetensors", prefix=prefix)
        assert detect_single_file(path) is Flux
        cfg = build_config(flux_config(path, tmp_path, tmp_path / "o", base_model_config=str(components)))
        loaded = Flux(cfg).load_single_file_denoiser(path).state_dict()
        assert loaded.keys() == reference.keys()
        assert all(torch.equal(loaded[k], reference[k]) for k in reference)


def test_weights_load_in_the_run_dtype_equal_to_casting_after_an_fp32_load(tiny_flux, tmp_path):
    """On a GPU run in bf16 the components are read as bf16 (2 bytes a parameter on the CPU while loading, not 4):
    a diffusers folder, a single file with its components given as files, and each gives exactly the weights an
    fp32 load cast to bf16 gives."""
    from lora_scripts.tasks.image.families.flux import Flux

    single = write_single_file(tiny_flux, tmp_path / "flux1-dev.safetensors")
    sources = {
        "folder": {"base_model": tiny_flux},
        "files": {"base_model": single, "vae_path": str(tiny_flux / "vae"),
                  "text_encoder_path": str(tiny_flux / "text_encoder" / "model.safetensors"),
                  "text_encoder_2_path": str(tiny_flux / "text_encoder_2"),
                  "base_model_config": str(write_components_only(tiny_flux, tmp_path / "cfgs"))},
    }
    for name, source in sources.items():
        cfg = build_config({**flux_config(source.pop("base_model"), tmp_path, tmp_path / "o"), **source})
        loaded = {}
        for dtype in (torch.float32, torch.bfloat16):
            family = Flux(cfg)
            family.load_dtype = dtype
            parts = family.load(str(cfg.base_model))
            loaded[dtype] = {f"{i}.{k}": v for i, m in enumerate((parts.denoiser, parts.vae, *parts.text_encoders))
                             for k, v in m.state_dict().items() if v.is_floating_point()}
        half, full = loaded[torch.bfloat16], loaded[torch.float32]
        assert half.keys() == full.keys() and all(v.dtype == torch.float32 for v in full.values()), name
        # T5 keeps its feed-forward output layers (wo) in fp32 when loaded in half precision (transformers'
        # _keep_in_fp32_modules); the task casts them with the rest when it moves the encoder to the GPU
        assert all(v.dtype == torch.bfloat16 or ".wo." in k for k, v in half.items()), name
        assert all(torch.equal(half[k].float(), full[k].to(half[k].dtype).float()) for k in full), name


def test_original_layout_table_matches_diffusers_converter_at_full_size():
    """Our table vs diffusers' own FLUX.1 converter on the real 12 B shapes (meta tensors: no memory)."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    from lora_scripts.tasks.image.families.flux import original_layout, to_original
    from lora_scripts.tasks.image.families.transformer import CONFIGS

    config = FluxTransformer2DModel.load_config(CONFIGS / "flux1-dev", subfolder="transformer")
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(config)
    state = model.state_dict()
    original = to_original(state, original_layout(config))
    converted = convert_flux_transformer_checkpoint_to_diffusers(dict(original))
    assert converted.keys() == state.keys()
    assert all(converted[k].shape == state[k].shape for k in state)


def test_transformer_only_file_with_components_trains_from_the_cli(tiny_flux, flux_data, tmp_path):
    single = write_single_file(tiny_flux, tmp_path / "flux1-dev.safetensors")
    raw = flux_config(single, flux_data, tmp_path / "out", max_train_steps=2, vae_path=str(tiny_flux / "vae"),
                      text_encoder_path=str(tiny_flux / "text_encoder"),
                      text_encoder_2_path=str(tiny_flux / "text_encoder_2"),
                      base_model_config=str(write_components_only(tiny_flux, tmp_path / "cfgs")))
    result = run_cli("train", "--config", str(write(tmp_path, raw)), "--no-progress")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "out" / "out.safetensors").is_file()


def _one_line(result):
    lines = [l for l in result.stderr.strip().splitlines() if l.strip()]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    return lines[0]


def test_errors_before_any_weights_load_are_one_line(tiny_flux, flux_data, tmp_path):
    single = write_single_file(tiny_flux, tmp_path / "flux1-dev.safetensors")
    shipped = dict(flux_config(single, flux_data, tmp_path / "o"))
    line = _one_line(run_cli("check", "--config", str(write(tmp_path, shipped, "a.yaml"))))
    assert "no vae weights" in line and "vae_path" in line  # the shipped configs hold no weights
    wrong_te = dict(shipped, base_model_config=str(tiny_flux), text_encoder_2_path=str(tiny_flux / "text_encoder"))
    line = _one_line(run_cli("check", "--config", str(write(tmp_path, wrong_te, "b.yaml"))))
    assert "text_encoder_2_path" in line and "clip_text_model" in line and "t5" in line
    not_flux = dict(shipped, model_family="sdxl")
    line = _one_line(run_cli("check", "--config", str(write(tmp_path, not_flux, "c.yaml"))))
    assert "FLUX.1" in line and "model_family" in line
    unknown = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"some.weight": torch.zeros(2, 2)}, str(unknown))
    line = _one_line(run_cli("check", "--config", str(write(tmp_path, dict(shipped, base_model=str(unknown)), "d.yaml"))))
    assert str(unknown) in line
    te = dict(flux_config(tiny_flux, flux_data, tmp_path / "o"), train_text_encoder=True, conv_rank=4)
    line = _one_line(run_cli("check", "--config", str(write(tmp_path, te, "e.yaml"))))
    assert "conv_rank" in line


@pytest.mark.parametrize("source", ["single-file", "diffusers"])
def test_network_weights_continue_from_either_export(flux_trained, tiny_flux, flux_data, tmp_path, source):
    from peft.utils import get_peft_model_state_dict

    out = flux_trained.cfg.output_dir
    weights = out / "lora.safetensors" if source == "single-file" else out / "diffusers"
    cfg = build_config(flux_config(tiny_flux, flux_data, tmp_path / "cont", train_text_encoder=True,
                                   network_weights=str(weights)))
    from lora_scripts.tasks.image import ImageTask

    task = ImageTask(cfg)
    task.check_base_model()
    task.check_data()
    network = task.load_model(torch.device("cpu"), torch.float32)
    trained = flux_trained.accelerator.unwrap_model(flux_trained.model)
    got = get_peft_model_state_dict(network.transformer)
    want = get_peft_model_state_dict(trained.transformer)
    assert got.keys() == want.keys()
    for key in want:  # same effect: compare the products up @ down per module
        if key.endswith("lora_A.weight"):
            b = key.replace("lora_A", "lora_B")
            torch.testing.assert_close(got[b] @ got[key], want[b] @ want[key], rtol=1e-5, atol=1e-6)


def test_flux_resume_is_exact_and_two_processes_equal_one(tiny_flux, flux_data, tmp_path):
    keys = dict(max_train_steps=4, save_steps=2, batch_size=2, timestep_sampling="logit_normal")
    full = write(tmp_path, flux_config(tiny_flux, flux_data, tmp_path / "full", **keys), "full.yaml")
    assert run_cli("train", "--config", str(full), "--no-progress").returncode == 0
    half = write(tmp_path, flux_config(tiny_flux, flux_data, tmp_path / "half", **dict(keys, max_train_steps=2)),
                 "half.yaml")
    assert run_cli("train", "--config", str(half), "--no-progress").returncode == 0
    resumed = write(tmp_path, flux_config(tiny_flux, flux_data, tmp_path / "half", **keys), "res.yaml")
    result = run_cli("train", "--config", str(resumed), "--resume", "latest", "--no-progress")
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_tensors(tmp_path / "full" / "full.safetensors", tmp_path / "half" / "half.safetensors")
    ddp = write(tmp_path, flux_config(tiny_flux, flux_data, tmp_path / "ddp", **dict(keys, batch_size=1)), "ddp.yaml")
    result = run_torchrun(ddp)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_tensors(tmp_path / "full" / "full.safetensors", tmp_path / "ddp" / "ddp.safetensors", atol=1e-6)


def test_cached_latents_and_embeddings_give_the_same_loss(tiny_flux, flux_data, tmp_path):
    from lora_scripts.tasks.image import ImageTask

    losses = []
    for cached in (False, True):
        cfg = build_config(flux_config(tiny_flux, flux_data, tmp_path / f"c{cached}", cache_latents=cached,
                                       cache_text_embeddings=cached))
        task = ImageTask(cfg)
        task.check_base_model()
        summary = task.check_data()
        model = task.load_model(torch.device("cpu"), torch.float32)
        dataset = task.dataset(summary)
        batch = task.collate([dataset[(i, 100 + i)] for i in range(2)])
        with torch.no_grad():
            losses.append(task.loss(model, batch).item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_estimate_runs_on_the_shipped_flux_config_shapes(tiny_flux, flux_data, tmp_path):
    """The estimate's probe on the tiny model (the full-size number is in the docs; it takes minutes here)."""
    from lora_scripts.preflight import estimate_memory

    est = estimate_memory(build_config(flux_config(tiny_flux, flux_data, tmp_path / "e", batch_size=1)))
    assert est.total > 0


def test_rslora_dora_and_dropout_train_and_export_fused_magnitudes(tiny_flux, flux_data, tmp_path):
    raw = flux_config(tiny_flux, flux_data, tmp_path / "dora", max_train_steps=2, use_dora=True, use_rslora=True,
                      lora_dropout=0.1)
    result = run_cli("train", "--config", str(write(tmp_path, raw)), "--no-progress")
    assert result.returncode == 0, result.stderr[-2000:]
    with safe_open(str(tmp_path / "dora" / "dora.safetensors"), "pt") as f:
        scale = f.get_tensor("lora_unet_double_blocks_0_img_attn_qkv.dora_scale")
        alpha = f.get_tensor("lora_unet_double_blocks_0_img_attn_qkv.alpha").item()
    assert scale.shape == (3 * 16, 1)  # q, k, v magnitudes side by side, one per output row
    assert alpha == pytest.approx(3 * 2 * 2)  # rsLoRA: alpha * sqrt(rank) under alpha/rank, times 3 parts
    partial = dict(raw, target_modules=["attn.to_q"])
    line = _one_line(run_cli("check", "--config", str(write(tmp_path, partial, "p.yaml"))))
    assert "use_dora" in line

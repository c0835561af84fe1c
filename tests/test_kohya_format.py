"""kohya LoRA files for every network we train: they load in diffusers and give the same UNet and text-encoder
outputs as the adapters they came from; their keys are what A1111 and ComfyUI load; and they (and diffusers and PEFT
files, and sd-scripts' own SD1.5 files) come back as the same LoRA through ``network_weights``."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from peft import LoraConfig, set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_scripts.errors import ConfigError
from lora_scripts.export.kohya import (base_model_version, kohya_metadata, kohya_network_args, kohya_state_dict,
                                       model_family, write_kohya_lora)
from lora_scripts.export.load import apply_network_weights, load_network_weights

RANK, ALPHA, CONV_RANK, CONV_ALPHA = 4, 2.0, 2, 1.0
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]  # what sd-scripts trains
LOCON = ["conv1", "conv2", "downsamplers.0.conv", "upsamplers.0.conv"]
TOLERANCE = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    from lora_scripts.testing import make_tiny_sdxl_model

    return make_tiny_sdxl_model(tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture()
def models(tiny_sd, tiny_sdxl):
    return {"sd1": tiny_sd, "sdxl": tiny_sdxl}


def load_pipe(models, family):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if family == "sd1":
        pipe = StableDiffusionPipeline.from_pretrained(models[family], safety_checker=None, requires_safety_checker=False)
    else:
        pipe = StableDiffusionXLPipeline.from_pretrained(models[family])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def text_encoders(pipe):
    parts = {"text_encoder": pipe.text_encoder}
    if getattr(pipe, "text_encoder_2", None) is not None:
        parts["text_encoder_2"] = pipe.text_encoder_2
    return parts


def lora_configs(variant, rank=RANK, alpha=ALPHA, unet_targets=UNET_TARGETS):
    """(UNet config, text-encoder config) for a variant: lora (alpha = rank), alpha (alpha != rank), rslora, dora,
    locon (conv_rank/conv_alpha on the ResNet 3x3 convs)."""
    common = dict(r=rank, lora_alpha=float(rank) if variant == "lora" else alpha, use_rslora=variant == "rslora",
                  use_dora=variant == "dora")
    unet = LoraConfig(target_modules=list(unet_targets), **common)
    if variant == "locon":
        unet = LoraConfig(target_modules=list(unet_targets) + LOCON, rank_pattern={k: CONV_RANK for k in LOCON},
                          alpha_pattern={k: CONV_ALPHA for k in LOCON}, **common)
    return unet, LoraConfig(target_modules=TE_TARGETS, **common)


def add_adapters(pipe, variant, randomize=True, seed=0, **kwargs):
    """Attach the variant's adapters to the UNet and text encoder(s), with random non-zero LoRA weights."""
    unet_config, te_config = lora_configs(variant, **kwargs)
    pipe.unet.add_adapter(unet_config)
    parts = {"unet": pipe.unet}
    for name, module in text_encoders(pipe).items():
        module.add_adapter(te_config)
        parts[name] = module
    if randomize:
        gen = torch.Generator().manual_seed(seed)
        for module in parts.values():
            for name, param in module.named_parameters():
                if "lora_magnitude_vector" in name:  # keep it near the weight norm DoRA starts from
                    param.data = param.data * (1 + 0.2 * torch.randn(param.shape, generator=gen))
                elif "lora_" in name:
                    param.data = 0.3 * torch.randn(param.shape, generator=gen)
    return parts


def effective_alphas(variant):
    """(alpha, conv_alpha) under the classic alpha/rank rule, as the export is told them."""
    alpha = float(RANK) if variant == "lora" else ALPHA
    if variant == "rslora":
        alpha *= math.sqrt(RANK)
    return alpha, (CONV_ALPHA if variant == "locon" else None)


def export(parts, family, variant, path):
    alpha, conv_alpha = effective_alphas(variant)
    states = {name: get_peft_model_state_dict(module) for name, module in parts.items()}
    tensors = kohya_state_dict(states, family=family, alpha=alpha, conv_alpha=conv_alpha,
                               unet_config=parts["unet"].config)
    meta = kohya_metadata(
        network_dim=RANK, network_alpha=alpha, base_model_version=base_model_version(family), base_model="tiny",
        output_name=path.stem, training_started_at=0.0, training_finished_at=1.0, steps=1, epoch=1,
        num_train_images=1, network_args=kohya_network_args(
            conv_rank=CONV_RANK if variant == "locon" else None, conv_alpha=conv_alpha, use_dora=variant == "dora"),
    )
    return write_kohya_lora(path, tensors, meta)


def outputs(pipe):
    """UNet and text-encoder outputs on fixed inputs."""
    gen = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 16, 16, generator=gen)
    context = torch.randn(2, 16, pipe.unet.config.cross_attention_dim, generator=gen)
    added = None
    if pipe.unet.config.addition_embed_type == "text_time":
        added = {"text_embeds": torch.randn(2, 32, generator=gen), "time_ids": torch.randn(2, 6, generator=gen)}
    ids = pipe.tokenizer(["a red circle", "the blue square"], padding="max_length", max_length=16,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        out = [pipe.unet(sample, torch.tensor([10, 500]), context, added_cond_kwargs=added).sample]
        out += [module(ids)[0] for module in text_encoders(pipe).values()]
    return out


def max_diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------------------------
# Export -> diffusers


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("variant", ["lora", "alpha", "rslora", "locon"])
def test_kohya_file_loads_in_diffusers_with_same_outputs(models, tmp_path, family, variant):
    trained = load_pipe(models, family)
    parts = add_adapters(trained, variant)
    expected = outputs(trained)
    path = export(parts, family, variant, tmp_path / f"{family}-{variant}.safetensors")

    fresh = load_pipe(models, family)
    base = outputs(fresh)
    fresh.load_lora_weights(str(path))
    got = outputs(fresh)
    for before, after in zip(base, expected):
        assert (before - after).abs().max() > 1e-2, "the LoRA should change every part's output"
    assert max_diff(got, expected) <= TOLERANCE


def lycoris_merge(module_weight, down, up, alpha, dora_scale):
    """LyCORIS's merge of a DoRA module (``wd_on_out``): W' = W + alpha/rank * up @ down, then each output channel of
    W' rescaled to norm ``dora_scale``."""
    rank = down.shape[0]
    delta = (up.flatten(1) @ down.flatten(1)).reshape(module_weight.shape) * (alpha / rank)
    merged = module_weight + delta
    norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (merged.dim() - 1))
    return merged * (dora_scale / norm)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_dora_file_reproduces_peft_dora_under_the_lycoris_merge(models, tmp_path, family):
    """diffusers' SD/SDXL loaders drop ``dora_scale`` keys (lora_state_dict: "DoRA checkpoint that is not compatible"),
    so a DoRA file is checked against the merge LyCORIS (and ComfyUI, reading the axis from dora_scale's shape) does."""
    trained = load_pipe(models, family)
    parts = add_adapters(trained, "dora", unet_targets=UNET_TARGETS + LOCON)
    expected = outputs(trained)
    path = export(parts, family, "dora", tmp_path / "dora.safetensors")
    tensors = load_file(str(path))
    assert {tensors[k].dim() for k in tensors if k.endswith(".dora_scale")} == {2, 4}  # (out, 1), (out, 1, 1, 1)

    fresh = load_pipe(models, family)
    names = {"unet": "lora_unet_", "text_encoder": "lora_te_" if family == "sd1" else "lora_te1_",
             "text_encoder_2": "lora_te2_"}
    from lora_scripts.export.kohya import kohya_module_name

    merged = 0
    for part, module in {"unet": fresh.unet, **text_encoders(fresh)}.items():
        for name, sub in module.named_modules():
            if not isinstance(sub, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            key = kohya_module_name(part, name, family=family, unet_config=fresh.unet.config)
            assert key.startswith(names[part])
            if f"{key}.lora_down.weight" not in tensors:
                continue
            sub.weight.data = lycoris_merge(sub.weight.data, tensors[f"{key}.lora_down.weight"],
                                            tensors[f"{key}.lora_up.weight"], tensors[f"{key}.alpha"].item(),
                                            tensors[f"{key}.dora_scale"])
            merged += 1
    assert merged == len([k for k in tensors if k.endswith(".dora_scale")])
    assert max_diff(outputs(fresh), expected) <= TOLERANCE


# ---------------------------------------------------------------------------------------------------------------
# The key contract: what A1111 (extensions-builtin/Lora) and ComfyUI (comfy/lora.py) load

KEY = re.compile(r"^lora_(unet|te|te1|te2)_[A-Za-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha|dora_scale)$")
SDXL_UNET = re.compile(r"^lora_unet_(input_blocks_\d+_\d+|middle_block_\d+|output_blocks_\d+_\d+)_[A-Za-z0-9_]+$")
# A1111's convert_diffusers_name_to_compvis patterns for SD 1.x/2.x diffusers-path names
SD_UNET = re.compile(r"^lora_unet_(down_blocks_\d+_(attentions|resnets)_\d+_.+|mid_block_(attentions|resnets)_\d+_.+"
                     r"|up_blocks_\d+_(attentions|resnets)_\d+_.+|down_blocks_\d+_downsamplers_0_conv"
                     r"|up_blocks_\d+_upsamplers_0_conv)$")
TE = re.compile(r"^lora_te[12]?_text_model_encoder_layers_\d+_(self_attn_(q|k|v|out)_proj|mlp_fc[12])$")


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_every_exported_key_is_one_a1111_and_comfyui_load(models, tmp_path, family):
    from lora_scripts.models.ldm import unet_state_dict_to_ldm

    pipe = load_pipe(models, family)
    unet_config, te_config = lora_configs("dora", unet_targets=UNET_TARGETS + ["proj_in", "proj_out", "ff.net.0.proj",
                                                                                 "ff.net.2"] + LOCON)
    pipe.unet.add_adapter(unet_config)
    parts = {"unet": pipe.unet}
    for name, module in text_encoders(pipe).items():
        module.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, use_dora=True,
                                      target_modules=TE_TARGETS))
        parts[name] = module
    tensors = load_file(str(export(parts, family, "dora", tmp_path / "all.safetensors")))

    assert all(KEY.match(key) for key in tensors), [k for k in tensors if not KEY.match(k)][:5]
    names = {key.split(".")[0] for key in tensors}
    for name in names:  # every module is complete
        for kind in ("lora_down.weight", "lora_up.weight", "alpha", "dora_scale"):
            assert f"{name}.{kind}" in tensors
    unet_names = {n for n in names if n.startswith("lora_unet_")}
    te_names = names - unet_names
    # ComfyUI maps lora_unet_<weight name without .weight, dots as _> of the model it patches: LDM names for SDXL,
    # diffusers names for SD 1.x (its unet_to_diffusers table); A1111 converts SD 1.x diffusers names with SD_UNET.
    plain = load_pipe(models, family).unet
    if family == "sdxl":
        ldm = unet_state_dict_to_ldm(plain.state_dict(), plain.config, prefix="")
        comfy = {"lora_unet_" + k.removesuffix(".weight").replace(".", "_") for k in ldm if k.endswith(".weight")}
        assert all(SDXL_UNET.match(n) for n in unet_names), sorted(unet_names)[:5]
        assert {n[: n.index("_te")] for n in te_names} == {"lora"} and {n.split("_")[1] for n in te_names} == {"te1", "te2"}
    else:
        comfy = {"lora_unet_" + k.removesuffix(".weight").replace(".", "_")
                 for k in plain.state_dict() if k.endswith(".weight")}
        assert all(SD_UNET.match(n) for n in unet_names), [n for n in unet_names if not SD_UNET.match(n)][:5]
        assert {n.split("_")[1] for n in te_names} == {"te"}
    assert unet_names <= comfy, sorted(unet_names - comfy)[:5]
    assert all(TE.match(n) for n in te_names), sorted(te_names)[:5]
    # the tiny SDXL's first attention block; the real SDXL's (two resnets per block) is input_blocks_4_1
    assert "lora_unet_" + ("input_blocks_3_1_transformer_blocks_0_attn1_to_q" if family == "sdxl" else
                           "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q") in names


def test_kohya_metadata_records_network_args_and_sdxl_version(models, tmp_path):
    pipe = load_pipe(models, "sdxl")
    parts = add_adapters(pipe, "locon")
    path = export(parts, "sdxl", "locon", tmp_path / "x.safetensors")
    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert model_family(pipe.unet.config) == "sdxl" and model_family(load_pipe(models, "sd1").unet.config) == "sd1"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1"}
    assert json.loads(kohya_metadata(network_dim=4, network_alpha=4, base_model_version="sd_v1", base_model="m",
                                     output_name="o", training_started_at=0, training_finished_at=0, steps=0, epoch=0,
                                     num_train_images=0, network_args=kohya_network_args(use_dora=True))
                      ["ss_network_args"]) == {"dora_wd": "True"}
    tensors = load_file(str(path))
    conv = [k for k in tensors if k.endswith("in_layers_2.alpha")]
    assert conv and all(tensors[k].item() == CONV_ALPHA for k in conv)
    assert tensors["lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.alpha"].item() == ALPHA


# ---------------------------------------------------------------------------------------------------------------
# network_weights: kohya, diffusers, PEFT -> the same peft tensors


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("variant", ["alpha", "rslora", "dora", "locon"])
def test_kohya_round_trip_gives_back_the_same_peft_tensors(models, tmp_path, family, variant):
    targets_kwargs = {"unet_targets": UNET_TARGETS + LOCON} if variant == "dora" else {}  # DoRA on convs too
    trained = load_pipe(models, family)
    parts = add_adapters(trained, variant, **targets_kwargs)
    path = export(parts, family, variant, tmp_path / "lora.safetensors")

    fresh = load_pipe(models, family)
    targets = add_adapters(fresh, variant, randomize=False, **targets_kwargs)
    states = load_network_weights(path, targets, family=family)
    for name, module in parts.items():
        original = get_peft_model_state_dict(module)
        assert states[name].keys() == original.keys()
        for key, tensor in original.items():
            torch.testing.assert_close(states[name][key], tensor, rtol=0, atol=1e-6, msg=key)
    apply_network_weights(path, targets, family=family)
    assert max_diff(outputs(fresh), outputs(trained)) <= TOLERANCE


@pytest.mark.parametrize("variant", ["locon", "dora"])
def test_diffusers_and_peft_files_import_as_the_same_lora(models, tmp_path, variant):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    trained = load_pipe(models, "sd1")
    parts = add_adapters(trained, variant)
    states = {name: get_peft_model_state_dict(module) for name, module in parts.items()}
    meta = {"r": RANK, "lora_alpha": ALPHA, "use_dora": variant == "dora"}
    if variant == "locon":
        meta.update(rank_pattern={k: CONV_RANK for k in LOCON}, alpha_pattern={k: CONV_ALPHA for k in LOCON})
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "diffusers", unet_lora_layers=convert_state_dict_to_diffusers(states["unet"]),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(states["text_encoder"]),
        unet_lora_adapter_metadata={**meta, "target_modules": UNET_TARGETS + LOCON},
        text_encoder_lora_adapter_metadata={"r": RANK, "lora_alpha": ALPHA, "use_dora": variant == "dora",
                                            "target_modules": TE_TARGETS},
    )
    for name, module in parts.items():  # PEFT's own folder layout: adapter_config.json + adapter_model.safetensors
        folder = tmp_path / "peft" / name
        module.peft_config["default"].save_pretrained(str(folder))
        save_file({f"base_model.model.{k}": v.contiguous() for k, v in states[name].items()},
                  str(folder / "adapter_model.safetensors"))

    for source in (tmp_path / "diffusers", tmp_path / "diffusers" / "pytorch_lora_weights.safetensors",
                   tmp_path / "peft"):
        fresh = load_pipe(models, "sd1")
        back = load_network_weights(source, add_adapters(fresh, variant, randomize=False), family="sd1")
        for name in states:
            assert back[name].keys() == states[name].keys(), source
            for key in states[name]:
                torch.testing.assert_close(back[name][key], states[name][key], rtol=0, atol=1e-6, msg=key)
    # a single PEFT adapter folder goes to the part whose modules it names
    fresh = load_pipe(models, "sd1")
    unet_only = {"unet": add_adapters(fresh, variant, randomize=False)["unet"]}
    back = load_network_weights(tmp_path / "peft" / "unet", unet_only, family="sd1")
    assert back["unet"].keys() == states["unet"].keys()


def sd_scripts_sd15_file(pipe, path, rank=RANK, alpha=1.0, seed=3):
    """A LoRA in sd-scripts' own SD1.5 naming, keys written out here (not by our exporter)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in pipe.unet.named_modules():
        if name.endswith(("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                          "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")):
            key = "lora_unet_" + name.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=gen) * 0.3
            tensors[f"{key}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=gen) * 0.3
            tensors[f"{key}.alpha"] = torch.tensor(alpha)
    for name, module in pipe.text_encoder.named_modules():
        if name.endswith(("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")):
            key = "lora_te_text_model_" + name.removeprefix("text_model.").replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=gen) * 0.3
            tensors[f"{key}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=gen) * 0.3
            tensors[f"{key}.alpha"] = torch.tensor(alpha)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in tensors
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in tensors
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                                            "ss_network_alpha": str(alpha)})
    return path


def test_sd_scripts_sd15_file_imports_with_the_same_outputs(models, tmp_path):
    """sd-scripts' naming, alpha 1 at rank 4, continued by a run with alpha 2: lora_B is rescaled, so the modules give
    what diffusers gives for the file."""
    reference = load_pipe(models, "sd1")
    path = sd_scripts_sd15_file(reference, tmp_path / "sd_scripts.safetensors")
    reference.load_lora_weights(str(path))

    fresh = load_pipe(models, "sd1")
    targets = add_adapters(fresh, "alpha", randomize=False)  # rank 4, alpha 2
    states = load_network_weights(path, targets, family="sd1")
    for name, module in targets.items():
        set_peft_model_state_dict(module, states[name])
    file = load_file(str(path))
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight"
    torch.testing.assert_close(states["unet"]["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight"],
                               file[key] * (1.0 / RANK) / (ALPHA / RANK))
    assert max_diff(outputs(fresh), outputs(reference)) <= TOLERANCE


def test_network_weights_mismatches_are_one_line_config_errors(models, tmp_path):
    pipe = load_pipe(models, "sd1")
    path = sd_scripts_sd15_file(pipe, tmp_path / "lora.safetensors")

    def attempt(**kwargs):
        fresh = load_pipe(models, "sd1")
        with pytest.raises(ConfigError) as info:
            load_network_weights(kwargs.pop("path", path), add_adapters(fresh, kwargs.pop("variant", "alpha"),
                                                                        randomize=False, **kwargs), family="sd1")
        message = str(info.value)
        assert "\n" not in message and message.startswith("network_weights:")
        return message

    message = attempt(rank=8)
    assert "rank 4" in message and "lora_rank 8" in message
    assert "has no weights for" in attempt(unet_targets=UNET_TARGETS + ["proj_in"])
    message = attempt(unet_targets=["to_q"])
    assert "does not train" in message and "target_modules needs to_k, to_v, to_out.0" in message
    assert "use_dora: false" in attempt(variant="dora")
    (tmp_path / "broken.safetensors").write_bytes(b"\x00not a safetensors file")
    assert "cannot read" in attempt(path=tmp_path / "broken.safetensors")
    assert "not found" in attempt(path=tmp_path / "missing.safetensors")
    save_file({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(1.0)},
              str(tmp_path / "sdxl.safetensors"))
    assert "SDXL LoRA" in attempt(path=tmp_path / "sdxl.safetensors")
    save_file({"model.weight": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    assert "not a LoRA" in attempt(path=tmp_path / "other.safetensors")


# ---------------------------------------------------------------------------------------------------------------
# Config keys


def test_config_keys_for_network_variants(make_cfg):
    from lora_scripts.lora import (LOCON_TARGET_MODULES, effective_alpha, effective_conv_alpha, make_lora_config,
                                   make_unet_lora_config)

    cfg = make_cfg(conv_rank=2, use_dora=True, use_rslora=True, lora_rank=4, lora_alpha=2)
    config = make_unet_lora_config(cfg, UNET_TARGETS)
    assert config.use_dora and set(LOCON_TARGET_MODULES) <= set(config.target_modules)
    assert config.rank_pattern == {k: 2 for k in LOCON_TARGET_MODULES}
    assert config.alpha_pattern == {k: 2.0 for k in LOCON_TARGET_MODULES}  # conv_alpha defaults to conv_rank
    assert effective_alpha(cfg) == 2 * math.sqrt(4) and effective_conv_alpha(cfg) == 2 * math.sqrt(2)
    assert make_lora_config(make_cfg(), UNET_TARGETS).use_dora is False
    assert make_unet_lora_config(make_cfg(), UNET_TARGETS).rank_pattern == {}
    assert effective_conv_alpha(make_cfg()) is None
    with pytest.raises(ConfigError, match="conv_alpha is set but conv_rank is not"):
        make_cfg(conv_alpha=1)
    with pytest.raises(ConfigError, match="conv_rank"):
        make_cfg(conv_rank=0)

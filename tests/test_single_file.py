"""Single-file (A1111) checkpoints as base_model, and the LDM naming they use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lora_scripts.models.ldm import ldm_to_unet_module, unet_module_to_ldm, unet_state_dict_to_ldm

SD15_UNET = {
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 2,
}
SDXL_UNET = {
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 2,
    "addition_embed_type": "text_time",
}


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory) -> Path:
    """The tiny SDXL with a wider second text encoder, like real SDXL (768 and 1280): the path diffusers' pipeline
    loader takes for real files (equal widths: see test_sdxl_with_equal_text_widths_loads)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from lora_scripts.testing import make_tiny_sdxl_model

    folder = make_tiny_sdxl_model(tmp_path_factory.mktemp("models") / "tiny-sdxl")
    torch.manual_seed(1)
    config = CLIPTextConfig.from_pretrained(folder / "text_encoder_2")
    config.hidden_size = config.projection_dim = 48
    CLIPTextModelWithProjection(config).save_pretrained(folder / "text_encoder_2")
    unet = UNet2DConditionModel.load_config(folder / "unet")
    unet.update(cross_attention_dim=32 + 48, projection_class_embeddings_input_dim=6 * 8 + 48)
    UNet2DConditionModel.from_config(unet).save_pretrained(folder / "unet")
    return folder


@pytest.fixture(scope="module")
def tiny_sd2(tmp_path_factory) -> Path:
    """The tiny SD 1.x made SD-2-shaped: an OpenCLIP-style text encoder (gelu) and linear attention projections."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lora_scripts.testing import make_tiny_sd_model

    folder = make_tiny_sd_model(tmp_path_factory.mktemp("models") / "tiny-sd2")
    torch.manual_seed(2)
    config = CLIPTextConfig.from_pretrained(folder / "text_encoder")
    config.hidden_act = "gelu"
    CLIPTextModel(config).save_pretrained(folder / "text_encoder")
    unet = UNet2DConditionModel.load_config(folder / "unet")
    unet.update(use_linear_projection=True, attention_head_dim=[2, 4])
    UNet2DConditionModel.from_config(unet).save_pretrained(folder / "unet")
    return folder


@pytest.fixture(scope="module")
def checkpoints(tiny_sd, tiny_sd2, tiny_sdxl, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Single files written from the tiny models: name -> (file, the diffusers folder it came from)."""
    from lora_scripts.testing import write_single_file_checkpoint

    out = tmp_path_factory.mktemp("single")
    files = {"sd1.safetensors": tiny_sd, "sd1.ckpt": tiny_sd, "sd2.safetensors": tiny_sd2,
             "sdxl.safetensors": tiny_sdxl}
    return {name: (write_single_file_checkpoint(folder, out / name), folder) for name, folder in files.items()}


@pytest.mark.parametrize("config, diffusers_name, ldm_name", [
    (SD15_UNET, "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "input_blocks.4.1.transformer_blocks.0.attn1.to_q"),
    (SD15_UNET, "down_blocks.0.resnets.0.conv1", "input_blocks.1.0.in_layers.2"),
    (SD15_UNET, "down_blocks.0.resnets.1.conv_shortcut.weight", "input_blocks.2.0.skip_connection.weight"),
    (SD15_UNET, "down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
    (SD15_UNET, "mid_block.resnets.1.time_emb_proj", "middle_block.2.emb_layers.1"),
    (SD15_UNET, "mid_block.attentions.0.proj_in", "middle_block.1.proj_in"),
    (SD15_UNET, "up_blocks.0.upsamplers.0.conv", "output_blocks.2.1.conv"),
    (SD15_UNET, "up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
    (SD15_UNET, "up_blocks.3.attentions.2.proj_out", "output_blocks.11.1.proj_out"),
    (SD15_UNET, "up_blocks.3.resnets.2.norm2", "output_blocks.11.0.out_layers.0"),
    (SD15_UNET, "conv_in", "input_blocks.0.0"),
    (SD15_UNET, "conv_out.bias", "out.2.bias"),
    (SD15_UNET, "time_embedding.linear_1", "time_embed.0"),
    (SDXL_UNET, "up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
    (SDXL_UNET, "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k", "input_blocks.8.1.transformer_blocks.9.attn2.to_k"),
    (SDXL_UNET, "add_embedding.linear_1", "label_emb.0.0"),
    (SDXL_UNET, "add_embedding.linear_2.weight", "label_emb.0.2.weight"),
])
def test_unet_names_map_to_ldm_and_back(config, diffusers_name, ldm_name):
    assert unet_module_to_ldm(diffusers_name, config) == ldm_name
    assert ldm_to_unet_module(ldm_name, config) == diffusers_name
    assert ldm_to_unet_module("model.diffusion_model." + ldm_name, config) == diffusers_name


def test_unet_names_without_ldm_counterpart_are_refused():
    with pytest.raises(ValueError, match="no LDM counterpart"):
        unet_module_to_ldm("down_blocks.0", SD15_UNET)
    with pytest.raises(ValueError, match="no LDM counterpart"):
        unet_module_to_ldm("down_blocks.3.downsamplers.0.conv", SD15_UNET)  # the last block has no downsampler


def _diffusers_roundtrip(unet) -> None:
    """Our diffusers -> LDM naming, then diffusers' own LDM -> diffusers converter: the same state dict back."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    state = unet.state_dict()
    ldm = unet_state_dict_to_ldm(state, unet.config)
    assert all(key.startswith("model.diffusion_model.") for key in ldm)
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert set(back) == set(state)
    assert all(back[key] is state[key] for key in state)
    for key in state:
        assert ldm_to_unet_module(unet_module_to_ldm(key, unet.config), unet.config) == key


def test_unet_mapping_matches_diffusers_converter_on_tiny_sd1(tiny_sd):
    from diffusers import UNet2DConditionModel

    _diffusers_roundtrip(UNet2DConditionModel.from_pretrained(tiny_sd / "unet"))


def test_unet_mapping_matches_diffusers_converter_on_tiny_sdxl(tiny_sdxl):
    from diffusers import UNet2DConditionModel

    _diffusers_roundtrip(UNet2DConditionModel.from_pretrained(tiny_sdxl / "unet"))


@pytest.mark.parametrize("config", [SD15_UNET, SDXL_UNET, {**SD15_UNET, "layers_per_block": 3},
                                    {**SDXL_UNET, "layers_per_block": 1}])
def test_unet_mapping_matches_diffusers_converter_on_full_size_layouts(config):
    """Full-size block layouts, built on the meta device (no memory, no weights)."""
    from diffusers import UNet2DConditionModel

    extra = {"transformer_layers_per_block": [1, 2, 10], "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
             "projection_class_embeddings_input_dim": 2816, "block_out_channels": [320, 640, 1280],
             "cross_attention_dim": 2048, "use_linear_projection": True} if "addition_embed_type" in config else {}
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config, **extra)
    _diffusers_roundtrip(unet)


# ---------------------------------------------------------------------------------------------------------------
# Loading single files


COMPONENT_CLASSES = {"unet": "diffusers.UNet2DConditionModel", "vae": "diffusers.AutoencoderKL",
                     "text_encoder": "transformers.CLIPTextModel",
                     "text_encoder_2": "transformers.CLIPTextModelWithProjection"}


def _load_reference(folder: Path, name: str) -> torch.nn.Module:
    import importlib

    module, cls = COMPONENT_CLASSES[name].split(".")
    return getattr(importlib.import_module(module), cls).from_pretrained(folder / name)


@pytest.mark.parametrize("name, family", [("sd1.safetensors", "sd1"), ("sd1.ckpt", "sd1"),
                                          ("sd2.safetensors", "sd2"), ("sdxl.safetensors", "sdxl")])
def test_family_is_detected_from_the_weights(checkpoints, name, family):
    from lora_scripts.models.single_file import check_single_file, detect_family

    path, folder = checkpoints[name]
    assert detect_family(path) == family
    assert check_single_file(path, folder) == family


@pytest.mark.parametrize("name", ["sd1.safetensors", "sd1.ckpt", "sd2.safetensors", "sdxl.safetensors"])
def test_single_file_loads_to_the_original_weights(checkpoints, name):
    from lora_scripts.models.single_file import load_single_file, load_single_file_tokenizers

    path, folder = checkpoints[name]
    components = load_single_file(path, folder)
    family = components["family"]
    parts = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
    assert set(components) == set(parts) | {"tokenizer", "scheduler", "family"} | (
        {"tokenizer_2"} if family == "sdxl" else set())
    for part in parts:
        expected, got = _load_reference(folder, part).state_dict(), components[part].state_dict()
        assert set(got) == set(expected), part
        assert all(torch.equal(got[key], expected[key]) for key in expected), part
    assert components["tokenizer"]("a red circle").input_ids == \
        __import__("transformers").CLIPTokenizer.from_pretrained(folder / "tokenizer")("a red circle").input_ids
    assert components["scheduler"].config.prediction_type == "epsilon"
    tokenizers = load_single_file_tokenizers(path, folder)
    assert set(tokenizers) == {key for key in components if key.startswith("tokenizer")}
    assert tokenizers["tokenizer"].get_vocab() == components["tokenizer"].get_vocab()


TINY_SD1_YAML = """
model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.012
    timesteps: 1000
    scale_factor: 0.18215
    {parameterization}
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 16
        in_channels: 4
        out_channels: 4
        model_channels: 32
        attention_resolutions: [1]
        num_res_blocks: 1
        channel_mult: [1, 2]
        num_heads: 8
        transformer_depth: 1
        context_dim: 32
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        ddconfig: {{z_channels: 4, resolution: 32, in_channels: 3, out_ch: 3, ch: 32, ch_mult: [1, 2],
                   num_res_blocks: 1, attn_resolutions: [], dropout: 0.0}}
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
"""


@pytest.mark.parametrize("parameterization, prediction", [("", "epsilon"), ('parameterization: "v"', "v_prediction")])
def test_original_yaml_config_builds_unet_and_vae(checkpoints, tmp_path, monkeypatch, parameterization, prediction):
    """With an original .yaml, diffusers builds the UNet and VAE from it; text encoder, tokenizer and scheduler
    come from the shipped configs (here pointed at the tiny model, whose CLIP is not the real one)."""
    from lora_scripts.models import single_file

    path, folder = checkpoints["sd1.safetensors"]
    yaml_path = tmp_path / "tiny-v1-inference.yaml"
    yaml_path.write_text(TINY_SD1_YAML.format(parameterization=parameterization))
    monkeypatch.setitem(single_file.SHIPPED_CONFIGS, "sd1", folder)
    components = single_file.load_single_file(path, yaml_path)
    for part in ("unet", "vae", "text_encoder"):
        expected, got = _load_reference(folder, part).state_dict(), components[part].state_dict()
        assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected), part
    assert components["scheduler"].config.prediction_type == prediction


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_sd1_files_with_pre_text_model_clip_names_load(checkpoints, tmp_path, suffix):
    """Old SD 1.x files name CLIP 'cond_stage_model.transformer.encoder...' (no 'text_model.'); A1111 loads them."""
    from safetensors.torch import load_file, save_file

    from lora_scripts.models.single_file import load_single_file

    path, folder = checkpoints["sd1.safetensors"]
    old = {key.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): value
           for key, value in load_file(path).items()}
    old_path = tmp_path / f"old{suffix}"
    save_file(old, str(old_path)) if suffix == ".safetensors" else torch.save({"state_dict": old}, old_path)
    components = load_single_file(old_path, folder)
    for part in ("unet", "text_encoder"):
        expected, got = _load_reference(folder, part).state_dict(), components[part].state_dict()
        assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected), part


def test_without_base_model_config_the_shipped_configs_are_used(checkpoints, tmp_path, monkeypatch):
    """The default path: configs and the shared CLIP tokenizer from the package's config folder (here a copy of the
    tiny model's configs with the shipped tokenizer settings, since the shipped UNet is full-size)."""
    import shutil

    from lora_scripts.models import single_file

    path, folder = checkpoints["sdxl.safetensors"]
    shipped = tmp_path / "shipped-sdxl"
    shutil.copytree(folder, shipped, ignore=shutil.ignore_patterns("*.safetensors", "vocab.json", "merges.txt"))
    for part in ("tokenizer", "tokenizer_2"):
        shutil.copy(single_file.SHIPPED_CONFIGS["sdxl"] / part / "tokenizer_config.json", shipped / part)
    monkeypatch.setitem(single_file.SHIPPED_CONFIGS, "sdxl", shipped)
    components = single_file.load_single_file(path)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        expected, got = _load_reference(folder, part).state_dict(), components[part].state_dict()
        assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected), part
    assert components["tokenizer"]("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert components["tokenizer"].pad_token_id == 49407 and components["tokenizer_2"].pad_token_id == 0


@pytest.mark.parametrize("name", ["sd1.safetensors", "sdxl.safetensors"])
def test_configs_without_weights_build_the_same_modules(checkpoints, name):
    """load_single_file_configs (for memory estimates) describes exactly the modules load_single_file returns."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from lora_scripts.models.single_file import load_single_file, load_single_file_configs

    path, folder = checkpoints[name]
    configs, loaded = load_single_file_configs(path, folder), load_single_file(path, folder)
    assert configs["family"] == loaded["family"]
    with torch.device("meta"):
        built = {"unet": UNet2DConditionModel.from_config(configs["unet"]),
                 "vae": AutoencoderKL.from_config(configs["vae"])}
    for part in ("unet", "vae"):
        assert {k: v.shape for k, v in built[part].state_dict().items()} == \
            {k: v.shape for k, v in loaded[part].state_dict().items()}, part
    for part in ("text_encoder", "text_encoder_2"):
        if part in loaded:
            assert configs[part].hidden_size == loaded[part].config.hidden_size
    assert configs["scheduler"]["_class_name"] == type(loaded["scheduler"]).__name__


def test_configs_from_an_original_yaml(checkpoints, tmp_path, monkeypatch):
    from diffusers import UNet2DConditionModel

    from lora_scripts.models import single_file

    path, folder = checkpoints["sd1.safetensors"]
    monkeypatch.setitem(single_file.SHIPPED_CONFIGS, "sd1", folder)  # text encoder configs: see the YAML load test
    yaml_path = tmp_path / "tiny.yaml"
    yaml_path.write_text(TINY_SD1_YAML.format(parameterization='parameterization: "v"'))
    configs = single_file.load_single_file_configs(path, yaml_path)
    expected = UNet2DConditionModel.load_config(folder / "unet")

    def plain(value):
        return list(value) if isinstance(value, (list, tuple)) else value

    for key in ("down_block_types", "up_block_types", "block_out_channels", "layers_per_block", "cross_attention_dim"):
        assert plain(configs["unet"][key]) == plain(expected[key]), key
    assert configs["scheduler"]["prediction_type"] == "v_prediction"


@pytest.mark.parametrize("scaling, prediction", [("VScaling", "v_prediction"), ("EpsScaling", "epsilon")])
def test_sgm_yaml_prediction_type(tmp_path, scaling, prediction):
    """SDXL (SGM) YAMLs say v-prediction through the denoiser's scaling, not `parameterization`."""
    from lora_scripts.models.single_file import _yaml_scheduler

    path = tmp_path / "sd_xl.yaml"
    path.write_text("model:\n  params:\n    denoiser_config:\n      params:\n        scaling_config:\n"
                    f"          target: sgm.modules.diffusionmodules.denoiser_scaling.{scaling}\n")
    assert _yaml_scheduler("sdxl", path).config.prediction_type == prediction


def test_shipped_tokenizers_are_the_real_clip_tokenizer():
    from lora_scripts.models.single_file import SHIPPED_CONFIGS, _tokenizers

    for family, part, pad in [("sd1", "tokenizer", 49407), ("sd2", "tokenizer", 0), ("sdxl", "tokenizer", 49407),
                              ("sdxl", "tokenizer_2", 0)]:
        tokenizer = _tokenizers(SHIPPED_CONFIGS[family], family)[part]
        assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
        assert len(tokenizer) == 49408 and tokenizer.model_max_length == 77 and tokenizer.pad_token_id == pad


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_shipped_configs_accept_full_size_checkpoints(family, monkeypatch, tmp_path):
    """Real-size checkpoint layouts (names and shapes, no weights) are recognised, checked against the shipped
    configs, and refused with another family's config."""
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES

    from lora_scripts.errors import ConfigError
    from lora_scripts.models import single_file
    from lora_scripts.testing import ldm_checkpoint_shapes

    shapes = ldm_checkpoint_shapes(single_file.SHIPPED_CONFIGS[family], family)
    marker = {"sd1": "v1", "sd2": "v2", "sdxl": "xl_base"}[family]  # the names diffusers itself detects them by
    assert CHECKPOINT_KEY_NAMES[marker] in shapes
    monkeypatch.setattr(single_file, "read_weight_shapes", lambda path: shapes)
    assert single_file.check_single_file(tmp_path / "model.safetensors") == family
    configs = single_file.load_single_file_configs(tmp_path / "model.safetensors")
    assert configs["unet"]["cross_attention_dim"] == {"sd1": 768, "sd2": 1024, "sdxl": 2048}[family]
    other = {"sd1": "sdxl", "sd2": "sd1", "sdxl": "sd1"}[family]
    with pytest.raises(ConfigError, match="base_model_config: .* (is a|does not describe)") as err:
        single_file.check_single_file(tmp_path / "model.safetensors", single_file.SHIPPED_CONFIGS[other])
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------------------------
# Errors: one line each, naming the file and the fix


def _error(path, config=None, load=False) -> str:
    from lora_scripts.errors import ConfigError
    from lora_scripts.models.single_file import check_single_file, load_single_file

    with pytest.raises(ConfigError) as err:
        (load_single_file if load else check_single_file)(path, config)
    message = str(err.value)
    assert "\n" not in message and len(message) < 400, message
    return message


def test_missing_and_unreadable_files_are_refused(tmp_path):
    from safetensors.torch import save_file

    assert "not found" in _error(tmp_path / "nope.safetensors")
    assert "is a folder, not a single-file checkpoint" in _error(tmp_path)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    assert "not a readable safetensors file" in _error(tmp_path / "junk.safetensors")
    (tmp_path / "junk.ckpt").write_bytes(b"not a pickle")
    assert "weights-only torch checkpoint" in _error(tmp_path / "junk.ckpt")
    torch.save({"state_dict": {"a": torch.zeros(1)}, "callback": ValueError("pickled object")}, tmp_path / "obj.ckpt")
    assert "re-export it as .safetensors" in _error(tmp_path / "obj.ckpt")
    (tmp_path / "model.onnx").write_bytes(b"x")
    assert "neither .safetensors nor .ckpt" in _error(tmp_path / "model.onnx")
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)},
              str(tmp_path / "lora.safetensors"))
    assert "is a LoRA, not a base model" in _error(tmp_path / "lora.safetensors")
    save_file({"encoder.conv_in.weight": torch.zeros(1)}, str(tmp_path / "vae.safetensors"))
    assert "no UNet weights" in _error(tmp_path / "vae.safetensors")
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, str(tmp_path / "unet.safetensors"))
    assert "no text encoder this loader knows" in _error(tmp_path / "unet.safetensors")


@pytest.mark.parametrize("name", ["sd1.safetensors", "sd1.ckpt"])
def test_truncated_files_are_refused(checkpoints, tmp_path, name):
    path, folder = checkpoints[name]
    cut = tmp_path / name
    cut.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    assert "re-download" in _error(cut, folder)
    assert "re-download" in _error(cut, folder, load=True)


def test_bad_configs_are_refused(checkpoints, tmp_path):
    import shutil

    sd1, tiny_sd = checkpoints["sd1.safetensors"]
    sdxl, tiny_sdxl = checkpoints["sdxl.safetensors"]
    # a tiny (non-standard) checkpoint without base_model_config: the shipped SD 1.5 config does not fit
    message = _error(sd1)
    assert "is not a standard SD 1.x model" in message and "set base_model_config" in message
    assert "is not a standard SD 1.x model" in _error(sd1, load=True)
    # SDXL weights with an SD 1.x config, and the other way round
    assert "is a StableDiffusionPipeline config but" in _error(sdxl, tiny_sd)
    assert "is a StableDiffusionXLPipeline config but" in _error(sd1, tiny_sdxl)
    # a config folder without a component config
    partial = tmp_path / "partial"
    shutil.copytree(tiny_sd, partial, ignore=shutil.ignore_patterns("*.safetensors"))
    (partial / "vae" / "config.json").unlink()
    assert "lacks vae/config.json" in _error(sd1, partial)
    # a config whose UNet has other sizes than the weights
    sd2_folder = checkpoints["sd2.safetensors"][1]
    other = tmp_path / "other"
    shutil.copytree(tiny_sd, other)
    unet = json.loads((other / "unet" / "config.json").read_text())
    (other / "unet" / "config.json").write_text(json.dumps({**unet, "layers_per_block": 2, "cross_attention_dim": 48}))
    message = _error(sd1, other)
    assert "cross_attention_dim 48 vs 32" in message and "layers_per_block" in message
    assert _error(checkpoints["sd2.safetensors"][0], tiny_sdxl)
    assert "not found" in _error(sd1, tmp_path / "missing-config")
    (tmp_path / "notes.txt").write_text("x")
    assert "neither a folder nor a .yaml" in _error(sd1, tmp_path / "notes.txt")
    (tmp_path / "bad.yaml").write_text("just: text\n")
    assert "not an original LDM/SGM config" in _error(sd1, tmp_path / "bad.yaml")
    (tmp_path / "wrong.yaml").write_text(TINY_SD1_YAML.format(parameterization="").replace("context_dim: 32",
                                                                                          "context_dim: 768"))
    assert "context_dim 768 vs 32" in _error(sd1, tmp_path / "wrong.yaml")
    assert "it describes an SD 1.x/2.x UNet, the weights are SDXL" in _error(sdxl, tmp_path / "wrong.yaml")
    assert sd2_folder.exists()


def test_sdxl_with_equal_text_widths_loads(tmp_path):
    """diffusers' pipeline loader tells SDXL's encoders apart by width (768/1280); with equal widths (the stock tiny
    SDXL) each encoder is built from its own tensors instead."""
    from lora_scripts.models.single_file import load_single_file
    from lora_scripts.testing import make_tiny_sdxl_model, write_single_file_checkpoint

    folder = make_tiny_sdxl_model(tmp_path / "sdxl-equal")
    path = write_single_file_checkpoint(folder, tmp_path / "equal.safetensors")
    components = load_single_file(path, folder)
    for part in ("text_encoder", "text_encoder_2", "unet"):
        expected, got = _load_reference(folder, part).state_dict(), components[part].state_dict()
        assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected), part


# ---------------------------------------------------------------------------------------------------------------
# Offline


def test_loading_makes_no_network_connection(checkpoints, monkeypatch):
    """No hub access, even with HF_HUB_OFFLINE unset: every config is local and local_files_only is passed."""
    import socket

    import huggingface_hub.constants

    from lora_scripts.models.single_file import load_single_file

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for name in ("sd1.ckpt", "sdxl.safetensors"):
        path, folder = checkpoints[name]
        assert load_single_file(path, folder)["unet"] is not None

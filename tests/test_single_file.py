"""Single-file (A1111) checkpoints as base_model, and the LDM naming they use."""

from __future__ import annotations

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
    from lora_scripts.testing import make_tiny_sdxl_model

    return make_tiny_sdxl_model(tmp_path_factory.mktemp("models") / "tiny-sdxl")


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

"""Names of UNet modules in the original LDM/SGM layout (``model.diffusion_model.*`` of an A1111 checkpoint), and back.

diffusers converts LDM -> diffusers (``diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint``) but has no
public diffusers -> LDM mapping, so this one is hand-written; the tests check it against diffusers' converter on tiny
SD1 and SDXL UNets. kohya LoRA names of SDXL (``lora_unet_input_blocks_4_1_...``) and exported A1111 checkpoints both
need it.

Layout, for ``n`` blocks with ``L[i]`` resnets each (``layers_per_block``, an int or one per block):

- ``input_blocks.0.0`` is ``conv_in``; down block ``i`` layer ``j`` is ``input_blocks.{1 + sum(L[:i]) + i + j}``
  with ``.0`` the resnet and ``.1`` the attention; its downsampler is the next index, ``.0.op``.
- ``middle_block.0/1/2`` are ``mid_block.resnets.0``, ``mid_block.attentions.0``, ``mid_block.resnets.1``.
- up block ``i`` has ``L'[i] + 1`` layers (``L'`` = reversed ``L``): ``output_blocks.{sum(L'[:i] + 1) + j}``, ``.0``
  resnet, ``.1`` attention, and on its last layer the upsampler ``.1.conv`` (``.2.conv`` after an attention).
- resnets rename ``norm1/conv1/norm2/conv2/time_emb_proj/conv_shortcut`` to ``in_layers.0/in_layers.2/out_layers.0/
  out_layers.3/emb_layers.1/skip_connection``; attentions keep diffusers' inner names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

LDM_UNET_PREFIX = "model.diffusion_model."

_TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_TOP_LEVEL_INVERSE = {ldm: name for name, ldm in _TOP_LEVEL.items() if not name.startswith("class_embedding")}

_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_RESNET_INVERSE = {ldm: name for name, ldm in _RESNET.items()}


def _layers_per_block(unet_config: Mapping[str, Any]) -> list[int]:
    blocks = len(unet_config["down_block_types"])
    layers = unet_config.get("layers_per_block", 2)
    return [int(layers)] * blocks if isinstance(layers, int) else [int(x) for x in layers]


def _has_attention(block_type: str) -> bool:
    return "Attn" in block_type  # CrossAttnDownBlock2D, CrossAttnUpBlock2D (SD); not DownBlock2D / UpBlock2D


def _layout(unet_config: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """Block-level prefixes: diffusers -> LDM and LDM -> diffusers, for this config."""
    down_types = list(unet_config["down_block_types"])
    up_types = list(unet_config["up_block_types"])
    layers = _layers_per_block(unet_config)
    up_layers = list(reversed(layers))
    to_ldm: dict[str, str] = {}

    index = 1
    for i, block_type in enumerate(down_types):
        for j in range(layers[i]):
            to_ldm[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{index}.0"
            if _has_attention(block_type):
                to_ldm[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{index}.1"
            index += 1
        if i < len(down_types) - 1:
            to_ldm[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
            index += 1

    to_ldm["mid_block.resnets.0"] = "middle_block.0"
    to_ldm["mid_block.attentions.0"] = "middle_block.1"
    to_ldm["mid_block.resnets.1"] = "middle_block.2"

    index = 0
    for i, block_type in enumerate(up_types):
        attention = _has_attention(block_type)
        for j in range(up_layers[i] + 1):
            to_ldm[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{index}.0"
            if attention:
                to_ldm[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{index}.1"
            if j == up_layers[i] and i < len(up_types) - 1:
                to_ldm[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{index}.{2 if attention else 1}.conv"
            index += 1
    return to_ldm, {ldm: name for name, ldm in to_ldm.items()}


def _config_key(unet_config: Mapping[str, Any]) -> tuple:
    layers = unet_config.get("layers_per_block", 2)
    return (tuple(unet_config["down_block_types"]), tuple(unet_config["up_block_types"]),
            layers if isinstance(layers, int) else tuple(layers))


_LAYOUT_CACHE: dict[tuple, tuple[dict[str, str], dict[str, str]]] = {}


def unet_block_layout(unet_config: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """Block-level names for this UNet config: diffusers -> LDM (``down_blocks.1.attentions.0`` ->
    ``input_blocks.4.1``) and the inverse; cached per layout."""
    key = _config_key(unet_config)
    if key not in _LAYOUT_CACHE:
        _LAYOUT_CACHE[key] = _layout(unet_config)
    return _LAYOUT_CACHE[key]


def _split_prefix(path: str, table: Mapping[str, str]) -> tuple[str, str] | None:
    """The longest dotted prefix of ``path`` found in ``table``, and the rest (without its leading dot)."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        head = ".".join(parts[:cut])
        if head in table:
            return head, ".".join(parts[cut:])
    return None


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def unet_module_to_ldm(module_path: str, unet_config: Mapping[str, Any]) -> str:
    """The LDM/SGM name (under ``model.diffusion_model.``, prefix not included) of a diffusers
    ``UNet2DConditionModel`` module or parameter path, e.g. ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``
    -> ``input_blocks.4.1.transformer_blocks.0.attn1.to_q`` for SD 1.x.

    ``unet_config`` is the UNet's config (``unet.config`` or its config.json as a dict): the block types and
    ``layers_per_block`` decide the numbering. Raises ``ValueError`` for a path that has no LDM counterpart (a
    whole block such as ``down_blocks.0``, or a name the UNet does not have).
    """
    found = _split_prefix(module_path, _TOP_LEVEL)
    if found:
        head, rest = found
        return _join(_TOP_LEVEL[head], rest)
    to_ldm, _ = unet_block_layout(unet_config)
    found = _split_prefix(module_path, to_ldm)
    if found is None:
        raise ValueError(f"'{module_path}' has no LDM counterpart in a UNet with this config")
    head, rest = found
    if ".resnets." in head and rest:
        first, _, tail = rest.partition(".")
        rest = _join(_RESNET.get(first, first), tail)
    return _join(to_ldm[head], rest)


def ldm_to_unet_module(ldm_path: str, unet_config: Mapping[str, Any]) -> str:
    """The inverse of :func:`unet_module_to_ldm`: a diffusers UNet module or parameter path from an LDM/SGM one
    (with or without the ``model.diffusion_model.`` prefix)."""
    ldm_path = ldm_path.removeprefix(LDM_UNET_PREFIX)
    found = _split_prefix(ldm_path, _TOP_LEVEL_INVERSE)
    if found:
        head, rest = found
        name = _TOP_LEVEL_INVERSE[head]
        if name.startswith("add_embedding") and unet_config.get("addition_embed_type") != "text_time":
            name = name.replace("add_embedding", "class_embedding")
        return _join(name, rest)
    _, to_diffusers = unet_block_layout(unet_config)
    found = _split_prefix(ldm_path, to_diffusers)
    if found is None:
        raise ValueError(f"'{ldm_path}' has no diffusers counterpart in a UNet with this config")
    head, rest = found
    name = to_diffusers[head]
    if ".resnets." in name and rest:
        parts = rest.split(".")
        two = ".".join(parts[:2])
        if two in _RESNET_INVERSE:
            rest = _join(_RESNET_INVERSE[two], ".".join(parts[2:]))
        elif parts[0] in _RESNET_INVERSE:
            rest = _join(_RESNET_INVERSE[parts[0]], ".".join(parts[1:]))
    return _join(name, rest)


def unet_state_dict_to_ldm(state_dict: Mapping[str, Any], unet_config: Mapping[str, Any],
                           prefix: str = LDM_UNET_PREFIX) -> dict[str, Any]:
    """A diffusers UNet state dict renamed to the LDM layout (keys under ``prefix``); tensors are not copied."""
    return {prefix + unet_module_to_ldm(key, unet_config): value for key, value in state_dict.items()}


# ---------------------------------------------------------------------------------------------------------------
# VAE and text encoders: diffusers -> LDM state dicts (again the reverse of diffusers' single_file_utils converters)

LDM_VAE_PREFIX = "first_stage_model."
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_state_dict_to_ldm(state_dict: Mapping[str, Any], vae_config: Mapping[str, Any],
                          prefix: str = LDM_VAE_PREFIX) -> dict[str, Any]:
    """A diffusers ``AutoencoderKL`` state dict in the LDM layout (``first_stage_model.encoder.down.0.block.0...``).

    LDM's mid-block attention uses 1x1 convolutions, so its q/k/v/proj_out weights get two trailing unit dims.
    """
    up_blocks = len(vae_config["up_block_types"])
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[1:2] == ["conv_norm_out"]:
            parts[1] = "norm_out"
        elif len(parts) > 3 and parts[1] in ("down_blocks", "up_blocks"):
            side, block = parts[1], int(parts[2])
            level = block if side == "down_blocks" else up_blocks - 1 - block  # LDM numbers decoder levels bottom-up
            head = ["down" if side == "down_blocks" else "up", str(level)]
            if parts[3] == "resnets":
                rest = parts[5:]
                if rest[:1] == ["conv_shortcut"]:
                    rest = ["nin_shortcut", *rest[1:]]
                parts = [parts[0], *head, "block", parts[4], *rest]
            else:  # downsamplers.0.conv / upsamplers.0.conv
                parts = [parts[0], *head, "downsample" if side == "down_blocks" else "upsample", *parts[5:]]
        elif len(parts) > 3 and parts[1] == "mid_block":
            if parts[2] == "resnets":
                parts = [parts[0], "mid", f"block_{int(parts[3]) + 1}", *parts[4:]]
            else:
                inner = ".".join(parts[4:-1])
                parts = [parts[0], "mid", "attn_1", _VAE_ATTENTION.get(inner, inner), parts[-1]]
                if value.ndim == 2:
                    value = value[:, :, None, None]
        out[prefix + ".".join(parts)] = value
    return out


def clip_state_dict_to_ldm(state_dict: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """An OpenAI-layout CLIP text encoder (SD 1.x ``cond_stage_model.transformer.``, SDXL
    ``conditioner.embedders.0.transformer.``): transformers' names under ``prefix``, always with ``text_model.``
    (transformers >= 5.6 dropped that level from ``CLIPTextModel``)."""
    return {prefix + (key if key.startswith("text_model.") else "text_model." + key): value
            for key, value in state_dict.items() if not key.endswith("position_ids")}


_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_OPEN_CLIP_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
                  "embeddings.position_embedding.weight": "positional_embedding",
                  "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}


def open_clip_state_dict_to_ldm(state_dict: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """An OpenCLIP-layout text encoder (SD 2.x ``cond_stage_model.model.``, SDXL ``conditioner.embedders.1.model.``):
    q/k/v fused into ``attn.in_proj_weight``/``in_proj_bias``, and ``text_projection`` stored as a matrix applied on
    the right (the transpose of transformers' linear weight)."""
    import torch

    out: dict[str, Any] = {}
    fused: dict[str, dict[str, Any]] = {}
    for key, value in state_dict.items():
        key = key.removeprefix("text_model.")
        if key.endswith("position_ids"):
            continue
        if key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
        elif key in _OPEN_CLIP_TOP:
            out[prefix + _OPEN_CLIP_TOP[key]] = value
        elif key.startswith("encoder.layers."):
            _, _, layer, rest = key.split(".", 3)
            module, _, kind = rest.rpartition(".")
            base = f"{prefix}transformer.resblocks.{layer}."
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                fused.setdefault(f"{base}attn.in_proj_{kind}", {})[module[-6]] = value
            else:
                out[base + _OPEN_CLIP_LAYER.get(module, module) + "." + kind] = value
        else:
            raise ValueError(f"text encoder key '{key}' has no OpenCLIP counterpart")
    for key, qkv in fused.items():
        out[key] = torch.cat([qkv["q"], qkv["k"], qkv["v"]], dim=0)
    return out

"""A1111-style single-file checkpoints (``.safetensors`` / ``.ckpt``: SD 1.x, SD 2.x, SDXL) as ``base_model``.

- :func:`detect_family` (from ``checkpoint_file``) tells SD 1.x / 2.x / SDXL from the weights' names (a safetensors
  header, or a ``.ckpt`` opened with ``weights_only=True`` and memory-mapped), without reading tensors.
- :func:`check_single_file` is the cheap check for ``lora-scripts check``: the file, its family and that the config
  (``base_model_config``) describes the same architecture.
- :func:`load_single_file` loads the pipeline components through diffusers' own single-file loader
  (``StableDiffusionPipeline.from_single_file`` / ``StableDiffusionXLPipeline.from_single_file``);
  :func:`load_single_file_tokenizers` gives just the tokenizers (to count caption tokens without loading weights).

Configs never come from the hub: ``base_model_config`` is a local diffusers config folder (``model_index.json`` and
component configs, as ``save_pretrained`` writes) or an original LDM/SGM YAML; without it, the configs shipped in
``configs/sd15``, ``configs/sd2`` (2.x at 768 px, v-prediction) and ``configs/sdxl`` are used. The shipped tokenizers
share one CLIP BPE vocabulary (``configs/clip_bpe``) and differ only in ``tokenizer_config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .checkpoint_file import (LDM_CLIP, UNET, Family, detect_family, family_from_shapes, first_line,  # noqa: F401
                              modern_clip_name, read_tensors, read_weight_shapes)

CONFIGS = Path(__file__).resolve().parent / "configs"
SHIPPED_CONFIGS: dict[str, Path] = {"sd1": CONFIGS / "sd15", "sd2": CONFIGS / "sd2", "sdxl": CONFIGS / "sdxl"}
CLIP_BPE = CONFIGS / "clip_bpe"
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
PIPELINE_CLASSES = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}
COMPONENTS = {"sd1": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
              "sd2": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
              "sdxl": ("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")}
TEXT_WIDTH_KEYS = {
    "sd1": {"text_encoder": "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"},
    "sd2": {"text_encoder": "cond_stage_model.model.positional_embedding"},
    "sdxl": {"text_encoder": "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
             "text_encoder_2": "conditioner.embedders.1.model.positional_embedding"},
}


# ---------------------------------------------------------------------------------------------------------------
# Configs


def _is_yaml(config: Path) -> bool:
    return config.suffix.lower() in (".yaml", ".yml")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"base_model_config: cannot read '{path}' ({first_line(exc)}); fix or replace it") from None


def _first_shape(shapes: dict[str, tuple[int, ...]], suffix: str) -> tuple[int, ...] | None:
    return next((shape for key, shape in shapes.items() if key.startswith(UNET) and key.endswith(suffix)), None)


def _check_folder(folder: Path, family: Family, shapes: dict[str, tuple[int, ...]], path: Path,
                  shipped: bool = False) -> None:
    """A diffusers config folder: complete for the family, and its UNet describes these weights."""
    from .ldm import unet_block_layout

    name = FAMILY_NAMES[family]
    fix = (f"point base_model_config at a {name} config folder, or leave it out to use the shipped {name} "
           "configs")
    if not (folder / "model_index.json").is_file():
        raise ConfigError(f"base_model_config: '{folder}' has no model_index.json; pass a diffusers config folder "
                          "(as save_pretrained writes it) or an original .yaml")
    index = _read_json(folder / "model_index.json")
    if index.get("_class_name") != PIPELINE_CLASSES[family]:
        raise ConfigError(f"base_model_config: '{folder}' is a {index.get('_class_name')} config but '{path}' holds "
                          f"{name} weights; {fix}")
    required = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json",
                "text_encoder_2": "config.json", "scheduler": "scheduler_config.json",
                "tokenizer": "tokenizer_config.json", "tokenizer_2": "tokenizer_config.json"}
    missing = [f"{part}/{file}" for part, file in required.items()
               if part in COMPONENTS[family] and not (folder / part / file).is_file()
               and not (part.startswith("tokenizer") and (folder / part / "vocab.json").is_file())]
    if missing:
        raise ConfigError(f"base_model_config: '{folder}' lacks {', '.join(missing)}; copy the config folder "
                          "complete (model_index.json and each component's config)")
    unet = _read_json(folder / "unet" / "config.json")
    context = _first_shape(shapes, "attn2.to_k.weight")
    conv_in = shapes.get(UNET + "input_blocks.0.0.weight")
    has_label = UNET + "label_emb.0.0.weight" in shapes
    problems = []
    if context is not None and unet.get("cross_attention_dim") != context[-1]:
        problems.append(f"cross_attention_dim {unet.get('cross_attention_dim')} vs {context[-1]} in the weights")
    if conv_in is not None and unet.get("in_channels") != conv_in[1]:
        problems.append(f"in_channels {unet.get('in_channels')} vs {conv_in[1]} in the weights")
    if has_label != (unet.get("addition_embed_type") == "text_time"):
        problems.append("addition_embed_type " + str(unet.get("addition_embed_type")))
    try:
        _, ldm_blocks = unet_block_layout(unet)
        expected = {".".join(key.split(".")[:3]) for key in ldm_blocks if key.startswith(("input_", "output_"))}
        found = {".".join(key[len(UNET):].split(".")[:3]) for key in shapes
                 if key.startswith((UNET + "input_blocks.", UNET + "output_blocks."))}
        if found - {"input_blocks.0.0"} != expected:
            problems.append("the number of blocks or layers_per_block")
    except (KeyError, TypeError, ValueError):
        problems.append("unet/config.json lacks down_block_types/up_block_types")
    problems += _text_width_problems(folder, family, shapes)
    if problems:
        if shipped:
            raise ConfigError(f"base_model: '{path}' is not a standard {name} model ({'; '.join(problems)}); set "
                              "base_model_config to its diffusers config folder or the .yaml that came with it")
        raise ConfigError(f"base_model_config: '{folder}' does not describe the UNet in '{path}' "
                          f"({'; '.join(problems)}); {fix}")


def _text_width_problems(folder: Path, family: Family, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    problems = []
    for part, key in TEXT_WIDTH_KEYS[family].items():
        width = shapes.get(key)
        hidden = _read_json(folder / part / "config.json").get("hidden_size")
        if width is not None and hidden != width[-1]:
            problems.append(f"{part} hidden_size {hidden} vs {width[-1]} in the weights")
    return problems


def _read_yaml(config: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(config.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"base_model_config: cannot read '{config}' ({first_line(exc)}); fix or replace it") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ConfigError(f"base_model_config: '{config}' is not an original LDM/SGM config (no 'model:' section); "
                          "pass the .yaml that came with the checkpoint or a diffusers config folder")
    return data


def _yaml_unet_params(data: dict[str, Any]) -> dict[str, Any]:
    params = data["model"].get("params") or {}
    unet = params.get("unet_config") or params.get("network_config") or {}
    return unet.get("params") or {}


def _check_yaml(config: Path, family: Family, shapes: dict[str, tuple[int, ...]], path: Path) -> None:
    params = _yaml_unet_params(_read_yaml(config))
    context = _first_shape(shapes, "attn2.to_k.weight")
    conv_in = shapes.get(UNET + "input_blocks.0.0.weight")
    problems = []
    if context is not None and params.get("context_dim") not in (None, context[-1]):
        problems.append(f"context_dim {params.get('context_dim')} vs {context[-1]} in the weights")
    if conv_in is not None and params.get("in_channels") not in (None, conv_in[1]):
        problems.append(f"in_channels {params.get('in_channels')} vs {conv_in[1]} in the weights")
    if (family == "sdxl") != ("adm_in_channels" in params):
        problems.append("it describes an " + ("SD 1.x/2.x UNet, the weights are SDXL" if family == "sdxl"
                                              else "SDXL UNet, the weights are not"))
    if problems:
        raise ConfigError(f"base_model_config: '{config}' does not describe the UNet in '{path}' "
                          f"({'; '.join(problems)}); pass the {FAMILY_NAMES[family]} .yaml that came with the "
                          "checkpoint, or leave base_model_config out")
    # a YAML describes UNet and VAE only; the text encoders come from the shipped configs
    problems = _text_width_problems(SHIPPED_CONFIGS[family], family, shapes)
    if problems:
        raise ConfigError(f"base_model: '{path}' has non-standard {FAMILY_NAMES[family]} text encoders "
                          f"({'; '.join(problems)}), which an original .yaml does not describe; set "
                          "base_model_config to a diffusers config folder instead")


def check_single_file(path: Path | str, config: Path | str | None = None) -> Family:
    """Cheap check (tensor names and shapes only) that ``path`` is a loadable SD 1.x/2.x/SDXL checkpoint and that
    ``config`` (``base_model_config``: a diffusers config folder, an original .yaml, or None for the shipped configs)
    describes it. Returns the family; raises ConfigError naming the file and the fix."""
    return _check(Path(path).expanduser(), config)[0]


def _check(path: Path, config: Path | str | None) -> tuple[Family, dict[str, tuple[int, ...]]]:
    shapes = {modern_clip_name(key): shape for key, shape in read_weight_shapes(path).items()}
    family = family_from_shapes(shapes, path)
    if config is None:
        _check_folder(SHIPPED_CONFIGS[family], family, shapes, path, shipped=True)
        return family, shapes
    config = Path(config).expanduser()
    if not config.exists():
        raise ConfigError(f"base_model_config: '{config}' not found; pass a diffusers config folder or an original "
                          ".yaml, or leave it out to use the shipped configs")
    if config.is_dir():
        _check_folder(config, family, shapes, path)
    elif _is_yaml(config):
        _check_yaml(config, family, shapes, path)
    else:
        raise ConfigError(f"base_model_config: '{config}' is neither a folder nor a .yaml file; pass a diffusers "
                          "config folder or an original LDM/SGM .yaml")
    return family, shapes


def _text_encoder_from(path: Path, folder: Path, name: str, prefix: str, torch_dtype: Any) -> Any:
    """One text encoder built by diffusers' own CLIP converter from only the tensors under ``prefix`` (renamed to
    the current CLIP names). Used where diffusers' pipeline loader picks the wrong tensors: SD 1.x files with old
    CLIP names (no ``text_model.``), and SDXL files whose two encoders have the same width, which it tells apart by
    width only (768 and 1280 in real SDXL; equal in toy models)."""
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tensors = {modern_clip_name(key): value for key, value in read_tensors(path, prefix).items()
               if not key.endswith("position_ids")}
    cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
    return create_diffusers_clip_model_from_ldm(cls, checkpoint=tensors, config=str(folder), subfolder=name,
                                                torch_dtype=torch_dtype, local_files_only=True)


# ---------------------------------------------------------------------------------------------------------------
# Loading


def _tokenizers(folder: Path, family: Family) -> dict[str, Any]:
    """The family's CLIP tokenizer(s) from a config folder: its own vocabulary files, or (the shipped configs keep
    one copy of it) the shared CLIP BPE vocabulary with the settings in ``tokenizer_config.json``."""
    from transformers import CLIPTokenizer

    tokenizers = {}
    for name in (part for part in COMPONENTS[family] if part.startswith("tokenizer")):
        if any((folder / name / file).is_file() for file in ("vocab.json", "tokenizer.json")):
            tokenizers[name] = CLIPTokenizer.from_pretrained(folder / name)
        else:
            settings = _read_json(folder / name / "tokenizer_config.json")
            settings = {k: v for k, v in settings.items() if k in (
                "model_max_length", "bos_token", "eos_token", "unk_token", "pad_token", "do_lower_case")}
            tokenizers[name] = CLIPTokenizer.from_pretrained(CLIP_BPE, **settings)
    return tokenizers


def _yaml_scheduler(family: Family, yaml_config: Path) -> Any:
    """The shipped scheduler with the YAML's prediction type (v_prediction or epsilon)."""
    import diffusers

    folder = SHIPPED_CONFIGS[family] / "scheduler"
    config = _read_json(folder / "scheduler_config.json")
    params = _read_yaml(yaml_config)["model"].get("params") or {}
    # LDM (SD 1.x/2.x) says `parameterization: "v"`; SGM (SDXL) names a VScaling in its denoiser config
    scaling = (((params.get("denoiser_config") or {}).get("params") or {}).get("scaling_config") or {}).get("target", "")
    v_prediction = params.get("parameterization") == "v" or str(scaling).endswith("VScaling")
    prediction = "v_prediction" if v_prediction else "epsilon"
    return getattr(diffusers, config["_class_name"]).from_config(config, prediction_type=prediction)


def _config_folder(family: Family, config: Path | None) -> Path:
    """Where component configs and tokenizers come from: the given folder, else (no config, or a .yaml for UNet and
    VAE only) the shipped configs of the family."""
    return config if config is not None and config.is_dir() else SHIPPED_CONFIGS[family]


def load_single_file_tokenizers(path: Path | str, config: Path | str | None = None) -> dict[str, Any]:
    """The tokenizer(s) a single-file checkpoint is loaded with (``tokenizer``, and ``tokenizer_2`` for SDXL), without
    loading weights: for counting caption tokens in ``lora-scripts check``. Raises ConfigError like
    :func:`check_single_file`."""
    family = check_single_file(path, config)
    return _tokenizers(_config_folder(family, Path(config).expanduser() if config is not None else None), family)


def load_single_file_configs(path: Path | str, config: Path | str | None = None) -> dict[str, Any]:
    """The component configs of a single-file checkpoint, without loading weights (for memory estimates): ``family``,
    ``unet`` and ``vae`` (config dicts for ``from_config``), ``text_encoder`` (and ``text_encoder_2`` for SDXL) as
    ``CLIPTextConfig``, and ``scheduler`` (a config dict). With an original .yaml, the UNet and VAE configs are
    derived from it by diffusers' own converters, as :func:`load_single_file` does."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (create_unet_diffusers_config_from_ldm,
                                                     create_vae_diffusers_config_from_ldm)
    from transformers import CLIPTextConfig

    path = Path(path).expanduser()
    family, shapes = _check(path, config)
    config = Path(config).expanduser() if config is not None else None
    folder = _config_folder(family, config)
    out: dict[str, Any] = {"family": family}
    if config is not None and _is_yaml(config):
        original = _read_yaml(config)
        with torch.device("meta"):  # diffusers reads shapes from the checkpoint; meta tensors carry them for free
            checkpoint = {key: torch.empty(shape) for key, shape in shapes.items()}
        out["unet"] = create_unet_diffusers_config_from_ldm(original, checkpoint)
        out["vae"] = create_vae_diffusers_config_from_ldm(original, checkpoint)
        out["scheduler"] = dict(_yaml_scheduler(family, config).config)
    else:
        out["unet"] = dict(UNet2DConditionModel.load_config(folder / "unet"))
        out["vae"] = dict(AutoencoderKL.load_config(folder / "vae"))
        out["scheduler"] = _read_json(folder / "scheduler" / "scheduler_config.json")
    for name in ("text_encoder", "text_encoder_2"):
        if name in COMPONENTS[family]:
            out[name] = CLIPTextConfig.from_pretrained(folder / name)
    return out


def load_single_file(path: Path | str, config: Path | str | None = None, *, torch_dtype: Any = None) -> dict[str, Any]:
    """Load a single-file SD 1.x / 2.x / SDXL checkpoint into diffusers/transformers components, offline.

    ``config`` is ``base_model_config``: a local diffusers config folder, an original LDM/SGM .yaml (UNet and VAE
    from it; text encoders, tokenizers and scheduler from the shipped configs, the scheduler's prediction type from
    the YAML's ``parameterization``), or None for the shipped configs of the detected family.

    Returns ``{"unet", "vae", "text_encoder", "tokenizer", "scheduler", "family"}``, plus ``"text_encoder_2"`` and
    ``"tokenizer_2"`` for SDXL. Raises ConfigError when the file or config is wrong.
    """
    import diffusers
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    path = Path(path).expanduser()
    family, shapes = _check(path, config)
    config = Path(config).expanduser() if config is not None else None
    folder = _config_folder(family, config)
    # local_files_only: with a local config folder nothing is fetched; this makes sure of it
    kwargs: dict[str, Any] = {"config": str(folder), "local_files_only": True, "torch_dtype": torch_dtype,
                              **_tokenizers(folder, family)}
    if config is not None and _is_yaml(config):
        kwargs["original_config"] = str(config)  # UNet and VAE from the YAML, the rest from `folder`
        kwargs["scheduler"] = _yaml_scheduler(family, config)
    pipeline_class = getattr(diffusers, PIPELINE_CLASSES[family])
    try:
        if family == "sd1" and not any(key.startswith(LDM_CLIP + "text_model.") for key in read_weight_shapes(path)):
            kwargs["text_encoder"] = _text_encoder_from(path, folder, "text_encoder", LDM_CLIP, torch_dtype)
        widths = [shapes.get(key, (None,))[-1] for key in TEXT_WIDTH_KEYS[family].values()]
        if family == "sdxl" and widths[0] == widths[1]:
            for index, name in enumerate(("text_encoder", "text_encoder_2")):
                kwargs[name] = _text_encoder_from(path, folder, name, f"conditioner.embedders.{index}.", torch_dtype)
        pipe = pipeline_class.from_single_file(str(path), **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError, SingleFileComponentError) as exc:
        where = f"with base_model_config '{config}'" if config is not None else "with the shipped configs"
        raise ConfigError(f"base_model: '{path}' could not be loaded as {FAMILY_NAMES[family]} {where} "
                          f"({first_line(exc)}); pass a base_model_config that matches the checkpoint") from None
    components = {name: getattr(pipe, name) for name in COMPONENTS[family]}
    components["family"] = family
    return components

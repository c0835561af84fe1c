"""``lora-scripts import-kohya``: a lora-scripts YAML config from sd-scripts' own TOML files.

Reads a dataset config (``[general]``, ``[[datasets]]``, ``[[datasets.subsets]]``, as sd-scripts'
docs/config_README describes it) and/or a training config (``--config_file``: flat keys, or keys in sections that
sd-scripts flattens). Every key is either mapped or listed, one line each, with why it is not: nothing is dropped
silently.
"""

from __future__ import annotations

import ast
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


@dataclass
class KohyaImport:
    """The config built so far, and what could not be mapped."""

    config: dict[str, Any] = field(default_factory=dict)
    mapped: list[str] = field(default_factory=list)  # "file: key -> our.key"
    unmapped: list[str] = field(default_factory=list)  # "file: key = value: why"

    def map(self, source: str, key: str, ours: str, value: Any) -> None:
        self.config[ours] = value
        self.mapped.append(f"{source}: {key} -> {ours}")

    def skip(self, source: str, key: str, value: Any, why: str) -> None:
        shown = "(hidden)" if any(w in key.lower() for w in ("token", "api_key", "password")) else _show(value)
        self.unmapped.append(f"{source}: {key} = {shown}: {why}")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """A TOML file as a dict; errors name the file and line."""
    if not path.is_file():
        raise ConfigError(f"{what}: file not found: {path}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: TOML syntax error: {exc}; fix the file there") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; save it as UTF-8") from None


# --- value converters ------------------------------------------------------------------------------------------

def _resolution(value: Any) -> int:
    """sd-scripts' resolution (an int, ``[w, h]`` or ``"w,h"``) as our square side: the side of the same area,
    rounded to a multiple of 8 (bucketing keeps the area)."""
    if isinstance(value, str):
        value = [int(v) for v in value.split(",")]
    if isinstance(value, (list, tuple)):
        w, h = (int(value[0]), int(value[-1]))
        return max(8, round(math.sqrt(w * h) / 8) * 8)
    return int(value)


OPTIMIZERS = {"adamw": "adamw", "adamw8bit": "adamw8bit", "pagedadamw8bit": "paged_adamw8bit",
              "adafactor": "adafactor", "prodigy": "prodigy", "came": "came",
              "adamwschedulefree": "schedule_free_adamw", "schedulefree.adamwschedulefree": "schedule_free_adamw"}
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
LORA_MODULES = ("networks.lora", "networks.lora_flux", "networks.lora_sd3", "networks.lora_sdxl")

# training-config keys with the same meaning here: kohya key -> our key
TRAIN_DIRECT = {
    "pretrained_model_name_or_path": "base_model", "network_dim": "lora_rank", "network_alpha": "lora_alpha",
    "network_dropout": "lora_dropout", "network_weights": "network_weights", "learning_rate": "learning_rate",
    "text_encoder_lr": "text_encoder_lr", "max_train_epochs": "epochs", "max_train_steps": "max_train_steps",
    "train_batch_size": "batch_size", "output_dir": "output_dir", "output_name": "output_name",
    "gradient_accumulation_steps": "gradient_accumulation_steps", "save_every_n_steps": "save_steps",
    "seed": "seed", "noise_offset": "noise_offset", "min_snr_gamma": "min_snr_gamma",
    "prior_loss_weight": "prior_loss_weight", "max_data_loader_n_workers": "dataloader_workers",
    "train_data_dir": "train_data_dir", "reg_data_dir": "reg_data_dir", "shuffle_caption": "shuffle_tags",
    "keep_tokens": "keep_tokens", "caption_dropout_rate": "caption_dropout", "flip_aug": "random_flip",
    "random_crop": "random_crop", "enable_bucket": "bucket", "bucket_reso_steps": "bucket_step",
    "bucket_no_upscale": "bucket_no_upscale", "cache_latents": "cache_latents",
    "cache_latents_to_disk": "cache_latents", "cache_text_encoder_outputs": "cache_text_embeddings",
    "cache_text_encoder_outputs_to_disk": "cache_text_embeddings", "alpha_mask": "alpha_mask",
    "discrete_flow_shift": "timestep_shift", "guidance_scale": "guidance_scale", "ae": "vae_path",
    "clip_l": "text_encoder_path", "t5xxl": "text_encoder_2_path", "logit_mean": "logit_mean",
    "logit_std": "logit_std", "mode_scale": "mode_scale", "sample_every_n_steps": "sample_every_n_steps",
    "gradient_checkpointing": "gradient_checkpointing", "mixed_precision": "mixed_precision",
    "lr_warmup_steps": "lr_warmup_steps",
}
# known keys with no equivalent, and why
TRAIN_WHY = {
    "v2": "not needed: the model family is read from the weights",
    "v_parameterization": "not needed: the prediction type is read from the model's scheduler config",
    "xformers": "not needed: PyTorch's SDPA attention is used", "sdpa": "not needed: SDPA is the default",
    "mem_eff_attn": "not needed: PyTorch's SDPA attention is used",
    "save_model_as": "the LoRA is exported as kohya .safetensors (and diffusers/PEFT) always",
    "save_precision": "the LoRA is exported in fp32 (training keeps LoRA weights in fp32)",
    "logging_dir": "logs go to <output_dir>/logs", "log_with": "set logging.tensorboard / logging.wandb",
    "log_prefix": "logs go to <output_dir>/logs",
    "persistent_data_loader_workers": "no equivalent (workers live for an epoch)",
    "save_every_n_epochs": "no epoch cadence: use save_steps",
    "save_last_n_epochs": "no epoch cadence: keep_last_checkpoints counts checkpoints",
    "save_last_n_steps": "no equivalent: keep_last_checkpoints counts checkpoints",
    "save_state": "checkpoints always hold the full resumable state",
    "resume": "use resume: latest or a checkpoint folder of lora-scripts",
    "sample_prompts": "a prompt file is not read: write the prompts under sample_prompts",
    "sample_sampler": "samples use the model's own scheduler",
    "sample_every_n_epochs": "use sample_every_n_steps",
    "clip_skip": "not supported", "max_token_length": "captions are cut at the text encoder's own length",
    "full_fp16": "use mixed_precision", "full_bf16": "use mixed_precision",
    "fp8_base": "use base_quantization: fp8", "lowram": "no equivalent", "highvram": "no equivalent",
    "no_half_vae": "the VAE runs in the weight dtype", "dataset_config": "pass it as --dataset-config",
    "network_train_text_encoder_only": "not supported: the denoiser's LoRA always trains",
    "scale_weight_norms": "not supported", "dim_from_weights": "set lora_rank to the LoRA's rank",
    "lr_scheduler_num_cycles": "not supported (one cosine cycle)", "lr_scheduler_power": "not supported",
    "color_aug": "not supported", "face_crop_aug_range": "not supported",
    "caption_tag_dropout_rate": "not supported", "caption_dropout_every_n_epochs": "not supported",
    "min_bucket_reso": "bucket sides are resolution/2 .. resolution*2", "max_bucket_reso": "bucket sides are "
    "resolution/2 .. resolution*2", "huber_c": "not supported", "loss_type": "only l2 (MSE) loss",
}


def _optimizer_args(result: KohyaImport, source: str, args: list[str]) -> None:
    for item in args:
        key, _, raw = str(item).partition("=")
        key = key.strip()
        try:
            value = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):  # an unreadable value is listed, not guessed
            value = None
        if key == "weight_decay" and isinstance(value, (int, float)):
            result.map(source, f"optimizer_args {key}", "weight_decay", float(value))
        elif key == "betas" and isinstance(value, (tuple, list)) and len(value) == 2:
            result.map(source, "optimizer_args betas", "adam_beta1", float(value[0]))
            result.map(source, "optimizer_args betas", "adam_beta2", float(value[1]))
        elif key == "eps" and isinstance(value, (int, float)):
            result.map(source, "optimizer_args eps", "adam_epsilon", float(value))
        else:
            result.skip(source, f"optimizer_args {key}", raw, "no equivalent optimizer setting")


def _network_args(result: KohyaImport, source: str, args: list[str]) -> None:
    for item in args:
        key, _, raw = str(item).partition("=")
        key = key.strip()
        if key in ("conv_dim", "conv_alpha"):
            try:
                number = float(raw)
            except ValueError:
                result.skip(source, f"network_args {key}", raw, "not a number")
                continue
            ours = "conv_rank" if key == "conv_dim" else "conv_alpha"
            result.map(source, f"network_args {key}", ours, int(number) if ours == "conv_rank" else number)
        else:
            result.skip(source, f"network_args {key}", raw, "no equivalent network option (LyCORIS algorithms and "
                        "block weights are not read here)")


def _special(result: KohyaImport, source: str, key: str, value: Any, flat: dict[str, Any]) -> bool:
    """Keys that need more than a rename; True when handled."""
    if key == "resolution":
        result.map(source, key, "resolution", _resolution(value))
    elif key == "optimizer_type":
        ours = OPTIMIZERS.get(str(value).lower().replace("_", "").split(".")[-1]) or OPTIMIZERS.get(
            str(value).lower().replace("_", ""))
        if ours:
            result.map(source, key, "optimizer", ours)
        else:
            result.skip(source, key, value, f"optimizer not available; choose one of {sorted(set(OPTIMIZERS.values()))}")
    elif key == "optimizer_args":
        _optimizer_args(result, source, value if isinstance(value, list) else [value])
    elif key == "network_args":
        _network_args(result, source, value if isinstance(value, list) else [value])
    elif key == "lr_scheduler":
        if value in SCHEDULERS:
            result.map(source, key, "lr_scheduler", value)
        else:
            result.skip(source, key, value, f"schedule not available; choose one of {', '.join(SCHEDULERS)}")
    elif key == "lr_warmup_steps" and isinstance(value, float) and value < 1:
        result.skip(source, key, value, "a warm-up ratio is not supported; give lr_warmup_steps as a step count")
    elif key == "network_module":
        if value in LORA_MODULES:
            result.mapped.append(f"{source}: {key} -> (LoRA, the default)")
        else:
            result.skip(source, key, value, "only plain LoRA (networks.lora*) is imported")
    elif key == "network_train_unet_only":
        result.map(source, key, "train_text_encoder", not bool(value))
    elif key == "learning_rate" and "unet_lr" in flat:  # sd-scripts: unet_lr wins for the denoiser
        if "text_encoder_lr" not in flat and value != flat["unet_lr"]:
            result.map(source, key, "text_encoder_lr", value)
        else:
            result.mapped.append(f"{source}: {key} -> (unet_lr is the learning rate)")
    elif key == "unet_lr":
        result.map(source, key, "learning_rate", value)
    elif key == "max_grad_norm":
        result.map(source, key, "max_grad_norm", None if not value else float(value))
    elif key == "conditioning_data_dir":
        if flat.get("masked_loss"):
            result.map(source, key, "mask_dir", value)
        else:
            result.skip(source, key, value, "ControlNet conditioning images are not trained here (with masked_loss "
                        "they are masks)")
    elif key == "masked_loss":
        result.mapped.append(f"{source}: {key} -> (mask_dir from each subset's conditioning_data_dir)")
    elif key == "caption_extension":
        if str(value) in (".txt", ".caption", "txt", "caption"):
            result.mapped.append(f"{source}: {key} -> (sidecar .txt/.caption files are read by default)")
        else:
            result.skip(source, key, value, "only .txt / .caption sidecars are read from train_data_dir; use "
                        "--dataset-config subsets (caption_extension) for other extensions")
    elif key == "timestep_sampling":
        ours = {"uniform": "uniform", "sigmoid": "logit_normal"}.get(str(value))
        if ours:
            result.map(source, key, "timestep_sampling", ours)
        else:
            result.skip(source, key, value, "use timestep_sampling uniform / logit_normal / mode with timestep_shift")
    elif key == "weighting_scheme":
        if value in ("none", "sigma_sqrt", "cosmap"):
            result.map(source, key, "loss_weighting", value)
        elif value in ("logit_normal", "mode"):
            result.map(source, key, "timestep_sampling", value)
        else:
            result.skip(source, key, value, "not supported")
    else:
        return False
    return True


def import_training_config(result: KohyaImport, path: Path) -> dict[str, Any]:
    """Map a training TOML (sections flattened as sd-scripts does); returns the flat keys."""
    data = read_toml(path, "--training-config")
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):  # sd-scripts reads [section] tables as plain keys
            flat.update(value)
        else:
            flat[key] = value
    source = path.name
    for key, value in flat.items():
        if _special(result, source, key, value, flat):
            continue
        if key in TRAIN_DIRECT:
            result.map(source, key, TRAIN_DIRECT[key], value)
        else:
            result.skip(source, key, value, TRAIN_WHY.get(key, "no lora-scripts equivalent"))
    return flat


# --- dataset config --------------------------------------------------------------------------------------------

SUBSET_DIRECT = {"image_dir": "image_dir", "num_repeats": "num_repeats", "class_tokens": "class_tokens",
                 "caption_extension": "caption_extension", "is_reg": "is_regularization",
                 "keep_tokens": "keep_tokens", "shuffle_caption": "shuffle_tags",
                 "caption_dropout_rate": "caption_dropout", "caption_prefix": "caption_prefix",
                 "caption_suffix": "caption_suffix", "alpha_mask": "alpha_mask"}
DATASET_KEYS = ("resolution", "batch_size", "enable_bucket", "bucket_reso_steps", "bucket_no_upscale",
                "min_bucket_reso", "max_bucket_reso")
GLOBAL_SUBSET_KEYS = {"flip_aug": "random_flip", "random_crop": "random_crop"}  # one value for the whole run
# subset options that [general] sets for every subset: our top-level keys, which subsets inherit
GENERAL_TOP = {"shuffle_caption": "shuffle_tags", "keep_tokens": "keep_tokens", "caption_dropout_rate":
               "caption_dropout", "alpha_mask": "alpha_mask"}


def import_dataset_config(result: KohyaImport, path: Path, masked_loss: bool) -> None:
    """Map a dataset TOML: each subset becomes an entry of ``datasets``; dataset-level keys become top-level keys
    (or a subset's resolution when datasets differ)."""
    data = read_toml(path, "--dataset-config")
    source = path.name
    general = data.get("general", {})
    datasets = data.get("datasets", [])
    for key in data:
        if key not in ("general", "datasets"):
            result.skip(source, key, data[key], "not a dataset config table ([general] or [[datasets]])")
    if not isinstance(datasets, list) or not datasets:
        raise ConfigError(f"{path}: no [[datasets]] table; a kohya dataset config lists [[datasets]] with "
                          "[[datasets.subsets]] (see docs/kohya.md)")
    subsets: list[dict[str, Any]] = []
    top: dict[str, list[Any]] = {}  # dataset-level values seen per our key
    for key, value in general.items():
        if key in GENERAL_TOP:
            result.map(f"{source} [general]", key, GENERAL_TOP[key], value)
    general = {k: v for k, v in general.items() if k not in GENERAL_TOP}
    for d_index, dataset in enumerate(datasets):
        merged = {**general, **{k: v for k, v in dataset.items() if k != "subsets"}}
        for key, value in merged.items():
            where = f"{source} [[datasets]] {d_index + 1}" if key in dataset else f"{source} [general]"
            if key == "resolution":
                top.setdefault("resolution", []).append((_resolution(value), where))
            elif key == "batch_size":
                top.setdefault("batch_size", []).append((int(value), where))
            elif key == "enable_bucket":
                top.setdefault("bucket", []).append((bool(value), where))
            elif key == "bucket_reso_steps":
                top.setdefault("bucket_step", []).append((int(value), where))
            elif key == "bucket_no_upscale":
                top.setdefault("bucket_no_upscale", []).append((bool(value), where))
            elif key in DATASET_KEYS:
                result.skip(where, key, value, TRAIN_WHY.get(key, "no equivalent"))
        resolution = _resolution(merged["resolution"]) if "resolution" in merged else None
        entries = dataset.get("subsets", [])
        if not entries:
            result.skip(f"{source} [[datasets]] {d_index + 1}", "subsets", [], "a dataset without "
                        "[[datasets.subsets]] trains nothing")
        for s_index, subset in enumerate(entries):
            where = f"{source} [[datasets]] {d_index + 1} subset {s_index + 1}"
            options = {k: v for k, v in merged.items() if k not in DATASET_KEYS}
            options.update(subset)
            ours: dict[str, Any] = {}
            for key, value in options.items():
                origin = where if key in subset else f"{source} [general]" if key in general else \
                    f"{source} [[datasets]] {d_index + 1}"
                if key in SUBSET_DIRECT:
                    ours[SUBSET_DIRECT[key]] = value
                    result.mapped.append(f"{origin}: {key} -> datasets.{len(subsets)}.{SUBSET_DIRECT[key]}")
                elif key == "metadata_file":
                    ours["metadata_path"] = value
                    ours["caption_source"] = "kohya_json" if str(value).endswith(".json") else "auto"
                    result.mapped.append(f"{origin}: {key} -> datasets.{len(subsets)}.metadata_path")
                elif key == "conditioning_data_dir" and masked_loss:
                    ours["mask_dir"] = value
                    result.mapped.append(f"{origin}: {key} -> datasets.{len(subsets)}.mask_dir (masked_loss)")
                elif key == "conditioning_data_dir":
                    result.skip(origin, key, value, "ControlNet conditioning images are not trained here (with "
                                "masked_loss they are masks: set masked_loss = true in the training config)")
                elif key in GLOBAL_SUBSET_KEYS:
                    top.setdefault(GLOBAL_SUBSET_KEYS[key], []).append((bool(value), origin))
                else:
                    result.skip(origin, key, value, TRAIN_WHY.get(key, "no lora-scripts equivalent"))
            if "image_dir" not in ours:
                raise ConfigError(f"{where}: no image_dir; every subset names its image folder")
            if resolution is not None:
                ours["resolution"] = resolution
            subsets.append(ours)
    for key, seen in top.items():
        values = [v for v, _ in seen]
        # the first dataset's resolution and batch size (subsets keep their own resolution); a flag if any sets it
        chosen = values[0] if key in ("resolution", "batch_size") or len(set(values)) == 1 else any(values)
        result.config[key] = chosen
        result.mapped.append(f"{seen[0][1]}: {key} -> {key}")
        if len(set(values)) > 1 and key != "resolution":
            result.skip(source, key, sorted(set(values)), f"differs between datasets; one value for the run: "
                        f"{chosen}")
    top_resolution = result.config.get("resolution")
    for subset in subsets:  # a subset's resolution only where it differs from the run's
        if subset.get("resolution") == top_resolution:
            subset.pop("resolution", None)
    result.config["datasets"] = subsets
    result.config.pop("train_data_dir", None)


def import_kohya(dataset_config: Path | None, training_config: Path | None) -> KohyaImport:
    """Build a lora-scripts config from sd-scripts' dataset and/or training TOML."""
    if dataset_config is None and training_config is None:
        raise ConfigError("import-kohya: give --dataset-config and/or --training-config")
    result = KohyaImport()
    flat: dict[str, Any] = {}
    if training_config is not None:
        flat = import_training_config(result, training_config)
    if dataset_config is not None:
        if "train_data_dir" in result.config:
            result.skip(training_config.name, "train_data_dir", result.config["train_data_dir"],
                        "ignored: the dataset config's subsets are trained (as in sd-scripts)")
        if "reg_data_dir" in result.config:
            result.skip(training_config.name, "reg_data_dir", result.config.pop("reg_data_dir"),
                        "ignored: the dataset config's subsets are trained (as in sd-scripts)")
        import_dataset_config(result, dataset_config, bool(flat.get("masked_loss")))
    return result


def render_yaml(result: KohyaImport, sources: list[Path]) -> str:
    """The config as YAML, headed by where it came from and what was not mapped."""
    import yaml

    head = [f"# imported by `lora-scripts import-kohya` from {', '.join(str(s) for s in sources)}"]
    if result.unmapped:
        head.append("# not mapped (see docs/kohya.md):")
        head += [f"#   {line}" for line in result.unmapped]
    return "\n".join(head) + "\n" + yaml.safe_dump(result.config, sort_keys=False, allow_unicode=True)


def run_import(dataset_config: Path | None, training_config: Path | None, output: Path,
               echo: Callable[[str], None] = print) -> KohyaImport:
    """Import, write ``output``, print what was mapped and each key that was not; validate what can be."""
    from .config import build_config

    result = import_kohya(dataset_config, training_config)
    sources = [p for p in (dataset_config, training_config) if p is not None]
    output.write_text(render_yaml(result, sources), encoding="utf-8")
    echo(f"wrote {output}: {len(result.mapped)} keys mapped, {len(result.unmapped)} not mapped")
    for line in result.unmapped:
        echo(f"  not mapped: {line}")
    missing = [k for k in ("base_model", "output_dir") if k not in result.config]
    if missing:
        echo(f"  to add: {', '.join(missing)} (required; the training config holds them as "
             "pretrained_model_name_or_path and output_dir)")
    else:
        build_config(dict(result.config), str(output))  # a ConfigError names the key to fix
    return result

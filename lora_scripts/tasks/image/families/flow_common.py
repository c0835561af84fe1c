"""What the Qwen-Image and Z-Image families share: loading a diffusers folder / hub id or a transformer-only single
file with the other components from ``base_model_config`` / ``vae_path`` / ``text_encoder_path``; meta-device
components for the estimate; continuing from a LoRA through the pipeline's own ``lora_state_dict`` converter; and the
single-file export naming.

(The lead's ``families/transformer.py`` base covers the same ground for FLUX/SD3/Chroma; these two families keep
their own small copy until it lands on their branch.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Mapping

import torch

from ....errors import ConfigError
from .base import Components, Family, first_line

PREFIX_LDM = "model.diffusion_model."
CONFIGS = Path(__file__).resolve().parents[3] / "models" / "configs"


def strip_prefix(shapes: Mapping[str, Any]) -> dict[str, Any]:
    """Tensor names without ComfyUI's / the original checkpoints' ``model.diffusion_model.`` prefix."""
    return {k[len(PREFIX_LDM):] if k.startswith(PREFIX_LDM) else k: v for k, v in shapes.items()}


class FlowTransformerFamily(Family):
    """A flow-matching transformer family with one text encoder, loaded from diffusers folders or single files."""

    config_folder: ClassVar[str] = ""                    # shipped diffusers configs under models/configs/
    vae_class: ClassVar[str] = ""                        # diffusers VAE class
    text_encoder_class: ClassVar[str] = ""               # transformers class of the text encoder
    text_encoder_types: ClassVar[tuple[str, ...]] = ()   # accepted ``model_type`` of its config
    text_encoder_title: ClassVar[str] = ""

    # --- recognition ---------------------------------------------------------------------------------------------
    @classmethod
    def matches_header(cls, shapes: Mapping[str, tuple[int, ...]]) -> bool:
        return cls.matches_names(strip_prefix(shapes))

    @classmethod
    def matches_names(cls, names: Mapping[str, Any]) -> bool:
        raise NotImplementedError

    def check_single_file(self, path: Path) -> None:
        """A transformer-only file: the VAE and the text encoder come from base_model_config or their own paths."""
        if self.cfg.base_model_config is None:
            for key in ("vae_path", "text_encoder_path"):
                if getattr(self.cfg, key, None) is None:
                    raise ConfigError(f"base_model: '{path}' holds only the {self.title} transformer; set {key} (or "
                                      "base_model_config: a diffusers folder of the model)")
        elif read_config_index(Path(self.cfg.base_model_config)) is None:
            raise ConfigError(f"base_model_config: '{self.cfg.base_model_config}' is not a diffusers folder (no "
                              f"model_index.json); give the {self.title} model folder")

    def check_components(self) -> None:
        cfg = self.cfg
        for key in ("text_encoder_2_path", "text_encoder_3_path"):
            if getattr(cfg, key, None) is not None:
                raise ConfigError(f"{key}: {self.title} has one text encoder; remove {key}")
        if cfg.vae_path is not None:
            config = _component_config(Path(cfg.vae_path), "vae_path", "a diffusers VAE folder")
            if config.get("_class_name") != self.vae_class:
                raise ConfigError(f"vae_path: '{cfg.vae_path}' is a {config.get('_class_name')} VAE; {self.title} "
                                  f"needs {self.vae_class}")
        if cfg.text_encoder_path is not None:
            config = _component_config(Path(cfg.text_encoder_path), "text_encoder_path",
                                       f"a transformers {self.text_encoder_title} folder")
            if config.get("model_type") not in self.text_encoder_types:
                raise ConfigError(f"text_encoder_path: '{cfg.text_encoder_path}' is a {config.get('model_type')} "
                                  f"model; {self.title} needs {self.text_encoder_title} (model_type "
                                  f"{self.text_encoder_types[0]})")

    # --- loading -------------------------------------------------------------------------------------------------
    def _sources(self, base_model: str) -> dict[str, tuple[str, str | None]]:
        """(path, subfolder) of every component: the base model's, or the separately given ones."""
        from . import is_single_file

        cfg = self.cfg
        root = str(cfg.base_model_config or CONFIGS / self.config_folder) if is_single_file(base_model) else base_model
        te = (str(cfg.text_encoder_path), None) if cfg.text_encoder_path else (root, "text_encoder")
        tok = (str(cfg.text_encoder_path), None) if cfg.text_encoder_path else (root, "tokenizer")
        return {"transformer": (root, "transformer"), "vae": (str(cfg.vae_path), None) if cfg.vae_path else (root, "vae"),
                "text_encoder": te, "tokenizer": tok, "scheduler": (root, "scheduler")}

    def _classes(self) -> tuple[Any, Any, Any]:
        import diffusers
        import transformers

        return (getattr(diffusers, self.denoiser_class), getattr(diffusers, self.vae_class),
                getattr(transformers, self.text_encoder_class))

    def load(self, base_model: str) -> Components:
        from diffusers import FlowMatchEulerDiscreteScheduler
        from transformers import AutoTokenizer

        from . import is_single_file

        denoiser_cls, vae_cls, te_cls = self._classes()
        src = self._sources(base_model)
        try:
            if is_single_file(base_model):
                denoiser = self.load_single_file(base_model, src["transformer"][0])
            else:
                denoiser = denoiser_cls.from_pretrained(base_model, subfolder="transformer")
            vae = vae_cls.from_pretrained(src["vae"][0], subfolder=src["vae"][1])
            text_encoder = te_cls.from_pretrained(src["text_encoder"][0], subfolder=src["text_encoder"][1])
            tokenizer = AutoTokenizer.from_pretrained(src["tokenizer"][0], subfolder=src["tokenizer"][1])
            scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(src["scheduler"][0], subfolder="scheduler")
        except (OSError, ValueError) as exc:
            raise ConfigError(f"base_model: could not load '{base_model}': {first_line(exc)}") from None
        return Components(denoiser=denoiser.float(), vae=vae.float(), text_encoders=[text_encoder.float()],
                          tokenizers=[tokenizer], scheduler=scheduler)

    def load_single_file(self, path: str, config_root: str) -> torch.nn.Module:
        """The transformer from a single file (prefix ``model.diffusion_model.`` or none) through diffusers'
        ``from_single_file`` with the config of ``config_root``."""
        from safetensors.torch import load_file

        denoiser_cls = self._classes()[0]
        state = strip_prefix(load_file(path))
        return denoiser_cls.from_single_file(state, config=config_root, subfolder="transformer",
                                             local_files_only=True, torch_dtype=torch.float32)

    def meta_components(self, base_model: str) -> Components:
        from diffusers import FlowMatchEulerDiscreteScheduler
        from transformers import AutoConfig

        denoiser_cls, vae_cls, te_cls = self._classes()
        src = self._sources(base_model)
        try:
            denoiser_config = denoiser_cls.load_config(src["transformer"][0], subfolder="transformer")
            vae_config = vae_cls.load_config(src["vae"][0], subfolder=src["vae"][1])
            te_config = AutoConfig.from_pretrained(src["text_encoder"][0], subfolder=src["text_encoder"][1] or "")
            scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(src["scheduler"][0], subfolder="scheduler")
        except (OSError, ValueError) as exc:
            raise ConfigError(f"base_model: could not read the configs of '{base_model}': {first_line(exc)}") from None
        with torch.device("meta"):
            denoiser = denoiser_cls.from_config(denoiser_config)
            vae = vae_cls.from_config(vae_config)
            text_encoder = te_cls(te_config)
        return Components(denoiser, vae, [text_encoder], [], scheduler, extra={"text_configs": [te_config]})

    # --- continuing from a LoRA ----------------------------------------------------------------------------------
    def apply_network_weights(self, path: Path, modules: Mapping[str, torch.nn.Module]) -> None:
        """Any LoRA the pipeline's ``lora_state_dict`` reads (our two exports, kohya/ComfyUI/ai-toolkit files),
        rescaled to this run's adapter scale and set into the transformer's adapter."""
        import diffusers
        from peft import set_peft_model_state_dict

        path = Path(path).expanduser()
        file = path / "pytorch_lora_weights.safetensors" if path.is_dir() else path
        try:
            state, metadata = getattr(diffusers, self.pipeline_class).lora_state_dict(
                str(file), return_lora_metadata=True)
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"network_weights: cannot read '{path}' as a {self.title} LoRA: {first_line(exc)}") from None
        module = modules[self.denoiser_name]
        peft_config = module.peft_config["default"]
        run_scale = peft_config.lora_alpha / peft_config.r
        # diffusers' converters fold kohya alphas into the weights (scale 1); its own format keeps lora_alpha
        prefix = f"{self.denoiser_name}."
        metadata = {k.removeprefix(prefix): v for k, v in (metadata or {}).items()}  # "transformer.lora_alpha"
        file_scale = 1.0
        if metadata.get("lora_alpha") and metadata.get("r"):
            file_scale = float(metadata["lora_alpha"]) / float(metadata["r"])
        ours = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not ours:
            raise ConfigError(f"network_weights: '{path}' holds no {self.title} transformer LoRA tensors")
        expected = {k.replace(".default", "") for k in _peft_keys(module)}
        missing = sorted(expected - set(ours))
        if missing:
            raise ConfigError(f"network_weights: '{path}' lacks {len(missing)} of the run's LoRA tensors, e.g. "
                              f"{missing[0]}; train with the same target_modules")
        for key, tensor in ours.items():
            if key.endswith("lora_A.weight") and tensor.shape[0] != peft_config.r:
                raise ConfigError(f"network_weights: '{path}' has rank {tensor.shape[0]}, this run lora_rank "
                                  f"{peft_config.r}; set lora_rank: {tensor.shape[0]}")
        scaled = {k: (v * (file_scale / run_scale) if k.endswith("lora_B.weight") else v).float()
                  for k, v in ours.items() if k in expected}
        set_peft_model_state_dict(module, scaled, adapter_name="default")

    # --- export --------------------------------------------------------------------------------------------------
    def kohya_tensors(self, parts: Mapping[str, Mapping[str, torch.Tensor]], *, alpha: float,
                      conv_alpha: float | None, denoiser_config: Any) -> dict[str, torch.Tensor]:
        """The transformer's LoRA as ``<name>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` with the
        family's ComfyUI names (:meth:`single_file_name`)."""
        from ....export.kohya import kohya_dora_scale, split_peft_key

        out: dict[str, torch.Tensor] = {}
        for key, tensor in parts[self.denoiser_name].items():
            module, kind = split_peft_key(key)
            name = self.single_file_name(module)
            tensor = tensor.detach().cpu().contiguous()
            out[f"{name}.{kind}"] = kohya_dora_scale(tensor) if kind == "dora_scale" else tensor
            out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
        return out

    def single_file_name(self, module: str) -> str:
        """The single-file key of a transformer module (diffusers path)."""
        raise NotImplementedError


def _peft_keys(module: torch.nn.Module) -> list[str]:
    from peft.utils import get_peft_model_state_dict

    return list(get_peft_model_state_dict(module).keys())


def read_config_index(folder: Path) -> dict[str, Any] | None:
    path = folder / "model_index.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _component_config(path: Path, key: str, expected: str) -> dict[str, Any]:
    """The ``config.json`` of a separately given component folder; one-line ConfigError otherwise."""
    if not path.exists():
        raise ConfigError(f"{key}: '{path}' not found; expected {expected}")
    config = path / "config.json"
    if not config.is_file():
        raise ConfigError(f"{key}: '{path}' has no config.json; expected {expected}")
    try:
        return json.loads(config.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ConfigError(f"{key}: cannot read '{config}' ({exc})") from None

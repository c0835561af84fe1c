"""Stable Diffusion 3 / 3.5 (Medium, Large, Large Turbo): an MMDiT transformer over 16-channel VAE latents in 2x2
patches, conditioned on CLIP-L + CLIP-G penultimate hidden states (side by side, zero-padded to T5's width) joined
along the sequence with T5-XXL's, plus both CLIPs' pooled embeddings; rectified-flow training with the scheduler's
fixed shift (3.0).

Base models: diffusers folders and hub ids (``StableDiffusion3Pipeline``), and transformer-only single files as
Stability AI ships them (``sd3.5_large.safetensors``: ``model.diffusion_model.joint_blocks.N…``) with the VAE, the
text encoders and the tokenizers from ``base_model_config`` (a diffusers SD3 folder) or the component path keys.
The transformer's config comes from ``base_model_config`` or the configs shipped in ``models/configs/sd3*``.

Export: diffusers' format, and a single file that ComfyUI's SD3 key map reads: ComfyUI maps the diffusers module
names with a ``transformer.`` prefix onto its fused ``qkv`` weights itself ("regular diffusers sd3 lora format" in
``comfy/lora.py`` ``model_lora_keys_unet``, through ``comfy/utils.py`` ``mmdit_to_diffusers``), so no fusing is
needed and diffusers' own ``load_lora_weights`` reads the same file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Mapping

import torch

from ....errors import ConfigError
from ..objectives import FlowMatchingObjective
from .base import Components, Family, first_line

CONFIG_ROOT = Path(__file__).resolve().parents[3] / "models" / "configs"
CLIP_BPE = CONFIG_ROOT / "clip_bpe"
ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")  # CLIP-L, CLIP-G, T5-XXL
PATH_KEYS = {"vae": "vae_path", "text_encoder": "text_encoder_path", "text_encoder_2": "text_encoder_2_path",
             "text_encoder_3": "text_encoder_3_path"}
WHAT = {"vae": "the SD3 VAE (16 latent channels)", "text_encoder": "CLIP-L (CLIPTextModelWithProjection)",
        "text_encoder_2": "OpenCLIP-G (CLIPTextModelWithProjection)", "text_encoder_3": "T5-XXL (T5EncoderModel)"}
DEFAULT_T5_TOKENS = 256  # StableDiffusion3Pipeline's max_sequence_length
SINGLE_FILE_MARK = "joint_blocks.0.x_block.attn.qkv.weight"


def _strip(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The transformer's tensors of a single file without the ``model.diffusion_model.`` prefix."""
    prefix = "model.diffusion_model."
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in shapes.items()}


def variant_of(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """``sd3.5-large``, ``sd3.5-medium`` or ``sd3-medium`` from a single file's tensor names: SD3.5 added QK norms,
    SD3.5 Medium also the second (``attn2``) attention of MMDiT-X; Large has 38 blocks."""
    shapes = _strip(shapes)
    blocks = {int(k.split(".")[1]) for k in shapes if k.startswith("joint_blocks.")}
    if not any(".ln_q." in k for k in shapes):
        return "sd3-medium"
    if any(".attn2." in k for k in shapes) or len(blocks) < 38:
        return "sd3.5-medium"
    return "sd3.5-large"


class SD3(Family):
    name = "sd3"
    title = "SD3"
    pipeline_class = "StableDiffusion3Pipeline"
    denoiser_class = "SD3Transformer2DModel"
    native_resolution = 1024
    num_text_encoders = 3
    # as diffusers' train_dreambooth_lora_sd3.py: both streams' attention projections
    default_targets: ClassVar[list[str]] = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                                            "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
                                            "attn.to_add_out"]
    text_encoder_lora = (0, 1)  # CLIP-L and CLIP-G; T5-XXL stays frozen
    text_encoder_parts = ENCODERS
    lora_loader_parts = ("transformer", "text_encoder", "text_encoder_2")
    base_model_version = "sd3"
    latent_downscale = 8
    image_patch = 2  # the transformer patchifies 2x2 latents itself: latent sides must be even

    # --- recognition ---------------------------------------------------------------------------------------------
    @classmethod
    def matches_header(cls, shapes: Mapping[str, tuple[int, ...]]) -> bool:
        return SINGLE_FILE_MARK in shapes or f"model.diffusion_model.{SINGLE_FILE_MARK}" in shapes

    def check_single_file(self, path: Path) -> None:
        """A transformer-only file is fine here; its VAE and text encoders are checked in :meth:`check_components`."""
        from ....models.checkpoint_file import read_weight_shapes

        self._variant = variant_of(read_weight_shapes(path))

    def check_components(self) -> None:
        """Every separately given component path exists and holds that component (header / config only)."""
        for part, key in PATH_KEYS.items():
            value = getattr(self.cfg, key, None)
            if value is not None:
                _check_component(Path(value).expanduser(), part, key)

    # --- configs and variants ------------------------------------------------------------------------------------
    @property
    def variant(self) -> str:
        """The SD3 variant of the base model (single file: from its header; folder: from the transformer config)."""
        if getattr(self, "_variant", None) is None:
            self._variant = _variant_of_config(self._config_source())
        return self._variant

    def _config_source(self) -> str:
        """Where the component configs come from: the folder / hub id, else base_model_config, else shipped."""
        from . import is_single_file

        cfg = self.cfg
        if not is_single_file(cfg.base_model):
            return cfg.base_model
        if cfg.base_model_config is not None:
            return str(Path(cfg.base_model_config).expanduser())
        return str(CONFIG_ROOT / self.variant)

    def version_label(self, prediction_type: str | None) -> str:
        return "sd3.5" if self.variant.startswith("sd3.5") else "sd3"

    @property  # type: ignore[override]  # the variant's, not one per family
    def modelspec_architecture(self) -> str:
        """sd-scripts' spelling: ``stable-diffusion-3`` + ``-medium`` / ``-5-large`` / ``-5-medium``."""
        return {"sd3.5-large": "stable-diffusion-3-5-large/lora", "sd3.5-medium": "stable-diffusion-3-5-medium/lora"
                }.get(self.variant, "stable-diffusion-3-medium/lora")

    # --- loading -------------------------------------------------------------------------------------------------
    def load(self, base_model: str) -> Components:
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

        from . import is_single_file

        single = is_single_file(base_model)
        source = self._weights_source(single)
        config = self._config_source()
        try:
            if single:
                transformer = SD3Transformer2DModel.from_single_file(
                    str(Path(base_model).expanduser()), config=config, subfolder="transformer", local_files_only=True)
            else:
                transformer = SD3Transformer2DModel.from_pretrained(base_model, subfolder="transformer")
            scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(config, subfolder="scheduler")
            parts = {part: self._load_part(part, source, config) for part in ("vae", *ENCODERS)}
            tokenizers = self._tokenizers(source)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise ConfigError(f"base_model: could not load '{base_model}' as {self.title}: {first_line(exc)}") from None
        return Components(denoiser=transformer, vae=parts["vae"], scheduler=scheduler,
                          text_encoders=[parts[e] for e in ENCODERS], tokenizers=tokenizers)

    def _weights_source(self, single: bool) -> str | None:
        """Where components without a path key load from; one line naming what is missing, before any weights."""
        cfg = self.cfg
        if not single:
            return cfg.base_model
        if cfg.base_model_config is not None and _has_weights(Path(cfg.base_model_config).expanduser()):
            return str(Path(cfg.base_model_config).expanduser())
        missing = [key for key in PATH_KEYS.values() if getattr(cfg, key, None) is None]
        if missing:
            raise ConfigError(f"base_model: '{cfg.base_model}' holds only the {self.title} transformer; set "
                              f"base_model_config to a diffusers SD3 folder, or {', '.join(missing)}")
        return None

    def _load_part(self, part: str, source: str | None, config: str) -> torch.nn.Module:
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModelWithProjection, T5EncoderModel

        cls = {"vae": AutoencoderKL, "text_encoder_3": T5EncoderModel}.get(part, CLIPTextModelWithProjection)
        value = getattr(self.cfg, PATH_KEYS[part], None)
        if value is None:
            return cls.from_pretrained(source, subfolder=part)
        path = Path(value).expanduser()
        if path.is_dir():
            return cls.from_pretrained(path)
        if part == "vae":  # the original (LDM) or the diffusers layout: diffusers' converter tells them apart
            return AutoencoderKL.from_single_file(str(path), config=config, subfolder="vae", local_files_only=True)
        # Stability AI's clip_l / clip_g / t5xxl files are in the transformers layout
        from safetensors.torch import load_file

        with torch.device("meta"):
            model = cls(cls.config_class.from_pretrained(config, subfolder=part))
        state = load_file(str(path))
        if part == "text_encoder_3":
            state = {k: v for k, v in state.items() if not k.startswith("decoder.")}
            state.setdefault("encoder.embed_tokens.weight", state.get("shared.weight"))
            state.setdefault("shared.weight", state["encoder.embed_tokens.weight"])
        elif "text_projection.weight" not in state:
            raise ConfigError(f"{PATH_KEYS[part]}: '{path}' has no text_projection; expected {WHAT[part]}")
        model.load_state_dict(state, strict=False, assign=True)
        return model.float()

    def _tokenizers(self, source: str | None) -> list[Any]:
        """CLIP-L, CLIP-G and T5 tokenizers: from the folder / hub id / base_model_config, else the CLIP BPE files
        shipped here (SD3's CLIP-G pads with ``!``) and T5's from ``text_encoder_3_path``'s folder."""
        from transformers import CLIPTokenizer, T5TokenizerFast

        if source is not None:
            return [CLIPTokenizer.from_pretrained(source, subfolder="tokenizer"),
                    CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2"),
                    T5TokenizerFast.from_pretrained(source, subfolder="tokenizer_3")]
        clips = [CLIPTokenizer(str(CLIP_BPE / "vocab.json"), str(CLIP_BPE / "merges.txt"), pad_token=pad,
                               model_max_length=77) for pad in ("<|endoftext|>", "!")]
        t5 = Path(self.cfg.text_encoder_3_path).expanduser()
        if not (t5.is_dir() and ((t5 / "tokenizer.json").is_file() or (t5 / "spiece.model").is_file())):
            raise ConfigError(f"text_encoder_3_path: the T5 tokenizer is not shipped with lora-scripts; give a T5 "
                              f"folder with its tokenizer files or base_model_config (a diffusers SD3 folder)")
        return [*clips, T5TokenizerFast.from_pretrained(t5)]

    def meta_components(self, base_model: str) -> Components:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

        config = self._config_source()
        try:
            transformer_config = SD3Transformer2DModel.load_config(config, subfolder="transformer")
            vae_config = AutoencoderKL.load_config(config, subfolder="vae")
            te_configs = [CLIPTextConfig.from_pretrained(config, subfolder="text_encoder"),
                          CLIPTextConfig.from_pretrained(config, subfolder="text_encoder_2"),
                          T5Config.from_pretrained(config, subfolder="text_encoder_3")]
            scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(config, subfolder="scheduler")
        except (OSError, ValueError) as exc:
            raise ConfigError(f"base_model: could not read the {self.title} configs of '{config}': "
                              f"{first_line(exc)}") from None
        with torch.device("meta"):
            transformer = SD3Transformer2DModel.from_config(transformer_config)
            vae = AutoencoderKL.from_config(vae_config)
            encoders = [CLIPTextModelWithProjection(te_configs[0]), CLIPTextModelWithProjection(te_configs[1]),
                        T5EncoderModel(te_configs[2])]
        return Components(transformer, vae, encoders, [], scheduler, extra={"text_configs": te_configs})

    # --- prompts -------------------------------------------------------------------------------------------------
    def t5_tokens(self) -> int:
        return self.cfg.text_max_length or DEFAULT_T5_TOKENS

    def max_tokens(self, tokenizer: Any, index: int) -> int:
        return self.t5_tokens() if index == 2 else tokenizer.model_max_length

    def meta_token_length(self, components: Components, index: int) -> int:
        return self.t5_tokens() if index == 2 else components.extra["text_configs"][index].max_position_embeddings

    def encode_prompt(self, text_encoders: list[torch.nn.Module], tokens: Mapping[str, torch.Tensor]
                      ) -> dict[str, torch.Tensor]:
        """As ``StableDiffusion3Pipeline.encode_prompt`` (clip_skip None): both CLIPs' penultimate hidden states
        side by side, zero-padded to T5's width, then T5's tokens after them; pooled: both CLIPs' projections."""
        hidden, pooled = [], []
        for encoder, key in zip(text_encoders[:2], self.token_keys[:2]):
            out = encoder(tokens[key], output_hidden_states=True)
            pooled.append(out[0])
            hidden.append(out.hidden_states[-2])
        t5 = text_encoders[2](tokens[self.token_keys[2]])[0]
        clip = torch.cat(hidden, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1])).to(t5.dtype)
        return {"hidden": torch.cat([clip, t5], dim=-2), "pooled": torch.cat(pooled, dim=-1)}

    def meta_conditioning(self, components: Components, batch_size: int) -> dict[str, torch.Tensor]:
        config = components.denoiser.config
        tokens = components.extra["text_configs"][0].max_position_embeddings + self.t5_tokens()
        return {"hidden": torch.zeros(batch_size, tokens, config.joint_attention_dim),
                "pooled": torch.zeros(batch_size, config.pooled_projection_dim)}

    # --- objective and denoiser ----------------------------------------------------------------------------------
    def objective(self, scheduler: Any) -> FlowMatchingObjective:
        return FlowMatchingObjective(scheduler.config, self.cfg)

    def noise(self, objective: FlowMatchingObjective, latents: torch.Tensor, generators: list[torch.Generator]):
        tokens = (latents.shape[-2] // 2) * (latents.shape[-1] // 2)
        return objective.noise(latents, generators, tokens)

    def denoise(self, denoiser: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The velocity; the transformer reads the sigma scaled to the scheduler's 1000 steps, as the pipeline."""
        dtype = denoiser.dtype
        return denoiser(hidden_states=noisy.to(dtype), timestep=(timesteps * 1000).to(dtype),
                        encoder_hidden_states=cond["hidden"].to(dtype), pooled_projections=cond["pooled"].to(dtype),
                        return_dict=False)[0]

    # --- sampling ------------------------------------------------------------------------------------------------
    def pipeline(self, components: Components, denoiser: torch.nn.Module, text_encoders: list[torch.nn.Module]):
        from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

        tok = components.tokenizers
        return StableDiffusion3Pipeline(
            transformer=denoiser, scheduler=FlowMatchEulerDiscreteScheduler.from_config(components.scheduler.config),
            vae=components.vae, text_encoder=text_encoders[0], tokenizer=tok[0], text_encoder_2=text_encoders[1],
            tokenizer_2=tok[1], text_encoder_3=text_encoders[2], tokenizer_3=tok[2],
        )

    def sample_kwargs(self, sample: Any) -> dict[str, Any]:
        return {**super().sample_kwargs(sample), "max_sequence_length": self.t5_tokens()}

    # --- export --------------------------------------------------------------------------------------------------
    def diffusers_lora_layers(self, part: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """peft's names, as diffusers' ``train_dreambooth_lora_sd3.py`` saves every part."""
        return dict(state)

    def kohya_tensors(self, parts: Mapping[str, Mapping[str, torch.Tensor]], *, alpha: float,
                      conv_alpha: float | None, denoiser_config: Any) -> dict[str, torch.Tensor]:
        """The ComfyUI-loadable single file: diffusers module names under the part prefix (``transformer.``,
        ``text_encoder.``, ``text_encoder_2.``) with peft's ``lora_A`` / ``lora_B``.

        The trained scale ``alpha / rank`` is folded into ``lora_B`` and no ``alpha`` tensor is written: diffusers'
        SD3 loader refuses non-``lora`` keys and uses scale 1 without adapter metadata, and ComfyUI uses scale 1
        for a module without ``alpha``, so both reproduce the trained ``scale * B @ A`` exactly."""
        out: dict[str, torch.Tensor] = {}
        for part, state in parts.items():
            for key, tensor in state.items():
                module, kind = key.rsplit(".lora_", 1)
                if kind == "B.weight":
                    rank = tensor.shape[1]
                    out[f"{part}.{module}.lora_B.weight"] = (tensor * (alpha / rank)).contiguous()
                elif kind == "A.weight":
                    out[f"{part}.{module}.lora_A.weight"] = tensor.contiguous()
                else:
                    raise ConfigError(f"use_dora: DoRA is not exported for {self.title} (diffusers' SD3 loader drops "
                                      "it); remove use_dora")
        return out

    def apply_network_weights(self, path: Path, modules: Mapping[str, torch.nn.Module]) -> None:
        """Continue from an SD3 LoRA with diffusers module names (both files this family exports, diffusers' own
        ``save_lora_weights`` output, ComfyUI / OneTrainer-style ``lora_down`` / ``lora_up`` with ``alpha``)."""
        from peft import set_peft_model_state_dict

        from ....export.load import _Found, _run_targets, _to_peft

        path = Path(path).expanduser()
        file = path / "pytorch_lora_weights.safetensors" if path.is_dir() else path
        if not file.is_file():
            raise ConfigError(f"network_weights: '{path}' is not an SD3 LoRA file or diffusers LoRA folder")
        tensors, alphas = _read_lora_file(file)
        targets = {part: _run_targets(module, "default") for part, module in modules.items()}
        found: dict[str, dict[str, _Found]] = {}
        for key, tensor in tensors.items():
            part, rest = key.split(".", 1)
            # peft (lora_A/B), kohya (lora_down/up) or diffusers' own (lora.down/up) spelling
            module, kind = rest.rsplit(".lora_", 1) if ".lora_" in rest else rest.rsplit(".lora.", 1)
            entry = found.setdefault(part, {}).setdefault(module, _Found(name=f"{part}.{module}"))
            if kind in ("A.weight", "down.weight") or rest.endswith(".lora.down.weight"):
                entry.down = tensor
            elif kind in ("B.weight", "up.weight") or rest.endswith(".lora.up.weight"):
                entry.up = tensor
            else:
                raise ConfigError(f"network_weights: '{path}' holds {key}, which is not a LoRA tensor of {self.title}")
        for part, entries in found.items():
            for module, entry in entries.items():
                entry.alpha = alphas.get(f"{part}.{module}", alphas.get(part))
        for part, state in _to_peft(path, found, targets).items():
            result = set_peft_model_state_dict(modules[part], state, adapter_name="default")
            if getattr(result, "unexpected_keys", None):
                raise RuntimeError(f"{part}: peft did not take {len(result.unexpected_keys)} tensors")


# --- helpers -----------------------------------------------------------------------------------------------------

def _read_lora_file(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """LoRA tensors with diffusers part prefixes, and alphas by ``part.module`` (``alpha`` tensors) or by part
    (diffusers' ``lora_adapter_metadata`` header, as ``save_lora_weights`` writes it)."""
    from safetensors import safe_open

    tensors, alphas = {}, {}
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
            for key in f.keys():
                if key.endswith(".alpha"):
                    alphas[key[: -len(".alpha")]] = float(f.get_tensor(key))
                else:
                    tensors[key] = f.get_tensor(key)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"network_weights: cannot read '{file}' ({first_line(exc)})") from None
    for key in tensors:
        if key.split(".", 1)[0] not in ("transformer", *ENCODERS) or not (".lora_" in key or ".lora." in key):
            raise ConfigError(f"network_weights: '{file}' is not an SD3 LoRA with diffusers names (found '{key}'; "
                              "expected transformer.transformer_blocks.N…lora_A.weight)")
    adapter = json.loads(meta.get("lora_adapter_metadata", "{}") or "{}")
    for key, value in adapter.items():
        if key.endswith(".lora_alpha"):
            alphas.setdefault(key[: -len(".lora_alpha")], float(value))
    return tensors, alphas


def _has_weights(folder: Path) -> bool:
    """A diffusers SD3 folder with weights (not only configs)?"""
    return any((folder / "vae").glob("*.safetensors")) or any((folder / "vae").glob("*.bin"))


def _variant_of_config(source: str) -> str:
    from diffusers import SD3Transformer2DModel

    try:
        config = SD3Transformer2DModel.load_config(source, subfolder="transformer")
    except (OSError, ValueError):
        return "sd3-medium"
    if not config.get("qk_norm"):
        return "sd3-medium"
    return "sd3.5-large" if config.get("num_layers", 0) >= 38 else "sd3.5-medium"


def _check_component(path: Path, part: str, key: str) -> None:
    """``path`` is ``part`` of an SD3 model, from its header or config only; one line naming the file otherwise."""
    if not path.exists():
        raise ConfigError(f"{key}: '{path}' not found; expected {WHAT[part]} (a folder or a .safetensors file)")
    if path.is_dir():
        config = path / "config.json"
        data = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}
        kind = data.get("model_type") or data.get("_class_name")
        ok = {"vae": data.get("latent_channels") == 16, "text_encoder_3": kind == "t5"}.get(
            part, kind in ("clip_text_model", "clip"))
        found = f"a {kind} folder" if kind else "a folder without config.json"
    else:
        from ....models.checkpoint_file import read_weight_shapes

        shapes = read_weight_shapes(path)
        conv_out = shapes.get("encoder.conv_out.weight") or shapes.get("first_stage_model.encoder.conv_out.weight")
        is_t5 = "encoder.block.0.layer.0.SelfAttention.q.weight" in shapes
        is_clip = "text_model.embeddings.token_embedding.weight" in shapes
        ok = {"vae": bool(conv_out) and conv_out[0] == 32, "text_encoder_3": is_t5}.get(part, is_clip)
        found = ("a T5 encoder" if is_t5 else "a CLIP text encoder" if is_clip else
                 f"a {conv_out[0] // 2}-channel VAE" if conv_out else "no known component")
    if not ok:
        raise ConfigError(f"{key}: '{path}' holds {found}; expected {WHAT[part]}")


FAMILY = SD3

"""What the flow-matching transformer families (SD3, FLUX.1, Chroma, Qwen-Image, Z-Image) share: loading a base
model as users have it, the flow-matching objective, and LoRA continuation through the pipeline's own converters.

A base model is one of
- a diffusers folder or hub id (``model_index.json`` + one subfolder per component);
- a transformer-only single file as downloaded (``flux1-dev.safetensors``…), the other components from
  ``base_model_config`` (a diffusers folder: the shipped configs of the family by default) or given one by one in
  ``vae_path`` / ``text_encoder_path`` / ``text_encoder_2_path`` / ``text_encoder_3_path`` (a folder, or a single
  ``.safetensors`` as ComfyUI users keep them: the model is built from the config folder's config).
Every check before weights load reads headers and configs only, and each failure is one line naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Mapping

import torch

from ....errors import ConfigError
from ..objectives import FlowMatchingObjective
from .base import Components, Family, first_line

CONFIGS = Path(__file__).resolve().parents[3] / "models" / "configs"
COMPONENT_KEYS = {"vae": "vae_path", "text_encoder": "text_encoder_path", "text_encoder_2": "text_encoder_2_path",
                  "text_encoder_3": "text_encoder_3_path"}


class TransformerFamily(Family):
    """A diffusers pipeline of a transformer denoiser, a VAE and text encoders, trained by flow matching."""

    denoiser_name = "transformer"
    swap_block_lists = ("transformer_blocks",)
    # component -> (library, class name), in the pipeline's order; tokenizers are named after their encoder
    components: ClassVar[dict[str, tuple[str, str]]] = {}
    # text encoder part -> (accepted transformers ``model_type`` values, a tensor name its single file holds)
    encoder_kinds: ClassVar[dict[str, tuple[tuple[str, ...], str]]] = {}
    shipped_config: ClassVar[str] = ""  # folder under lora_scripts/models/configs with the full-size configs
    header_keys: ClassVar[tuple[str, ...]] = ()  # tensor names (without a ``model.diffusion_model.`` prefix)
    vae_latent_channels: ClassVar[int] = 0  # > 0: a separately given ``vae_path`` must have this many channels

    @classmethod
    def matches_header(cls, shapes: Mapping[str, tuple[int, ...]]) -> bool:
        names = {key.removeprefix("model.diffusion_model.") for key in shapes}
        return bool(cls.header_keys) and all(key in names for key in cls.header_keys)

    @property
    def encoder_names(self) -> list[str]:
        return [name for name in self.components if name.startswith("text_encoder")]

    # --- where each component comes from -------------------------------------------------------------------------
    def config_folder(self) -> Path:
        """Configs (and, when it holds them, weights) of the components a single file lacks."""
        if self.cfg.base_model_config is not None:
            return Path(self.cfg.base_model_config).expanduser()
        return CONFIGS / self.shipped_config

    def component_source(self, name: str) -> tuple[str, Path | str, str | None]:
        """(``"file"`` | ``"folder"``, path, subfolder) of component ``name``; ConfigError if it cannot be had."""
        key = COMPONENT_KEYS.get(name)
        given = getattr(self.cfg, key, None) if key else None
        if given is not None:
            path = Path(given).expanduser()
            if not path.exists():
                raise ConfigError(f"{key}: '{given}' not found; point it at the {self.title} {name} (a folder or "
                                  ".safetensors file)")
            return ("file" if path.is_file() else "folder"), path, None
        folder = self.config_folder()
        if not folder.is_dir() or not (folder / "model_index.json").is_file():
            raise ConfigError(f"base_model_config: '{folder}' is not a diffusers config folder (no model_index.json); "
                              f"pass a {self.title} diffusers folder or leave it out")
        if name.startswith(("vae", "text_encoder")) and not _has_weights(folder / name):
            hint = (f"set {key} to the {name} (a folder or .safetensors), or base_model_config to a full "
                    f"{self.title} diffusers folder") if key else "give a full diffusers folder"
            raise ConfigError(f"base_model: '{self.cfg.base_model}' is a transformer-only file and no {name} weights "
                              f"were found in '{folder / name}'; {hint}")
        return "folder", folder, name

    def check_single_file(self, path: Path) -> None:
        folder = self.config_folder()
        if not (folder / "transformer" / "config.json").is_file():
            raise ConfigError(f"base_model_config: '{folder}' has no transformer/config.json; pass a {self.title} "
                              "diffusers config folder, or leave it out to use the shipped configs")
        self.check_components()  # a wrong given component is reported before the ones not given
        for name in self.components:
            if name.startswith(("vae", "text_encoder")):
                self.component_source(name)
            elif name.startswith("tokenizer"):
                self.tokenizer_folder(name)

    def tokenizer_folder(self, name: str) -> Path:
        """Where tokenizer ``name`` of a single-file base comes from: beside its encoder when that is a folder with
        tokenizer files (a hub snapshot's ``text_encoder_2`` + ``tokenizer_2``), else the config folder."""
        key = COMPONENT_KEYS.get(name.replace("tokenizer", "text_encoder"))
        given = getattr(self.cfg, key, None) if key else None
        candidates = []
        if given is not None and Path(given).expanduser().is_dir():
            folder = Path(given).expanduser()
            candidates += [folder, folder.parent / name]
        candidates.append(self.config_folder() / name)
        for folder in candidates:
            if _has_tokenizer(folder):
                return folder
        raise ConfigError(f"base_model: no {name} for '{self.cfg.base_model}' (looked in "
                          f"{', '.join(str(c) for c in candidates)}); give base_model_config a {self.title} diffusers "
                          f"folder with {name}/, or {key} a folder that has the tokenizer files")

    def check_components(self) -> None:
        """Separately given components exist and are of the kind this family needs (headers and configs only)."""
        for name, key in COMPONENT_KEYS.items():
            given = getattr(self.cfg, key, None)
            if given is None:
                continue
            if name not in self.components:
                raise ConfigError(f"{key}: {self.title} has no {name}; remove {key}")
            kind, path, _ = self.component_source(name)
            if name in self.encoder_kinds:
                _check_encoder_kind(key, Path(path), kind, *self.encoder_kinds[name], self.title)
            elif name == "vae" and self.vae_latent_channels:
                _check_vae_channels(key, Path(path), kind, self.vae_latent_channels, self.title)

    # --- loading -------------------------------------------------------------------------------------------------
    def load(self, base_model: str) -> Components:
        from .. import families

        try:
            if families.is_single_file(base_model):
                return self._load_single_file(Path(base_model).expanduser())
            loaded = {name: _cls(lib, cls).from_pretrained(base_model, subfolder=name, **self._weights_kwargs(name, lib))
                      for name, (lib, cls) in self.components.items()}
            denoiser = self._denoiser_cls().from_pretrained(base_model, subfolder="transformer",
                                                            torch_dtype=self.load_dtype)
            return self._assemble(loaded, denoiser)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise ConfigError(f"base_model: could not load '{base_model}': {first_line(exc)}") from None

    def _weights_kwargs(self, name: str, lib: str) -> dict[str, Any]:
        """The dtype keyword for a component with weights (the VAE, the text encoders), none for the rest."""
        return self.dtype_kwargs(lib) if name.startswith(("vae", "text_encoder")) else {}

    def _load_single_file(self, path: Path) -> Components:
        denoiser = self.load_single_file_denoiser(path)
        loaded = {}
        for name, (lib, cls) in self.components.items():
            if name.startswith(("vae", "text_encoder")):
                loaded[name] = self._load_component(name, lib, cls)
            elif name.startswith("tokenizer"):
                loaded[name] = load_tokenizer(lib, cls, self.tokenizer_folder(name))
            else:
                loaded[name] = _cls(lib, cls).from_pretrained(self.config_folder(), subfolder=name)
        return self._assemble(loaded, denoiser)

    def load_single_file_denoiser(self, path: Path) -> torch.nn.Module:
        """The transformer from a single file in the family's original layout (diffusers' converter)."""
        return self._denoiser_cls().from_single_file(str(path), config=str(self.config_folder()),
                                                     subfolder="transformer", local_files_only=True,
                                                     torch_dtype=self.load_dtype)

    def _load_component(self, name: str, lib: str, cls: str) -> torch.nn.Module:
        kind, path, subfolder = self.component_source(name)
        model_cls = _cls(lib, cls)
        dtype = self.dtype_kwargs(lib)
        if kind == "folder":
            return model_cls.from_pretrained(path, subfolder=subfolder, **dtype) if subfolder \
                else model_cls.from_pretrained(path, **dtype)
        if lib == "diffusers":  # a VAE file: diffusers converts the original layout
            return model_cls.from_single_file(str(path), config=str(self.config_folder()), subfolder=name,
                                              local_files_only=True, **dtype)
        return load_encoder_file(model_cls, Path(path), self.config_folder() / name, self.load_dtype)

    def _assemble(self, loaded: dict[str, Any], denoiser: torch.nn.Module) -> Components:
        return Components(
            denoiser=denoiser, vae=loaded["vae"], scheduler=loaded["scheduler"],
            text_encoders=[loaded[n] for n in self.encoder_names],
            tokenizers=[loaded[n.replace("text_encoder", "tokenizer")] for n in self.encoder_names],
        )

    def _denoiser_cls(self) -> Any:
        return _cls("diffusers", self.denoiser_class)

    def meta_components(self, base_model: str) -> Components:
        """Built on the meta device from the configs: the folder's, or (single file) the config folder's."""
        from .. import families

        source = self.config_folder() if families.is_single_file(base_model) else base_model
        try:
            configs = {name: _load_config(lib, cls, source, name) for name, (lib, cls) in self.components.items()
                       if not name.startswith("tokenizer")}
            denoiser_config = self._denoiser_cls().load_config(source, subfolder="transformer")
        except (OSError, ValueError) as exc:
            raise ConfigError(f"base_model: could not read the configs of '{base_model}': {first_line(exc)}") from None
        with torch.device("meta"):
            denoiser = self._denoiser_cls().from_config(denoiser_config)
            models = {name: _build(self.components[name], config) for name, config in configs.items()
                      if name != "scheduler"}
        scheduler = _cls(*self.components["scheduler"]).from_config(configs["scheduler"])
        return Components(denoiser, models["vae"], [models[n] for n in self.encoder_names], [], scheduler,
                          extra={"text_configs": [configs[n] for n in self.encoder_names]})

    # --- objective -----------------------------------------------------------------------------------------------
    def objective(self, scheduler: Any) -> FlowMatchingObjective:
        return FlowMatchingObjective(scheduler.config, self.cfg)

    def image_seq_len(self, latents: torch.Tensor) -> int:
        """Image tokens of these latents (after patching), which the resolution-dependent shift reads."""
        h, w = latents.shape[-2:]
        return (h // self.image_patch) * (w // self.image_patch)

    def noise(self, objective: FlowMatchingObjective, latents: torch.Tensor, generators: list[torch.Generator]):
        return objective.noise(latents, generators, self.image_seq_len(latents))

    # --- export and continuation ---------------------------------------------------------------------------------
    def apply_network_weights(self, path: Path, modules: Mapping[str, torch.nn.Module]) -> None:
        """Continue from a LoRA: ours (diffusers names or a PEFT folder) directly; any other layout the family's
        diffusers pipeline reads (kohya / ComfyUI / original names) through its own ``lora_state_dict`` converter."""
        import diffusers

        from ....export.load import PARTS, apply_network_weights, read_lora_tensors

        path = Path(path).expanduser()
        file = path / "pytorch_lora_weights.safetensors" if path.is_dir() else path
        if path.is_dir() and not file.is_file():  # a PEFT adapter folder (or nothing: the reader says so)
            return apply_network_weights(path, modules, family=self.name)
        tensors, _ = read_lora_tensors(file)
        if all(key.split(".", 1)[0] in PARTS for key in tensors):
            if any(key.endswith((".lora_down.weight", ".lora_up.weight")) for key in tensors):
                # kohya's kind names under diffusers module names (ComfyUI / OneTrainer style), ``alpha`` per module
                tensors = {key.replace(".lora_down.weight", ".lora_A.weight").replace(".lora_up.weight",
                                                                                      ".lora_B.weight"): value
                           for key, value in tensors.items()}
                return apply_network_weights(file, modules, family=self.name, tensors=tensors)
            return apply_network_weights(file, modules, family=self.name)
        try:
            out = getattr(diffusers, self.pipeline_class).lora_state_dict(str(file))
        except (OSError, ValueError, KeyError, RuntimeError, IndexError) as exc:
            raise ConfigError(f"network_weights: '{path}' is not a {self.title} LoRA diffusers can read "
                              f"({first_line(exc)})") from None
        state = out[0] if isinstance(out, tuple) else out  # alphas are folded into the weights by the converters
        apply_network_weights(file, modules, family=self.name, tensors=dict(state))



def _cls(lib: str, name: str) -> Any:
    import importlib

    return getattr(importlib.import_module(lib), name)


def _has_tokenizer(folder: Path) -> bool:
    """Tokenizer files, or the shipped CLIP settings (``tokenizer_config.json`` over the shared BPE vocabulary)."""
    if any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json", "spiece.model")):
        return True
    config = folder / "tokenizer_config.json"
    return config.is_file() and json.loads(config.read_text(encoding="utf-8")).get("tokenizer_class") == "CLIPTokenizer"


def load_tokenizer(lib: str, cls: str, folder: Path) -> Any:
    """A tokenizer from ``folder``; a shipped CLIP one (settings only) over the shared CLIP BPE vocabulary."""
    if not any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json", "spiece.model")):
        from ....models.single_file import CLIP_BPE
        from transformers import CLIPTokenizer

        settings = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        keep = ("model_max_length", "bos_token", "eos_token", "unk_token", "pad_token", "do_lower_case")
        return CLIPTokenizer.from_pretrained(CLIP_BPE, **{k: v for k, v in settings.items() if k in keep})
    return _cls(lib, cls).from_pretrained(folder)


def _has_weights(folder: Path) -> bool:
    return folder.is_dir() and (any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")))


def _load_config(lib: str, cls: str, source: Path | str, name: str) -> Any:
    model_cls = _cls(lib, cls)
    if lib == "diffusers":
        return model_cls.load_config(source, subfolder=name)
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source, subfolder=name)


def _build(spec: tuple[str, str], config: Any) -> torch.nn.Module:
    model_cls = _cls(*spec)
    if spec[0] == "diffusers":
        return model_cls.from_config(config)
    return model_cls(config)


def load_encoder_file(model_cls: Any, path: Path, config_dir: Path, dtype: torch.dtype = torch.float32
                      ) -> torch.nn.Module:
    """A text encoder from one ``.safetensors`` (ComfyUI's ``clip_l.safetensors``, ``t5xxl_fp16.safetensors``…):
    built from ``config_dir``'s config, the file's tensors loaded by name (a ``text_model.`` level, as older CLIP
    files have or lack it, is matched either way); missing or unexpected tensors are a one-line error."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(config_dir)
    with torch.device("meta"):
        model = model_cls(config)
    expected = set(model.state_dict())
    tensors = load_file(str(path))
    renamed = {}
    for key, value in tensors.items():
        for candidate in (key, key.removeprefix("text_model."), f"text_model.{key}", key.removeprefix("encoder."),
                          f"model.{key}", key.removeprefix("model.")):
            if candidate in expected:
                renamed[candidate] = value
                break
    # tied or derived weights some files leave out (T5's shared embedding is stored once as shared.weight)
    if "encoder.embed_tokens.weight" in expected and "encoder.embed_tokens.weight" not in renamed \
            and "shared.weight" in renamed:
        renamed["encoder.embed_tokens.weight"] = renamed["shared.weight"]
    missing = sorted(expected - set(renamed) - {k for k in expected if k.endswith("position_ids")})
    if missing:
        raise ConfigError(f"'{path}': not a {config.model_type} text encoder of this size ({len(missing)} tensors "
                          f"missing, e.g. {missing[0]}); point the path at the right encoder")
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in renamed.items()},
                          strict=False, assign=True)
    return model.to(dtype)


def _check_vae_channels(key: str, path: Path, kind: str, channels: int, title: str) -> None:
    """A VAE folder's ``latent_channels``, or a single file's encoder output (mean and logvar: twice the latent
    channels, in the diffusers or the original layout), say it is a VAE of ``channels`` latent channels."""
    if kind == "folder":
        try:
            found = json.loads((path / "config.json").read_text(encoding="utf-8")).get("latent_channels")
        except (OSError, ValueError):
            raise ConfigError(f"{key}: '{path}' has no readable config.json; point it at a diffusers VAE folder or a "
                              ".safetensors file") from None
    else:
        from ....models.checkpoint_file import read_weight_shapes

        shapes = read_weight_shapes(path)
        conv_out = next((v for k, v in shapes.items() if k.endswith("encoder.conv_out.weight")), None)
        found = conv_out[0] // 2 if conv_out else None
    if found != channels:
        what = f"a {found}-channel VAE" if found else "no VAE"
        raise ConfigError(f"{key}: '{path}' holds {what}, but {title} expects its {channels}-channel VAE; point it "
                          "at the right VAE")


def _check_encoder_kind(key: str, path: Path, kind: str, model_types: tuple[str, ...], tensor: str,
                        title: str) -> None:
    """A folder's ``config.json`` model_type, or a single file's tensor names, say it is the encoder expected."""
    if kind == "folder":
        config = path / "config.json"
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
            found = data.get("model_type") or data.get("_class_name")  # a diffusers model (a VAE) names its class
        except (OSError, ValueError):
            raise ConfigError(f"{key}: '{path}' has no readable config.json; point it at a transformers text-encoder "
                              "folder or a .safetensors file") from None
        if found not in model_types:
            raise ConfigError(f"{key}: '{path}' is a {found} model, but {title} expects {' or '.join(model_types)} "
                              "here; point it at the right text encoder")
        return
    from ....models.checkpoint_file import read_weight_shapes

    names = read_weight_shapes(path)
    if not any(name.endswith(tensor) for name in names):
        raise ConfigError(f"{key}: '{path}' is not a {model_types[0]} text encoder (no {tensor}); point it at the "
                          f"{title} text encoder it expects")

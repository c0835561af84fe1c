"""FLUX.1 (dev / schnell): a double- and single-stream transformer over packed 2x2 latent patches, conditioned on
T5-XXL hidden states (sequence) and CLIP-L's pooled output (vector), with a distilled guidance input on dev.

Single files come in Black Forest Labs' original layout (``double_blocks.N.img_attn.qkv``, ``single_blocks.N.linear1``
with q, k, v and the MLP input fused). :func:`original_layout` is the one table between that layout and diffusers'
names; it loads single files, writes them (tests) and names the single-file LoRA export. It is written here because
diffusers' converter fixes FLUX.1's width (3072) and MLP ratio, so it cannot read a file of any other size.

The single-file LoRA is in sd-scripts' FLUX layout (``lora_unet_double_blocks_0_img_attn_qkv``…), which ComfyUI maps
one to one onto its ``diffusion_model.`` weights (``comfy/lora.py``: ``lora_unet_`` + the key with ``.`` -> ``_``) and
diffusers converts (``_convert_kohya_flux_lora_to_diffusers``). Separately trained q/k/v (and the single blocks' MLP
input) become one fused module: ``lora_down`` the trained downs stacked, ``lora_up`` block-diagonal, alpha times the
number of parts, so every consumer computes exactly the trained separate updates.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping

import torch

from ....errors import ConfigError
from .base import Components
from .transformer import TransformerFamily

PREFIX = "model.diffusion_model."


@dataclass(frozen=True)
class Rule:
    """One tensor of the original layout: the diffusers tensors concatenated along dim 0 (or, ``swap``, the one
    tensor with its two halves swapped: the final norm's shift/scale order)."""

    original: str
    parts: tuple[str, ...]
    swap: bool = False


def original_layout(config: Mapping[str, Any]) -> list[Rule]:
    """Every tensor of a FLUX.1 transformer in the original layout, from the diffusers config. Chroma (a config with
    ``approximator_layers``) is FLUX.1 without per-block modulation weights, its modulation coming from one
    "distilled guidance" network instead."""
    rules: list[Rule] = []
    chroma = "approximator_layers" in config

    def linear(original: str, *modules: str) -> None:
        for kind in ("weight", "bias"):
            rules.append(Rule(f"{original}.{kind}", tuple(f"{m}.{kind}" for m in modules)))

    if chroma:
        g = "distilled_guidance_layer"
        linear(f"{g}.in_proj", f"{g}.in_proj")
        linear(f"{g}.out_proj", f"{g}.out_proj")
        for i in range(config["approximator_layers"]):
            linear(f"{g}.layers.{i}.in_layer", f"{g}.layers.{i}.linear_1")
            linear(f"{g}.layers.{i}.out_layer", f"{g}.layers.{i}.linear_2")
            rules.append(Rule(f"{g}.norms.{i}.scale", (f"{g}.norms.{i}.weight",)))
    else:
        linear("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1")
        linear("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2")
        linear("vector_in.in_layer", "time_text_embed.text_embedder.linear_1")
        linear("vector_in.out_layer", "time_text_embed.text_embedder.linear_2")
    if config.get("guidance_embeds"):
        linear("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1")
        linear("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")
    linear("txt_in", "context_embedder")
    linear("img_in", "x_embedder")
    for i in range(config["num_layers"]):
        d, b = f"double_blocks.{i}", f"transformer_blocks.{i}"
        if not chroma:
            linear(f"{d}.img_mod.lin", f"{b}.norm1.linear")
            linear(f"{d}.txt_mod.lin", f"{b}.norm1_context.linear")
        linear(f"{d}.img_attn.qkv", f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v")
        linear(f"{d}.txt_attn.qkv", f"{b}.attn.add_q_proj", f"{b}.attn.add_k_proj", f"{b}.attn.add_v_proj")
        for side, q, k in (("img", "norm_q", "norm_k"), ("txt", "norm_added_q", "norm_added_k")):
            rules.append(Rule(f"{d}.{side}_attn.norm.query_norm.scale", (f"{b}.attn.{q}.weight",)))
            rules.append(Rule(f"{d}.{side}_attn.norm.key_norm.scale", (f"{b}.attn.{k}.weight",)))
        linear(f"{d}.img_mlp.0", f"{b}.ff.net.0.proj")
        linear(f"{d}.img_mlp.2", f"{b}.ff.net.2")
        linear(f"{d}.txt_mlp.0", f"{b}.ff_context.net.0.proj")
        linear(f"{d}.txt_mlp.2", f"{b}.ff_context.net.2")
        linear(f"{d}.img_attn.proj", f"{b}.attn.to_out.0")
        linear(f"{d}.txt_attn.proj", f"{b}.attn.to_add_out")
    for i in range(config["num_single_layers"]):
        s, b = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        if not chroma:
            linear(f"{s}.modulation.lin", f"{b}.norm.linear")
        linear(f"{s}.linear1", f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v", f"{b}.proj_mlp")
        rules.append(Rule(f"{s}.norm.query_norm.scale", (f"{b}.attn.norm_q.weight",)))
        rules.append(Rule(f"{s}.norm.key_norm.scale", (f"{b}.attn.norm_k.weight",)))
        linear(f"{s}.linear2", f"{b}.proj_out")
    linear("final_layer.linear", "proj_out")
    if not chroma:
        for kind in ("weight", "bias"):
            rules.append(Rule(f"final_layer.adaLN_modulation.1.{kind}", (f"norm_out.linear.{kind}",), swap=True))
    return rules


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def to_original(state: Mapping[str, torch.Tensor], rules: list[Rule]) -> dict[str, torch.Tensor]:
    """A diffusers state dict in the original layout (for writing single files)."""
    out = {}
    for rule in rules:
        tensor = torch.cat([state[p] for p in rule.parts], dim=0) if len(rule.parts) > 1 else state[rule.parts[0]]
        out[rule.original] = _swap_halves(tensor) if rule.swap else tensor
    return out


def from_original(original: Mapping[str, torch.Tensor], rules: list[Rule], shapes: Mapping[str, torch.Size],
                  path: Path | str) -> dict[str, torch.Tensor]:
    """An original-layout state dict in diffusers names, split by the diffusers shapes; a missing tensor or a size
    that does not match the config is a one-line ConfigError."""
    out: dict[str, torch.Tensor] = {}
    for rule in rules:
        tensor = original.get(rule.original)
        if tensor is None:
            raise ConfigError(f"base_model: '{path}' lacks {rule.original}; it is not a complete FLUX.1 transformer "
                              "of the configured size (check base_model_config)")
        sizes = [shapes[p][0] for p in rule.parts]
        if tensor.shape[0] != sum(sizes) or tuple(tensor.shape[1:]) != tuple(shapes[rule.parts[0]][1:]):
            raise ConfigError(f"base_model: '{path}': {rule.original} has shape {tuple(tensor.shape)}, the config "
                              f"expects {(sum(sizes), *shapes[rule.parts[0]][1:])}; pass the base_model_config "
                              "of this model")
        if rule.swap:
            tensor = _swap_halves(tensor)
        for name, piece in zip(rule.parts, torch.split(tensor, sizes, dim=0)):
            out[name] = piece
    return out


def fused_modules(rules: list[Rule]) -> dict[str, tuple[str, int, int]]:
    """diffusers Linear module -> (original module, its index among the fused parts, number of parts)."""
    out = {}
    for rule in rules:
        if rule.original.endswith(".weight") and not rule.swap:
            for index, part in enumerate(rule.parts):
                out[part.removesuffix(".weight")] = (rule.original.removesuffix(".weight"), index, len(rule.parts))
    return out


def fused_lora_state_dict(state: Mapping[str, torch.Tensor], rules: list[Rule], denoiser_shapes: Mapping[str, Any],
                          prefix: str, alpha: float) -> dict[str, torch.Tensor]:
    """peft LoRA tensors of the transformer (``<module>.lora_A.weight``…) as kohya modules of the original layout.

    For a fused original module the trained parts' downs are stacked and their ups placed block-diagonally at their
    rows (rows of untrained parts stay zero), so ``up @ down`` is exactly the separate updates side by side; the
    rank grows to the sum of the parts' ranks, so alpha grows with it and ``alpha / rank`` keeps the trained scale.
    """
    from ....export.kohya import kohya_dora_scale, split_peft_key

    modules = fused_modules(rules)
    grouped: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for key, tensor in state.items():
        module, kind = split_peft_key(key)
        if module not in modules:
            raise ValueError(f"{module} has no place in the FLUX.1 original layout; train the block projections only")
        original, index, _ = modules[module]
        grouped.setdefault(original, {}).setdefault(index, {})[kind] = tensor.detach().float().cpu()
    out: dict[str, torch.Tensor] = {}
    for original, pieces in grouped.items():
        rule = next(r for r in rules if r.original == f"{original}.weight")
        rows = [denoiser_shapes[p][0] for p in rule.parts]
        name = f"{prefix}_{original.replace('.', '_')}"
        if "dora_scale" in next(iter(pieces.values())):
            # DoRA normalises each output row, and each fused row belongs to one part: the magnitudes concatenate
            if len(pieces) != len(rule.parts):
                raise ValueError(f"DoRA on part of {original} has no single-file layout (train all its parts)")
            out[f"{name}.dora_scale"] = kohya_dora_scale(torch.cat([pieces[i]["dora_scale"] for i in sorted(pieces)]))
        downs, ranks = [], []
        for index in sorted(pieces):
            downs.append(pieces[index]["lora_down.weight"])
            ranks.append(downs[-1].shape[0])
        up = torch.zeros(sum(rows), sum(ranks))
        column = 0
        for index, rank in zip(sorted(pieces), ranks):
            start = sum(rows[:index])
            up[start:start + rows[index], column:column + rank] = pieces[index]["lora_up.weight"]
            column += rank
        out[f"{name}.lora_down.weight"] = torch.cat(downs, dim=0).contiguous()
        out[f"{name}.lora_up.weight"] = up
        out[f"{name}.alpha"] = torch.tensor(float(alpha) * len(pieces), dtype=torch.float32)
    return out


def unfused_lora_state_dict(tensors: Mapping[str, torch.Tensor], rules: list[Rule], denoiser_shapes: Mapping[str, Any],
                            prefix: str = "lora_unet") -> dict[str, torch.Tensor]:
    """The inverse of :func:`fused_lora_state_dict` for any kohya FLUX file (ours with block-diagonal ups, or
    sd-scripts' with one down shared by the parts): diffusers-named ``transformer.<module>.lora_A/B.weight`` with
    the file's scale folded into the ups (so alpha = rank). Sizes come from the config, so any width works
    (diffusers' own converter assumes FLUX.1's 3072)."""
    out: dict[str, torch.Tensor] = {}
    by_name = {f"{prefix}_{r.original.removesuffix('.weight').replace('.', '_')}": r for r in rules
               if r.original.endswith(".weight") and not r.swap}
    for key in tensors:
        if not key.endswith(".lora_down.weight"):
            continue
        name = key.removesuffix(".lora_down.weight")
        rule = by_name.get(name)
        if rule is None:
            continue
        down, up = tensors[key].float(), tensors[f"{name}.lora_up.weight"].float()
        rank = down.shape[0]
        alpha = float(tensors[f"{name}.alpha"]) if f"{name}.alpha" in tensors else float(rank)
        rows = [denoiser_shapes[p][0] for p in rule.parts]
        ups = torch.split(up * (alpha / rank), rows, dim=0)
        n = len(rule.parts)
        # block-diagonal (each part's rows use only its own columns): split the down too
        width = rank // n if rank % n == 0 else 0
        sparse = bool(width) and all(
            not ups[j][:, k * width:(k + 1) * width].any() for j in range(n) for k in range(n) if j != k)
        for j, part in enumerate(rule.parts):
            module = part.removesuffix(".weight")
            if sparse:
                part_down, part_up = down[j * width:(j + 1) * width], ups[j][:, j * width:(j + 1) * width]
                if not part_up.any():
                    continue  # a part the LoRA did not train
            else:
                part_down, part_up = down, ups[j]
            out[f"transformer.{module}.lora_A.weight"] = part_down.contiguous()
            out[f"transformer.{module}.lora_B.weight"] = part_up.contiguous()
    return out


class Flux(TransformerFamily):
    name = "flux"
    title = "FLUX.1"
    pipeline_class = "FluxPipeline"
    denoiser_class = "FluxTransformer2DModel"
    swap_block_lists = ("transformer_blocks", "single_transformer_blocks")  # double blocks run first
    shipped_config = "flux1-dev"
    num_text_encoders = 2
    image_patch = 2
    base_model_version = "flux1"
    modelspec_architecture = "flux-1-dev/lora"
    modelspec_implementation = "https://github.com/black-forest-labs/flux"
    header_keys = ("double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight", "vector_in.in_layer.weight")
    components: ClassVar[dict[str, tuple[str, str]]] = {
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
        "vae": ("diffusers", "AutoencoderKL"),
        "text_encoder": ("transformers", "CLIPTextModel"),
        "tokenizer": ("transformers", "CLIPTokenizer"),
        "text_encoder_2": ("transformers", "T5EncoderModel"),
        "tokenizer_2": ("transformers", "T5TokenizerFast"),
    }
    encoder_kinds = {"text_encoder": (("clip_text_model",), "encoder.layers.0.self_attn.q_proj.weight"),
                     "text_encoder_2": (("t5", "umt5"), "encoder.block.0.layer.0.SelfAttention.q.weight")}
    text_encoder_lora = (0,)  # CLIP-L, as sd-scripts' FLUX training offers; T5-XXL stays frozen
    lora_loader_parts = ("transformer", "text_encoder")
    # diffusers' train_dreambooth_lora_flux targets, plus the single blocks' MLP input (fused with q/k/v there)
    default_targets: ClassVar[list[str]] = [
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
        "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
        "ff_context.net.2", "proj_mlp",
    ]
    default_text_tokens: ClassVar[int] = 512

    def check_components(self) -> None:
        super().check_components()
        if self.cfg.use_dora and self.cfg.target_modules:
            raise ConfigError("use_dora: on FLUX.1 / Chroma, DoRA needs the default target_modules (fused q/k/v and "
                              "linear1 must be adapted whole for the single-file export); remove target_modules")

    # --- single files --------------------------------------------------------------------------------------------
    def load_single_file_denoiser(self, path: Path) -> torch.nn.Module:
        from safetensors.torch import load_file

        from accelerate import init_empty_weights

        model_cls = self._denoiser_cls()
        config = model_cls.load_config(self.config_folder(), subfolder="transformer")
        with init_empty_weights(include_buffers=False):  # parameters on meta, filled below; buffers real
            model = model_cls.from_config(config)
        shapes = {k: v.shape for k, v in model.state_dict().items()}
        original = {k.removeprefix(PREFIX): v for k, v in load_file(str(path)).items()}
        state = from_original(original, original_layout(config), shapes, path)
        missing = sorted(set(shapes) - set(state))
        if missing:
            raise ConfigError(f"base_model: '{path}' gives no {missing[0]}; the config does not match the file")
        model.load_state_dict({k: v.to(self.load_dtype) for k, v in state.items()}, assign=True)
        return model

    # --- prompts -------------------------------------------------------------------------------------------------
    def max_tokens(self, tokenizer: Any, index: int) -> int:
        if index == 0:
            return tokenizer.model_max_length  # CLIP: 77
        return self.cfg.text_max_length or self.default_text_tokens

    def meta_token_length(self, components: Components, index: int) -> int:
        if index == 0:
            return components.extra["text_configs"][0].max_position_embeddings
        return self.cfg.text_max_length or self.default_text_tokens

    def encode_prompt(self, text_encoders: list[torch.nn.Module], tokens: Mapping[str, torch.Tensor]
                      ) -> dict[str, torch.Tensor]:
        """As FluxPipeline.encode_prompt: CLIP-L's pooled output, T5's last hidden state."""
        pooled = text_encoders[0](tokens["input_ids"], output_hidden_states=False).pooler_output
        hidden = text_encoders[1](tokens["input_ids_2"], output_hidden_states=False)[0]
        return {"hidden": hidden, "pooled": pooled}

    def meta_conditioning(self, components: Components, batch_size: int) -> dict[str, torch.Tensor]:
        clip, t5 = components.extra["text_configs"]
        return {"hidden": torch.zeros(batch_size, self.meta_token_length(components, 1), t5.d_model),
                "pooled": torch.zeros(batch_size, clip.hidden_size)}

    # --- denoiser ------------------------------------------------------------------------------------------------
    def denoise(self, denoiser: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """As FluxPipeline calls the transformer: 2x2 patches packed into tokens, image ids (0, row, column), text
        ids zero, timestep = sigma, and on dev the guidance value (``guidance_scale``)."""
        dtype = denoiser.dtype
        b, c, h, w = noisy.shape
        packed, img_ids, hidden, txt_ids = packed_inputs(noisy, cond["hidden"], dtype)
        guidance = None
        if denoiser.config.guidance_embeds:
            guidance = torch.full((b,), float(self.cfg.guidance_scale), device=noisy.device, dtype=torch.float32)
        out = denoiser(hidden_states=packed, timestep=timesteps.to(dtype), guidance=guidance,
                       pooled_projections=cond["pooled"].to(dtype), encoder_hidden_states=hidden, txt_ids=txt_ids,
                       img_ids=img_ids, return_dict=False)[0]
        return unpack_latents(out, b, c, h, w)

    # --- sampling ------------------------------------------------------------------------------------------------
    def pipeline(self, components: Components, denoiser: torch.nn.Module, text_encoders: list[torch.nn.Module]):
        from diffusers import FluxPipeline

        return FluxPipeline(scheduler=components.scheduler, vae=components.vae, text_encoder=text_encoders[0],
                            tokenizer=components.tokenizers[0], text_encoder_2=text_encoders[1],
                            tokenizer_2=components.tokenizers[1], transformer=denoiser)

    def sample_kwargs(self, sample: Any) -> dict[str, Any]:
        return {"guidance_scale": sample.guidance_scale, "max_sequence_length": self.max_tokens(None, 1)}

    # --- export --------------------------------------------------------------------------------------------------
    def kohya_tensors(self, parts: Mapping[str, Mapping[str, torch.Tensor]], *, alpha: float,
                      conv_alpha: float | None, denoiser_config: Any) -> dict[str, torch.Tensor]:
        from ....export.kohya import kohya_state_dict

        rules = original_layout(denoiser_config)
        shapes = self.denoiser_shapes(denoiser_config)
        out = fused_lora_state_dict(parts["transformer"], rules, shapes, "lora_unet", alpha)
        if "text_encoder" in parts:  # CLIP-L as sd-scripts names it for FLUX: lora_te1_
            te = kohya_state_dict({"text_encoder": parts["text_encoder"]}, family="sd1", alpha=alpha)
            out.update({k.replace("lora_te_", "lora_te1_", 1): v for k, v in te.items()})
        return out

    def apply_network_weights(self, path: Path, modules: Mapping[str, torch.nn.Module]) -> None:
        """kohya-layout FLUX files (``lora_unet_double_blocks_…``) are un-fused here, for any model size; other
        layouts as every transformer family reads them."""
        from ....export.load import apply_network_weights, read_lora_tensors

        file = Path(path).expanduser()
        if file.is_file():
            tensors, _ = read_lora_tensors(file)
            if tensors and all(k.startswith(("lora_unet_", "lora_te1_")) for k in tensors):
                config = modules["transformer"].config
                state = unfused_lora_state_dict(tensors, original_layout(config), self.denoiser_shapes(config))
                te = {k: v for k, v in tensors.items() if k.startswith("lora_te1_")}
                if te:
                    state.update(_kohya_clip_to_diffusers(te))
                return apply_network_weights(file, modules, family=self.name, tensors=state)
        super().apply_network_weights(path, modules)

    def denoiser_shapes(self, config: Any) -> dict[str, torch.Size]:
        with torch.device("meta"):
            model = self._denoiser_cls().from_config(config)
        return {k: v.shape for k, v in model.state_dict().items()}

    def version_label(self, prediction_type: str | None) -> str:
        return self.base_model_version


def _kohya_clip_to_diffusers(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight`` -> diffusers' peft names, scale
    folded into the up."""
    out = {}
    for key, tensor in tensors.items():
        if not key.endswith(".lora_down.weight"):
            continue
        name = key.removesuffix(".lora_down.weight")
        module = name.removeprefix("lora_te1_").removeprefix("text_model_")
        parts = module.split("_")  # encoder, layers, N, self, attn, q, proj
        layer = parts[2]
        proj = "_".join(parts[5:])
        path = f"text_encoder.text_model.encoder.layers.{layer}.self_attn.{proj}"
        rank = tensor.shape[0]
        alpha = float(tensors.get(f"{name}.alpha", torch.tensor(float(rank))))
        out[f"{path}.lora_A.weight"] = tensor.float()
        out[f"{path}.lora_B.weight"] = tensors[f"{name}.lora_up.weight"].float() * (alpha / rank)
    return out


def packed_inputs(noisy: torch.Tensor, hidden: torch.Tensor, dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed latents, image ids, text states, text ids) as FluxPipeline prepares them for the transformer."""
    from diffusers import FluxPipeline

    b, c, h, w = noisy.shape
    packed = FluxPipeline._pack_latents(noisy, b, c, h, w).to(dtype)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, dtype)
    hidden = hidden.to(dtype)
    return packed, img_ids, hidden, torch.zeros(hidden.shape[1], 3, device=noisy.device, dtype=dtype)


def unpack_latents(tokens: torch.Tensor, b: int, c: int, h: int, w: int) -> torch.Tensor:
    """The inverse of FluxPipeline._pack_latents: (B, h/2 * w/2, 4c) tokens -> (B, c, h, w) latents."""
    x = tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


FAMILY = Flux

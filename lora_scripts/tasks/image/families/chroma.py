"""Chroma: FLUX.1-schnell's architecture pruned of its per-block modulation weights (one "distilled guidance" network
computes them) and of CLIP: T5-XXL alone conditions it, with an attention mask that hides all padding but one token.

Everything else is FLUX.1's: packed 2x2 latents, image and text position ids, flow matching with the scheduler's
shift, the original single-file layout (:func:`.flux.original_layout` covers both) and sd-scripts' FLUX LoRA names,
which ComfyUI maps onto Chroma's ``diffusion_model.`` weights the same way.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

import torch

from .base import Components
from .flux import Flux, fused_lora_state_dict, original_layout, packed_inputs, unpack_latents


class Chroma(Flux):
    name = "chroma"
    title = "Chroma"
    pipeline_class = "ChromaPipeline"
    denoiser_class = "ChromaTransformer2DModel"
    shipped_config = "chroma1-hd"
    num_text_encoders = 1
    base_model_version = "chroma"
    modelspec_architecture = "chroma/lora"
    modelspec_implementation = "https://github.com/lodestone-rock/flow"
    header_keys = ("double_blocks.0.img_attn.qkv.weight", "distilled_guidance_layer.in_proj.weight")
    components: ClassVar[dict[str, tuple[str, str]]] = {
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
        "vae": ("diffusers", "AutoencoderKL"),
        "text_encoder": ("transformers", "T5EncoderModel"),
        "tokenizer": ("transformers", "T5TokenizerFast"),
    }
    encoder_kinds = {"text_encoder": (("t5", "umt5"), "encoder.block.0.layer.0.SelfAttention.q.weight")}
    text_encoder_lora = ()  # T5-XXL stays frozen
    lora_loader_parts = ("transformer",)

    def max_tokens(self, tokenizer: Any, index: int) -> int:
        return self.cfg.text_max_length or self.default_text_tokens

    def meta_token_length(self, components: Components, index: int) -> int:
        return self.cfg.text_max_length or self.default_text_tokens

    def tokenize(self, tokenizers: list[Any], prompt: str) -> dict[str, torch.Tensor]:
        out = tokenizers[0](prompt, padding="max_length", truncation=True, max_length=self.max_tokens(None, 0),
                            return_tensors="pt")
        return {"input_ids": out.input_ids[0], "attention_mask": out.attention_mask[0]}

    @property
    def token_keys(self) -> tuple[str, ...]:
        return ("input_ids", "attention_mask")

    def meta_tokens(self, components: Components, batch_size: int) -> dict[str, torch.Tensor]:
        length = self.meta_token_length(components, 0)
        return {"input_ids": torch.zeros(batch_size, length, dtype=torch.long),
                "attention_mask": torch.ones(batch_size, length, dtype=torch.long)}

    def encode_prompt(self, text_encoders: list[torch.nn.Module], tokens: Mapping[str, torch.Tensor]
                      ) -> dict[str, torch.Tensor]:
        """As ChromaPipeline: T5 run with the tokenizer's mask; the transformer's text mask keeps the first padding
        token visible."""
        mask = tokens["attention_mask"]
        hidden = text_encoders[0](tokens["input_ids"], output_hidden_states=False, attention_mask=mask)[0]
        lengths = mask.sum(dim=1)
        positions = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0).expand(mask.shape[0], -1)
        return {"hidden": hidden, "text_mask": (positions <= lengths.unsqueeze(1)).to(hidden.dtype)}

    def meta_conditioning(self, components: Components, batch_size: int) -> dict[str, torch.Tensor]:
        length = self.meta_token_length(components, 0)
        width = components.extra["text_configs"][0].d_model
        return {"hidden": torch.zeros(batch_size, length, width), "text_mask": torch.ones(batch_size, length)}

    def denoise(self, denoiser: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """As ChromaPipeline calls the transformer: FLUX's packing and ids, the text mask extended over the image
        tokens, timestep = sigma, no pooled vector or guidance input."""
        dtype = denoiser.dtype
        b, c, h, w = noisy.shape
        packed, img_ids, hidden, txt_ids = packed_inputs(noisy, cond["hidden"], dtype)
        mask = torch.cat([cond["text_mask"].to(dtype),
                          torch.ones(b, packed.shape[1], device=noisy.device, dtype=torch.bool)], dim=1)
        out = denoiser(hidden_states=packed, timestep=timesteps.to(dtype), encoder_hidden_states=hidden,
                       txt_ids=txt_ids, img_ids=img_ids, attention_mask=mask, return_dict=False)[0]
        return unpack_latents(out, b, c, h, w)

    def pipeline(self, components: Components, denoiser: torch.nn.Module, text_encoders: list[torch.nn.Module]):
        from diffusers import ChromaPipeline

        return ChromaPipeline(scheduler=components.scheduler, vae=components.vae, text_encoder=text_encoders[0],
                              tokenizer=components.tokenizers[0], transformer=denoiser)

    def sample_kwargs(self, sample: Any) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"guidance_scale": sample.guidance_scale, "max_sequence_length": self.max_tokens(None, 0)}
        if sample.negative_prompt:
            kwargs["negative_prompt"] = sample.negative_prompt
        return kwargs

    def kohya_tensors(self, parts: Mapping[str, Mapping[str, torch.Tensor]], *, alpha: float,
                      conv_alpha: float | None, denoiser_config: Any) -> dict[str, torch.Tensor]:
        return fused_lora_state_dict(parts["transformer"], original_layout(denoiser_config),
                                     self.denoiser_shapes(denoiser_config), "lora_unet", alpha)


FAMILY = Chroma

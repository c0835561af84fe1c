"""Z-Image (Z-Image-Turbo, Z-Image): a single-stream DiT (``ZImageTransformer2DModel``: noise and context refiners,
then joint layers over image and caption tokens) on the FLUX VAE's 16-channel latents, conditioned on the
second-to-last hidden state of Qwen3-4B reading the prompt in its chat template, as a variable-length list.

Two conventions differ from the other flow families and are restated in :meth:`ZImage.denoise`: the transformer's
timestep is ``1 - sigma`` (the pipeline passes ``(1000 - t) / 1000``) and its output is the negative velocity (the
pipeline negates it before the scheduler's Euler step).
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

import torch

from .base import Components
from .flow_common import FlowLoRAMixin, strip_prefix
from .transformer import TransformerFamily

PIPELINE_MAX_LENGTH = 512  # ZImagePipeline's default max_sequence_length


class ZImage(FlowLoRAMixin, TransformerFamily):
    name = "z_image"
    title = "Z-Image"
    pipeline_class = "ZImagePipeline"
    denoiser_class = "ZImageTransformer2DModel"
    components: ClassVar[dict[str, tuple[str, str]]] = {
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"), "vae": ("diffusers", "AutoencoderKL"),
        "text_encoder": ("transformers", "Qwen3Model"), "tokenizer": ("transformers", "Qwen2Tokenizer")}
    # ComfyUI's qwen_3_4b.safetensors and the diffusers folder: Qwen3 layers carry q_norm (Qwen2.5 ones do not)
    encoder_kinds = {"text_encoder": (("qwen3",), "layers.0.self_attn.q_norm.weight")}
    shipped_config = "z-image"
    block_lists = ("layers",)
    # attention and feed-forward of every block (refiners included), as ai-toolkit's and musubi-tuner's Z-Image
    # recipes train "all linear layers of the transformer blocks"
    default_targets: ClassVar[list[str]] = ["to_q", "to_k", "to_v", "to_out.0", "feed_forward.w1",
                                            "feed_forward.w2", "feed_forward.w3"]
    lora_loader_parts = ("transformer",)
    base_model_version = "z_image"
    modelspec_architecture = "z-image/lora"
    modelspec_implementation = "https://github.com/Tongyi-MAI/Z-Image"
    latent_downscale = 8
    image_patch = 2

    @classmethod
    def matches_header(cls, shapes: Mapping[str, tuple[int, ...]]) -> bool:
        # the original (Comfy-Org) layout: fused qkv, the caption embedder, and adaLN_modulation.0 in the joint
        # layers (Lumina 2, which shares the rest of the layout, has adaLN_modulation.1 there: diffusers' own test)
        names = strip_prefix(shapes)
        return all(key in names for key in ("cap_embedder.1.weight", "layers.0.attention.qkv.weight",
                                            "layers.0.adaLN_modulation.0.weight"))

    # --- prompts -------------------------------------------------------------------------------------------------
    @property
    def text_length(self) -> int:
        return min(self.cfg.text_max_length or PIPELINE_MAX_LENGTH, PIPELINE_MAX_LENGTH)

    @property
    def token_keys(self) -> tuple[str, ...]:
        return ("input_ids", "attention_mask")

    def tokenize(self, tokenizers: list[Any], prompt: str) -> dict[str, torch.Tensor]:
        """The prompt in the tokenizer's own chat template (as ``ZImagePipeline._encode_prompt`` renders it),
        padded to ``text_max_length`` so batches stack."""
        tokenizer = tokenizers[0]
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True, enable_thinking=True)
        out = tokenizer(text, padding="max_length", truncation=True, max_length=self.text_length,
                        return_tensors="pt")
        return {"input_ids": out.input_ids[0], "attention_mask": out.attention_mask[0]}

    def max_tokens(self, tokenizer: Any, index: int) -> int:
        return self.text_length

    def encode_prompt(self, text_encoders: list[torch.nn.Module], tokens: Mapping[str, torch.Tensor]
                      ) -> dict[str, torch.Tensor]:
        """The second-to-last hidden state, zeros past the valid tokens, and their mask. The pipeline keeps only
        the valid rows (a list); :meth:`denoise` does the same, so the fixed length (needed to cache and stack)
        never reaches the transformer. The encoder is causal: right padding does not change the valid rows."""
        mask = tokens["attention_mask"]
        hidden = text_encoders[0](input_ids=tokens["input_ids"], attention_mask=mask.bool(),
                                  output_hidden_states=True).hidden_states[-2]
        return {"prompt_embeds": hidden * mask[..., None].to(hidden.dtype), "prompt_mask": mask.long()}

    def meta_tokens(self, components: Components, batch_size: int) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.zeros(batch_size, self.text_length, dtype=torch.long),
                "attention_mask": torch.ones(batch_size, self.text_length, dtype=torch.long)}

    def meta_conditioning(self, components: Components, batch_size: int) -> dict[str, torch.Tensor]:
        hidden = components.extra["text_configs"][0].hidden_size
        return {"prompt_embeds": torch.zeros(batch_size, self.text_length, hidden),
                "prompt_mask": torch.ones(batch_size, self.text_length, dtype=torch.long)}

    # --- objective and denoiser ----------------------------------------------------------------------------------
    def denoise(self, denoiser: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The transformer called as ``ZImagePipeline`` calls it: one ``(C, 1, H, W)`` latent and one
        ``(tokens, hidden)`` caption per sample, timestep ``1 - sigma``. The pipeline integrates the negated
        output, so the negation here makes the prediction the velocity ``noise - x0`` the objective targets."""
        dtype = denoiser.dtype
        mask = cond["prompt_mask"].bool()
        captions = [rows.to(dtype) for rows in _valid_rows(cond["prompt_embeds"], mask)]
        latents = list(noisy.to(dtype).unsqueeze(2).unbind(0))
        out = denoiser(latents, (1 - timesteps).to(dtype), captions, return_dict=False)[0]
        return -torch.stack(out).squeeze(2)

    # --- sampling ------------------------------------------------------------------------------------------------
    def pipeline(self, components: Components, denoiser: torch.nn.Module, text_encoders: list[torch.nn.Module]):
        from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

        return ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(components.scheduler.config),
                              vae=components.vae, text_encoder=text_encoders[0], tokenizer=components.tokenizers[0],
                              transformer=denoiser)

    # --- export --------------------------------------------------------------------------------------------------
    def single_file_name(self, module: str) -> str:
        """``diffusion_model.`` + the diffusers path: ComfyUI's ``model_lora_keys_unet`` (Lumina2 branch, built from
        ``comfy.utils.z_image_to_diffusers``) maps exactly these names, to_q/to_k/to_v onto slices of its fused
        ``attention.qkv`` and to_out.0 onto ``attention.out``; diffusers' Z-Image converter reads them too."""
        return "diffusion_model." + module


def _valid_rows(embeds: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Each sample's caption rows where the mask is set. The memory estimate runs on fake tensors, where a
    data-dependent selection cannot run; there the mask is all ones (:meth:`ZImage.meta_conditioning`), so every
    row is valid and the full length is the worst case the estimate wants."""
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(mask):
        return list(embeds.unbind(0))
    return [rows[valid] for rows, valid in zip(embeds, mask)]


FAMILY = ZImage

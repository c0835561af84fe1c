"""Training objectives of the image families: DDPM (epsilon / v-prediction UNets: SD 1.x/2.x, SDXL) and rectified
flow matching (the transformer families: SD3, FLUX.1, Chroma, Qwen-Image, Z-Image).

Both draw everything per sample from that sample's own ``torch.Generator`` (noise first, then the timestep, then the
offset noise), so a loss does not depend on batch layout, process count or resume. The flow-matching timestep
density and loss weights are diffusers' own helpers (``diffusers.training_utils``), called once per sample with its
generator; the resolution-dependent shift is the scheduler's own ``time_shift`` with FLUX's ``calculate_shift``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ...errors import ConfigError


@dataclass
class NoisedBatch:
    """What one training step feeds the denoiser and compares its output with."""

    noisy: torch.Tensor
    timesteps: torch.Tensor  # DDPM: integer steps; flow matching: sigmas in [0, 1]
    target: torch.Tensor
    weights: torch.Tensor | None = None  # per-sample loss weights, or None for all ones


def min_snr_weights(scheduler: Any, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): min(SNR, gamma) / SNR for epsilon targets,
    min(SNR, gamma) / (SNR + 1) for v-prediction."""
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alphas / (1 - alphas)
    clipped = torch.clamp(snr, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def _offset_noise(noise: torch.Tensor, generators: Sequence[torch.Generator], strength: float) -> torch.Tensor:
    """Offset noise (one value per channel), drawn after everything else so turning it on changes no other draw."""
    if not strength:
        return noise
    shape = noise.shape[1:]
    offsets = torch.stack([torch.randn(shape[0], *([1] * (len(shape) - 1)), generator=g) for g in generators])
    return noise + strength * offsets.to(noise.device)


class DDPMObjective:
    """MSE to the scheduler's target (``epsilon`` -> noise, ``v_prediction`` -> velocity) at a uniform timestep."""

    def __init__(self, scheduler: Any, cfg: Any) -> None:
        prediction_type = scheduler.config.prediction_type
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(f"base_model: scheduler prediction_type '{prediction_type}' is not supported")
        self.scheduler = scheduler
        self.noise_offset = cfg.noise_offset
        self.min_snr_gamma = cfg.min_snr_gamma

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    def noise(self, latents: torch.Tensor, generators: Sequence[torch.Generator]) -> NoisedBatch:
        shape, device = latents.shape[1:], latents.device
        noise = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)
        num_timesteps = self.scheduler.config.num_train_timesteps
        timesteps = torch.cat([torch.randint(0, num_timesteps, (1,), generator=g) for g in generators]).to(device)
        noise = _offset_noise(noise, generators, self.noise_offset)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        if self.prediction_type == "epsilon":
            target = noise
        else:
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        weights = min_snr_weights(self.scheduler, timesteps, self.min_snr_gamma) if self.min_snr_gamma else None
        return NoisedBatch(noisy, timesteps, target, weights)


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                    max_shift: float = 1.15) -> float:
    """FLUX's ``mu``: the log-shift grows linearly with the number of image tokens (diffusers' pipelines define the
    same function; it is not exported from one place, so it is restated here)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


class FlowMatchingObjective:
    """Rectified flow: ``x_t = (1 - sigma) * x0 + sigma * noise``, target velocity ``noise - x0``.

    ``sigma`` is drawn per sample from ``timestep_sampling`` (``uniform``, ``logit_normal`` with ``logit_mean`` /
    ``logit_std``, or SD3's ``mode`` with ``mode_scale``), then shifted: by ``timestep_shift`` when set, else as the
    family's scheduler does at inference (FLUX: by resolution, ``use_dynamic_shifting``; SD3: its fixed ``shift``).
    Loss weights: ``loss_weighting`` ``none``, ``sigma_sqrt`` or ``cosmap``.
    """

    def __init__(self, scheduler_config: Any, cfg: Any) -> None:
        self.config = dict(scheduler_config)
        self.sampling = cfg.timestep_sampling
        self.logit_mean, self.logit_std, self.mode_scale = cfg.logit_mean, cfg.logit_std, cfg.mode_scale
        self.fixed_shift = cfg.timestep_shift
        self.weighting = cfg.loss_weighting
        self.noise_offset = cfg.noise_offset

    def shift(self, sigmas: torch.Tensor, image_seq_len: int) -> torch.Tensor:
        """Sigmas after the shift for an image of ``image_seq_len`` tokens (after patching)."""
        if self.fixed_shift is not None:
            shift = float(self.fixed_shift)
        elif self.config.get("use_dynamic_shifting"):
            mu = calculate_shift(image_seq_len, self.config.get("base_image_seq_len", 256),
                                 self.config.get("max_image_seq_len", 4096), self.config.get("base_shift", 0.5),
                                 self.config.get("max_shift", 1.15))
            if self.config.get("time_shift_type", "exponential") == "linear":
                return mu / (mu + (1 / sigmas - 1))
            return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
        else:
            shift = float(self.config.get("shift", 1.0))
        return shift * sigmas / (1 + (shift - 1) * sigmas)

    def draw_sigmas(self, generators: Sequence[torch.Generator], image_seq_len: int) -> torch.Tensor:
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = torch.cat([compute_density_for_timestep_sampling(
            self.sampling, 1, logit_mean=self.logit_mean, logit_std=self.logit_std, mode_scale=self.mode_scale,
            generator=g) for g in generators])
        # u = 0 would give a clean sample and a 1/0 in the shift; u = 1 pure noise: both are measure-zero draws
        return self.shift(u.clamp(1e-6, 1.0), image_seq_len)

    def noise(self, latents: torch.Tensor, generators: Sequence[torch.Generator], image_seq_len: int) -> NoisedBatch:
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        shape, device = latents.shape[1:], latents.device
        noise = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device, latents.dtype)
        sigmas = self.draw_sigmas(generators, image_seq_len).to(device)
        noise = _offset_noise(noise, generators, self.noise_offset)
        s = sigmas.view(-1, *([1] * len(shape))).to(latents.dtype)
        noisy = (1 - s) * latents + s * noise
        weights = None
        if self.weighting != "none":
            weights = compute_loss_weighting_for_sd3(self.weighting, sigmas).float()
        return NoisedBatch(noisy, sigmas, noise - latents, weights)

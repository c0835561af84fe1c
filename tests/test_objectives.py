"""The flow-matching objective against diffusers' own helpers and scheduler: timestep densities
(compute_density_for_timestep_sampling), the shift (FlowMatchEulerDiscreteScheduler.set_timesteps with FLUX's mu, or
its fixed shift), the noising (scale_noise) and the loss weights (compute_loss_weighting_for_sd3)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from lora_scripts.tasks.image.objectives import FlowMatchingObjective, calculate_shift


def _cfg(**overrides):
    values = dict(timestep_sampling="uniform", logit_mean=0.0, logit_std=1.0, mode_scale=1.29, timestep_shift=None,
                  loss_weighting="none", noise_offset=0.0)
    values.update(overrides)
    return SimpleNamespace(**values)


def _generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                      base_image_seq_len=256, max_image_seq_len=4096)
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal", "mode"])
def test_densities_are_diffusers_per_sample(sampling):
    seeds = [3, 17, 99, 1234]
    objective = FlowMatchingObjective({"shift": 1.0}, _cfg(timestep_sampling=sampling, logit_mean=0.3, logit_std=0.8))
    ours = objective.draw_sigmas(_generators(seeds), image_seq_len=64)
    theirs = torch.cat([compute_density_for_timestep_sampling(sampling, 1, logit_mean=0.3, logit_std=0.8,
                                                              mode_scale=1.29, generator=g) for g in _generators(seeds)])
    torch.testing.assert_close(ours, theirs.clamp(1e-6, 1.0), rtol=0, atol=0)


@pytest.mark.parametrize("scheduler, seq_len", [(FLUX_SCHEDULER, 1024), (FLUX_SCHEDULER, 4096), (SD3_SCHEDULER, 4096)])
def test_shift_and_noising_equal_the_scheduler(scheduler, seq_len):
    """FLUX: the scheduler's dynamic shift at mu = calculate_shift(tokens); SD3: its fixed shift. The noised latents
    equal scale_noise at the same sigmas."""
    sched = FlowMatchEulerDiscreteScheduler(**scheduler)
    objective = FlowMatchingObjective(sched.config, _cfg(timestep_sampling="logit_normal"))
    seeds = [1, 2, 3]
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    # each sample's generator draws its noise, then its timestep: the same order here
    gens = _generators(seeds)
    noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in gens])
    u = torch.cat([compute_density_for_timestep_sampling("logit_normal", 1, logit_mean=0.0, logit_std=1.0,
                                                         generator=g) for g in gens])
    mu = calculate_shift(seq_len) if scheduler.get("use_dynamic_shifting") else None
    sched.set_timesteps(sigmas=u.tolist(), mu=mu)
    drawn = objective.noise(latents, _generators(seeds), image_seq_len=seq_len)
    torch.testing.assert_close(drawn.timesteps, sched.sigmas[:-1].float(), rtol=1e-5, atol=1e-6)
    for i in range(3):
        expected = sched.scale_noise(latents[i:i + 1], sched.timesteps[i:i + 1], noise[i:i + 1])
        torch.testing.assert_close(drawn.noisy[i:i + 1], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(drawn.target, noise - latents)


def test_flux_mu_is_the_pipelines():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift as pipeline_shift

    for tokens in (256, 1024, 4096, 6000):
        assert calculate_shift(tokens) == pytest.approx(pipeline_shift(tokens))


def test_a_fixed_timestep_shift_overrides_the_scheduler():
    objective = FlowMatchingObjective(FLUX_SCHEDULER, _cfg(timestep_shift=3.0))
    sd3 = FlowMatchingObjective(SD3_SCHEDULER, _cfg())
    seeds = [4, 5]
    torch.testing.assert_close(objective.draw_sigmas(_generators(seeds), 4096), sd3.draw_sigmas(_generators(seeds), 64))


@pytest.mark.parametrize("weighting", ["sigma_sqrt", "cosmap"])
def test_loss_weights_are_diffusers(weighting):
    objective = FlowMatchingObjective(SD3_SCHEDULER, _cfg(loss_weighting=weighting))
    drawn = objective.noise(torch.zeros(2, 4, 4, 4), _generators([7, 8]), image_seq_len=16)
    torch.testing.assert_close(drawn.weights, compute_loss_weighting_for_sd3(weighting, drawn.timesteps).float())


def test_draws_are_per_sample_so_batching_does_not_matter():
    objective = FlowMatchingObjective(FLUX_SCHEDULER, _cfg(timestep_sampling="logit_normal", noise_offset=0.1))
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    whole = objective.noise(latents, _generators([10, 11, 12, 13]), 64)
    halves = [objective.noise(latents[i:i + 2], _generators([10 + i, 11 + i]), 64) for i in (0, 2)]
    torch.testing.assert_close(whole.noisy, torch.cat([h.noisy for h in halves]), rtol=0, atol=0)
    torch.testing.assert_close(whole.timesteps, torch.cat([h.timesteps for h in halves]), rtol=0, atol=0)

"""Preference losses (DPO, ORPO, SimPO, KTO) as TRL 1.16 computes them, per example, so the one loop can sum them
and divide by the example count of the whole accumulated batch like any other loss.

The reference model of DPO and KTO is the base model: the same PeftModel with its adapter disabled
(``disable_adapter()``), so no second copy is held in memory. Tested against TRL's own code on the same batch
(tests/test_text_preference.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probability of the labelled (completion) tokens and how many there are."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != IGNORE_INDEX
    per_token = torch.gather(logits.log_softmax(-1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (per_token * mask).sum(-1), mask.sum(-1)


def dpo_losses(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
               beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO's sigmoid loss per pair, and the implicit rewards beta * (logp - ref logp) of chosen and rejected."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stably (as TRL's log1mexp)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_losses(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, beta: float) -> tuple[torch.Tensor, ...]:
    """ORPO's odds-ratio term per pair, -beta * log sigmoid(log odds) (the NLL on chosen is added by the caller),
    and rewards beta * average logp."""
    log_odds = (chosen_avg - rejected_avg) - (_log1mexp(chosen_avg) - _log1mexp(rejected_avg))
    return -beta * F.logsigmoid(log_odds), beta * chosen_avg.detach(), beta * rejected_avg.detach()


def simpo_losses(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, beta: float,
                 gamma: float) -> tuple[torch.Tensor, ...]:
    """SimPO (TRL's CPO with loss_type simpo, cpo_alpha 0): -log sigmoid(beta * (avg logp margin) - gamma)."""
    logits = (chosen_avg - rejected_avg) - gamma / beta
    return -F.logsigmoid(beta * logits), beta * chosen_avg.detach(), beta * rejected_avg.detach()


def kto_losses(logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl_logps: torch.Tensor,
               ref_kl_logps: torch.Tensor, beta: float, desirable_weight: float = 1.0,
               undesirable_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KTO per example (Eq. 7 of the paper): the KL reference point is the clamped mean log-ratio of mismatched
    prompt/completion pairs, detached. Returns (losses in [desirable..., undesirable...] order, rewards, kl)."""
    kl = (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)
    ratio = logps - ref_logps
    chosen, rejected = ratio[desirable], ratio[~desirable]
    losses = torch.cat([desirable_weight * (1 - torch.sigmoid(beta * (chosen - kl))),
                        undesirable_weight * (1 - torch.sigmoid(beta * (kl - rejected)))])
    return losses, beta * ratio.detach(), kl

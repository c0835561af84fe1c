"""One micro-batch of preference training: policy and reference forwards, the objective's loss *sum* and the
reward metrics (TRL's names: rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies)."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

from .preference import IGNORE_INDEX, dpo_losses, kto_losses, orpo_losses, sequence_logps, simpo_losses


def _forward_logps(model: torch.nn.Module, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor,
                                                                                      torch.Tensor]:
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    logps, counts = sequence_logps(logits, labels)
    return logps, counts, logits


def _reference(model: torch.nn.Module):
    """The base model: the adapter disabled on the same PeftModel (unwrapping DDP), without gradients."""
    inner = getattr(model, "module", model)
    return inner, (inner.disable_adapter() if hasattr(inner, "disable_adapter") else nullcontext())


def preference_loss(cfg: Any, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor,
                                                                                                dict[str, float]]:
    """The summed loss of the micro-batch's pairs (or KTO examples) and the mean reward metrics."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    logps, counts, logits = _forward_logps(model, ids, mask, labels)
    objective, beta = cfg.objective, cfg.beta
    if objective in ("dpo", "kto"):
        inner, disabled = _reference(model)
        with torch.no_grad(), disabled:
            ref_logps = _forward_logps(inner, ids, mask, labels)[0]
            if objective == "kto":
                kl_logps = _forward_logps(inner, batch["kl_input_ids"], batch["kl_attention_mask"], batch["kl_labels"])[0]
        if objective == "kto":
            with torch.no_grad():  # the KL reference point is detached (TRL computes it without gradients too)
                policy_kl = _forward_logps(model, batch["kl_input_ids"], batch["kl_attention_mask"],
                                           batch["kl_labels"])[0]
            desirable = batch["kto_label"].bool()
            losses, rewards, kl = kto_losses(logps, ref_logps, desirable, policy_kl, kl_logps, beta,
                                             cfg.desirable_weight, cfg.undesirable_weight)
            metrics = {"kl": kl.item()}
            if desirable.any():
                metrics["rewards/chosen"] = rewards[desirable].mean().item()
            if (~desirable).any():
                metrics["rewards/rejected"] = rewards[~desirable].mean().item()
            return losses.sum(), metrics
        pairs = ids.shape[0] // 2
        losses, chosen_r, rejected_r = dpo_losses(logps[:pairs], logps[pairs:], ref_logps[:pairs], ref_logps[pairs:],
                                                  beta)
        total = losses.sum()
    else:
        pairs = ids.shape[0] // 2
        avg = logps / counts.clamp(min=1)
        if objective == "orpo":
            losses, chosen_r, rejected_r = orpo_losses(avg[:pairs], avg[pairs:], beta)
            # ORPO adds the NLL of the chosen answers, a token mean over the micro-batch as in TRL (times the pair
            # count, because the loop divides the sum by the pairs)
            chosen_logits, chosen_labels = logits[:pairs, :-1].float(), labels[:pairs, 1:]
            nll = torch.nn.functional.cross_entropy(chosen_logits.reshape(-1, chosen_logits.shape[-1]),
                                                    chosen_labels.reshape(-1), ignore_index=IGNORE_INDEX)
            total = losses.sum() + pairs * nll
        else:
            losses, chosen_r, rejected_r = simpo_losses(avg[:pairs], avg[pairs:], beta, cfg.simpo_gamma)
            total = losses.sum()
    metrics = {"rewards/chosen": chosen_r.mean().item(), "rewards/rejected": rejected_r.mean().item(),
               "rewards/margins": (chosen_r - rejected_r).mean().item(),
               "rewards/accuracies": (chosen_r > rejected_r).float().mean().item()}
    return total, metrics

"""Preference training (issue 16 point 5): DPO, ORPO, SimPO and KTO losses equal TRL's own code on the same batch,
and a DPO run goes through the one loop, logs rewards and resumes bit-exactly."""

from __future__ import annotations

import json
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from lora_scripts.config import build_config
from lora_scripts.data import text as td
from lora_scripts.data.preference import collate_preferences, tokenize_preferences
from lora_scripts.tasks.preference_loss import preference_loss
from lora_scripts.testing import CHATML_JINJA, make_tiny_causal_lm
from lora_scripts.train.loop import train

from .helpers import assert_same_tensors

PAIRS = [{"prompt": [{"role": "user", "content": "Name a colour."}], "chosen": "Blue.", "rejected": "Two plus three."},
         {"prompt": "Count to five.", "chosen": "One, two, three, four, five.", "rejected": "Cold."},
         {"instruction": "Say yes.", "input": "", "chosen": "Yes.", "rejected": "No, I will not say that."},
         {"prompt": "What is the capital of Italy?", "chosen": "The capital of Italy is Rome.", "rejected": "Rome?"}]
KTO = [{"prompt": "Name a colour.", "completion": "Blue.", "label": True},
       {"prompt": "Count to five.", "completion": "Cold.", "label": False},
       {"prompt": "Say yes.", "completion": "Yes.", "label": True},
       {"prompt": "Give the opposite word.\nhot", "completion": "Banana, mango and orange.", "label": False}]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return make_tiny_causal_lm(tmp_path_factory.mktemp("pref") / "lm", "llama", chat_template=CHATML_JINJA)


@pytest.fixture(scope="module")
def policy(lm):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(lm)
    # init_lora_weights=False: a non-zero adapter, so the policy differs from the reference (the base)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    return model.eval(), AutoTokenizer.from_pretrained(lm)


def _batch(tmp_path, tok, rows, objective):
    records = []
    for i, row in enumerate(rows):  # the alpaca row uses LLaMA-Factory's layout: its own file
        path = tmp_path / f"r{i}.jsonl"
        path.write_text(json.dumps(row) + "\n")
        records += td.load_records(path)
    samples = []
    for rec in records:
        samples += tokenize_preferences([rec], tok, objective)[0]
    return collate_preferences(samples, tok.pad_token_id)


def _per_token_logps(model, ids, mask, labels):
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    target = labels[:, 1:]
    lp = torch.gather(logits.log_softmax(-1), 2, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return lp * (target != -100)


class _FusedHead:
    """Stands in for TRL's fused-LM-head forward: per-token log-probs of the labels (0 where ignored)."""

    def __init__(self, model, per_token):
        self.model, self.per_token, self.training = model, per_token, False

    def __call__(self, input_ids, attention_mask, labels, **_):
        lp = self.per_token(input_ids, attention_mask, labels)
        zeros = torch.zeros_like(lp)
        return SimpleNamespace(log_probs=lp, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def _trainer_self(**attrs):
    acc = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)
    return SimpleNamespace(accelerator=acc, aux_loss_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)),
                           _total_train_tokens=0, _tp_size=1, label_smoothing=0.0, **attrs)


def test_dpo_loss_equals_trl(tmp_path, policy):
    from trl import DPOTrainer

    model, tok = policy
    batch = _batch(tmp_path, tok, PAIRS, "dpo")
    cfg = build_config({"task": "text", "base_model": "x/y", "metadata_path": "d.jsonl", "output_dir": "o",
                        "objective": "dpo", "beta": 0.3})
    with torch.no_grad():
        ours, metrics = preference_loss(cfg, model, batch)
        with model.disable_adapter():
            ref = _per_token_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"]).sum(-1)
        fused = _FusedHead(model, lambda i, m, labels: _per_token_logps(model, i, m, labels))
        fake = _trainer_self(model=fused, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
                             loss_types=["sigmoid"], loss_weights=[1.0], beta=0.3, use_weighting=False)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                  "completion_mask": (batch["labels"] != -100).long(), "ref_chosen_logps": ref[:4],
                  "ref_rejected_logps": ref[4:]}
        theirs = DPOTrainer._compute_loss(fake, fused, inputs, False)
    assert ours.item() / 4 == pytest.approx(theirs.item(), abs=1e-5)
    assert metrics["rewards/margins"] == pytest.approx(fake._metrics["eval"]["rewards/margins"][0], abs=1e-5)
    assert abs(ours.item() / 4 - 0.6931) > 1e-3  # policy != reference: the loss is not log 2


def _avg_logps(model, batch):
    lp = _per_token_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    return lp.sum(-1) / (batch["labels"][:, 1:] != -100).sum(-1)


def test_orpo_loss_equals_trl(tmp_path, policy):
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    model, tok = policy
    batch = _batch(tmp_path, tok, PAIRS, "orpo")
    cfg = build_config({"task": "text", "base_model": "x/y", "metadata_path": "d.jsonl", "output_dir": "o",
                        "objective": "orpo", "beta": 0.2})
    with torch.no_grad():
        ours, _ = preference_loss(cfg, model, batch)
        avg = _avg_logps(model, batch)
        fake = _trainer_self(beta=0.2)
        losses = ORPOTrainer.odds_ratio_loss(fake, avg[:4], avg[4:])[0]
        logits = model(input_ids=batch["input_ids"][:4], attention_mask=batch["attention_mask"][:4]).logits
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                batch["labels"][:4, 1:].reshape(-1), ignore_index=-100)
        theirs = nll - losses.mean()  # ORPOTrainer.get_batch_loss_metrics
    assert ours.item() / 4 == pytest.approx(theirs.item(), abs=1e-5)


def test_simpo_loss_equals_trl(tmp_path, policy):
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    model, tok = policy
    batch = _batch(tmp_path, tok, PAIRS, "simpo")
    cfg = build_config({"task": "text", "base_model": "x/y", "metadata_path": "d.jsonl", "output_dir": "o",
                        "objective": "simpo", "beta": 2.0, "simpo_gamma": 0.7})
    with torch.no_grad():
        ours, _ = preference_loss(cfg, model, batch)
        avg = _avg_logps(model, batch)
        fake = _trainer_self(beta=2.0, simpo_gamma=0.7, loss_type="simpo", alpha=0.0)
        theirs = CPOTrainer.cpo_loss(fake, avg[:4], avg[4:])[0].mean()  # cpo_alpha 0: no NLL term (SimPO)
    assert ours.item() / 4 == pytest.approx(theirs.item(), abs=1e-5)


def test_kto_loss_equals_trl(tmp_path, policy):
    from trl import KTOTrainer

    model, tok = policy
    batch = _batch(tmp_path, tok, KTO, "kto")
    cfg = build_config({"task": "text", "base_model": "x/y", "metadata_path": "d.jsonl", "output_dir": "o",
                        "objective": "kto", "beta": 0.5, "undesirable_weight": 1.5})
    assert batch["kto_label"].tolist() == [True, False, True, False]
    with torch.no_grad():
        ours, _ = preference_loss(cfg, model, batch)
        kl_args = (batch["kl_input_ids"], batch["kl_attention_mask"], batch["kl_labels"])
        policy_kl = _per_token_logps(model, *kl_args).sum(-1)
        with model.disable_adapter():
            ref = _per_token_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"]).sum(-1)
            ref_kl = _per_token_logps(model, *kl_args).sum(-1)
        fused = _FusedHead(model, lambda i, m, labels: _per_token_logps(model, i, m, labels))
        fake = _trainer_self(model=fused, precompute_ref_logps=True, calculate_KL=True, loss_type="kto", beta=0.5,
                             desirable_weight=1.0, undesirable_weight=1.5, _compute_kl_logps=lambda m, b: policy_kl)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                  "completion_mask": (batch["labels"] != -100).long(), "label": batch["kto_label"],
                  "ref_logps": ref, "ref_KL_logps": ref_kl}
        theirs = KTOTrainer._compute_loss(fake, fused, inputs, False)
    assert ours.item() / 4 == pytest.approx(theirs.item(), abs=1e-5)


def _dpo_cfg(lm, tmp_path, output, **overrides):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS if "prompt" in r) * 2)
    raw = {"task": "text", "base_model": str(lm), "metadata_path": str(data), "output_dir": str(tmp_path / output),
           "objective": "dpo", "lora_rank": 4, "batch_size": 2, "max_train_steps": 4, "save_steps": 2,
           "learning_rate": 1e-2, "lora_dropout": 0.1, "max_seq_length": 96, "logging": {"tensorboard": False}}
    raw.update(overrides)
    return build_config(raw)


def test_dpo_run_logs_rewards_and_resumes_bit_exactly(lm, tmp_path):
    straight = train(_dpo_cfg(lm, tmp_path, "straight"), show_progress=False)
    train(_dpo_cfg(lm, tmp_path, "split", max_train_steps=2), show_progress=False)
    train(_dpo_cfg(lm, tmp_path, "split", resume="latest"), show_progress=False)
    assert_same_tensors(tmp_path / "straight/checkpoints/step-4/adapter.safetensors",
                        tmp_path / "split/checkpoints/step-4/adapter.safetensors")
    lines = [json.loads(x) for x in (tmp_path / "straight/logs/metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= set(lines[-1])
    assert lines[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # step 1: the fresh adapter is the reference
    assert straight.final_loss < lines[0]["loss"]
    assert (tmp_path / "straight/adapter/adapter_model.safetensors").is_file()

"""Causal-LM LoRA (LLaMA, Qwen, GLM, ...): transformers model + peft LoRA, loss on assistant tokens.

The tokenizer is loaded and every sample tokenized in :meth:`TextTask.check_data`, before the model: template and
data mistakes cost seconds. Loss is the *sum* of token cross-entropies; the loop divides by the label-token count of
the whole accumulated global batch, so changing ``gradient_accumulation_steps`` at equal effective batch gives the
same gradient.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data.chat import generation_prompt_ids, resolve_template, stop_token_ids
from ..data.formats import load_dataset_info
from ..data.text import (
    IGNORE_INDEX,
    PackedRow,
    collate_flat,
    collate_padded,
    length_grouped_order,
    load_records,
    load_text_dataset,
    pack,
    tokenize_dataset,
)
from ..errors import ConfigError
from ..offload import enable_offloaded_checkpointing
from ..lora import make_lora_config
from ..models.checkpoint_file import first_line
from ..models.quantize import check_base_quantization, quantize_frozen, skip_quantized_in_ddp
from .base import DataSummary, RunInfo, SampleKey, Task, require_hub_id

# Attention projections per model family (what most LLM LoRA recipes target by default).
ATTENTION_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
DEFAULT_TARGET_MODULES = {
    "llama": ATTENTION_TARGETS, "qwen2": ATTENTION_TARGETS, "qwen3": ATTENTION_TARGETS, "mistral": ATTENTION_TARGETS,
    "glm": ATTENTION_TARGETS, "glm4": ATTENTION_TARGETS, "gemma": ATTENTION_TARGETS, "gemma2": ATTENTION_TARGETS,
    "phi3": ["qkv_proj", "o_proj"], "chatglm": ["query_key_value"], "gpt2": ["c_attn", "c_proj"],
}
LENGTH_GROUP = 8  # length_grouped_order sorts within groups of LENGTH_GROUP * 50 samples, independent of batch layout


class _ListDataset(Dataset):
    def __init__(self, items: list[Any]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: SampleKey) -> Any:
        return self.items[key[0]]


def _hub_or_folder(value: str, what: str, marker: str, trust_remote_code: bool = False) -> None:
    path = Path(value).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / marker).is_file():
            raise ConfigError(f"{what}: '{value}' is not a transformers model folder (no {marker})")
        from transformers import AutoConfig

        try:  # reads config.json only: a model that needs its own code is refused here, in `check`, not at load
            AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            raise _load_error(what, value, exc) from None
        return
    require_hub_id(value, what)


def _load_error(what: str, value: str, exc: Exception) -> ConfigError:
    if "trust_remote_code" in str(exc):  # transformers' refusal to run a model folder's own code
        return ConfigError(f"{what}: '{value}' needs its own Python code (a remote-code model such as ChatGLM3); "
                           "set trust_remote_code: true if you trust that code")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ConfigError(f"{what}: could not load '{value}': {first}")


def portable_base_name(base_model: str) -> str:
    """The hub id of ``base_model`` (as given, or read from a hub cache path ``models--org--name/snapshots/x``),
    else the local folder's name."""
    path = Path(base_model).expanduser()
    if not path.exists():
        return base_model  # a hub id
    for part in path.resolve().parts[::-1]:
        if part.startswith("models--") and part.count("--") >= 2:
            return part[len("models--"):].replace("--", "/", 1)
    return path.resolve().name


def qlora_config(compute_dtype: torch.dtype):
    """The QLoRA paper's settings: NF4 weights, double quantisation, compute in the run's precision (bf16 default)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if compute_dtype == torch.float32 else compute_dtype,
    )


class TextTask(Task):
    """LoRA on a causal language model."""

    name = "text"
    flatten_packed = False  # packed batches as one padding-free row (set with the attention that needs it)

    # --- checks (tokenizer, no model) ----------------------------------------------------------------------------
    def check_base_model(self) -> None:
        from ..config import check_environment

        check_environment(self.cfg)
        check_base_quantization(self.cfg)
        if self.cfg.blocks_to_swap:
            raise ConfigError("blocks_to_swap: block swap is for the image task's transformer families; for a causal "
                              "LM remove it and use gradient_checkpointing: offload, base_quantization or fsdp: true")
        _hub_or_folder(self.cfg.base_model, "base_model", "config.json", self.cfg.trust_remote_code)
        if self.cfg.network_weights is not None and not (Path(self.cfg.network_weights) / "adapter_config.json").is_file():
            raise ConfigError(f"network_weights: '{self.cfg.network_weights}' is not a PEFT adapter folder "
                              "(no adapter_config.json)")

    def _load_tokenizer(self) -> None:
        from transformers import AutoTokenizer, GenerationConfig

        cfg = self.cfg
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(cfg.base_model, trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise _load_error("base_model", cfg.base_model, exc) from None
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        try:  # the model's own stop tokens (GLM: <|user|>, <|observation|>; Llama-3: <|eot_id|>)
            eos = GenerationConfig.from_pretrained(cfg.base_model).eos_token_id
        except (OSError, ValueError):
            eos = None
        extra = tuple(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.stop_ids = stop_token_ids(self.tokenizer, extra)
        variables = {} if cfg.enable_thinking is None else {"enable_thinking": cfg.enable_thinking}
        self.template_options = dict(chat_template=cfg.chat_template, stop_ids=extra, template_variables=variables)

    def _records(self):
        cfg = self.cfg
        columns, data_format, metadata = None, cfg.data_format, cfg.metadata_path
        if cfg.dataset_info is not None:
            metadata, fmt, columns, _ = load_dataset_info(cfg.dataset_info, cfg.dataset_name)
            data_format = fmt if data_format == "auto" else data_format
        records = load_text_dataset(cfg.train_data_dir if metadata is None else None, metadata)
        return records, columns, data_format

    def check_data(self) -> DataSummary:
        cfg = self.cfg
        self._load_tokenizer()
        records, columns, data_format = self._records()
        val_records = load_records(cfg.val_data) if cfg.val_data else []
        if not val_records and cfg.val_size > 0:
            count = int(cfg.val_size) if cfg.val_size >= 1 else max(1, round(cfg.val_size * len(records)))
            if count >= len(records):
                raise ConfigError(f"val_size: {cfg.val_size} leaves no training samples out of {len(records)} (lower "
                                  "val_size, or give val_data)")
            order = np.random.default_rng(cfg.seed).permutation(len(records))
            held = set(order[:count].tolist())
            val_records = [r for i, r in enumerate(records) if i in held]
            records = [r for i, r in enumerate(records) if i not in held]
        options = dict(data_format=data_format, max_seq_length=cfg.max_seq_length, columns=columns,
                       strict_fields=cfg.strict_fields, **self.template_options)
        if cfg.objective != "sft":
            from ..data.preference import tokenize_preferences

            if cfg.packing:
                raise ConfigError(f"packing: true is for objective: sft; {cfg.objective} compares whole answers "
                                  "(remove packing)")
            tokenize = functools.partial(tokenize_preferences, objective=cfg.objective)
        else:
            tokenize = functools.partial(tokenize_dataset, train_on_prompt=cfg.train_on_prompt)
        self.samples, self.stats = tokenize(records, self.tokenizer, **options)
        for warning in self.stats.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        self.val_samples = tokenize(val_records, self.tokenizer, **options)[0] if val_records else []
        self.rows: list[PackedRow] | None = pack(self.samples, cfg.max_seq_length) if cfg.packing else None
        digest = hashlib.sha256()
        for record in records:
            digest.update(json.dumps(record.data, sort_keys=True, default=str).encode())
        units = f", packed into {len(self.rows)} rows of <= {cfg.max_seq_length}" if self.rows is not None else ""
        truncated = " (raise max_seq_length to keep them whole)" if self.stats.truncated else ""
        return DataSummary(
            num_samples=len(self.rows) if self.rows is not None else len(self.samples),
            dataset_hash=digest.hexdigest(),
            description=f"{self.stats.summary()}{truncated}{units}"
            + (f"; {len(self.val_samples)} validation samples" if self.val_samples else ""),
        )

    def token_report(self, count: int) -> list[dict[str, Any]]:
        """The first ``count`` training sequences: ids, labels, and the text with trained spans in \u27e6 \u27e7
        (what ``lora-scripts check --show-tokens`` prints)."""
        out = []
        for sample in self.samples[:count]:
            parts, run, trained = [], [], None
            for token, label in zip(sample.input_ids, sample.labels):
                if (label != IGNORE_INDEX) != trained and run:
                    text = self.tokenizer.decode(run)
                    parts.append(f"\u27e6{text}\u27e7" if trained else text)
                    run = []
                trained = label != IGNORE_INDEX
                run.append(token)
            if run:
                text = self.tokenizer.decode(run)
                parts.append(f"\u27e6{text}\u27e7" if trained else text)
            out.append({"input_ids": sample.input_ids, "labels": sample.labels, "marked": "".join(parts),
                        "trained": sum(label != IGNORE_INDEX for label in sample.labels)})
        return out

    # --- model ---------------------------------------------------------------------------------------------------
    def load_model(self, device: torch.device, weight_dtype: torch.dtype) -> torch.nn.Module:
        from peft import PeftModel, get_peft_model
        from transformers import AutoModelForCausalLM

        cfg = self.cfg
        # nf4 (QLoRA) through transformers' own bitsandbytes loading; int8 / fp8 quantised after loading by
        # models/quantize.py, as the image task does
        nf4 = cfg.base_quantization == "nf4"
        try:
            model = AutoModelForCausalLM.from_pretrained(
                cfg.base_model, dtype=weight_dtype, trust_remote_code=cfg.trust_remote_code,
                **({"quantization_config": qlora_config(weight_dtype), "device_map": {"": device}} if nf4 else {}),
            )
        except (OSError, ValueError) as exc:
            raise _load_error("base_model", cfg.base_model, exc) from None
        model.requires_grad_(False)
        if cfg.packing:  # per-sample attention without an L x L mask (packed_attention.py says why and how)
            from .packed_attention import packed_attention_for, register

            if (attention := packed_attention_for(model.config, device, weight_dtype)) is not None:
                try:
                    model.set_attn_implementation(attention)
                except (ValueError, ImportError):  # flash-attn installed, but this model class does not support it
                    model.set_attn_implementation(attention := register())
                # both read samples from position ids in one padding-free row (a remote-code model keeps its own)
                self.flatten_packed = model.config._attn_implementation == attention
            from .packed_attention import leaks_across_samples

            try:
                leaks = leaks_across_samples(model, device)
            except Exception as exc:  # remote code that cannot run the probe (no input embeddings, other inputs)
                raise ConfigError(f"packing: could not check that {type(model).__name__} keeps packed samples apart "
                                  f"({type(exc).__name__}: {first_line(exc)}); set packing: false") from None
            if leaks:
                raise ConfigError(f"packing: {type(model).__name__} lets packed samples attend to each other (its "
                                  f"attention ignores the position ids that mark them); set packing: false")
        if nf4:
            from peft import prepare_model_for_kbit_training

            # casts norms to fp32 and makes inputs require grad, as QLoRA needs (and gradient checkpointing, if set)
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
        else:
            # the output head stays in full precision, as QLoRA keeps it (it is tied to the input embeddings in
            # many small models, and the logits are what the loss reads)
            head = model.get_output_embeddings()
            skip = tuple(name for name, module in model.named_modules() if module is head)
            quantize_frozen(model, cfg.base_quantization, device, weight_dtype, skip=skip)
        self.device = device
        if cfg.network_weights is not None:
            model = PeftModel.from_pretrained(model, str(cfg.network_weights), is_trainable=True)
        else:
            targets = cfg.target_modules or DEFAULT_TARGET_MODULES.get(model.config.model_type, "all-linear")
            lora = make_lora_config(cfg, targets, task_type="CAUSAL_LM")
            try:
                model = get_peft_model(model, lora)
            except ValueError as exc:
                raise ConfigError(f"target_modules: {exc}".splitlines()[0]) from None
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
        skip_quantized_in_ddp(model)
        self.model = model
        return model

    def memory_probe(self) -> tuple[list[torch.nn.Module], torch.nn.Module, Any]:
        from peft import get_peft_model
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = self.cfg
        try:
            config = AutoConfig.from_pretrained(cfg.base_model, trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise _load_error("base_model", cfg.base_model, exc) from None
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
        model.requires_grad_(False)
        targets = cfg.target_modules or DEFAULT_TARGET_MODULES.get(config.model_type, "all-linear")
        model = get_peft_model(model, make_lora_config(cfg, targets, task_type="CAUSAL_LM"))
        if cfg.gradient_checkpointing:
            self.enable_gradient_checkpointing(model)
        self.model, self.device = model, torch.device("cpu")
        length = cfg.max_seq_length  # the worst case: a full row

        def make_batch(batch_size: int) -> dict[str, Any]:
            ids = torch.zeros(batch_size, length, dtype=torch.long)
            batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
            if cfg.packing:  # no mask tensor: position ids mark the samples (collate_flat)
                del batch["attention_mask"]
                batch["position_ids"] = torch.arange(length).expand(batch_size, length).clone()
            return batch

        return [model], model, make_batch

    def enable_gradient_checkpointing(self, model: torch.nn.Module) -> None:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if self.cfg.gradient_checkpointing == "offload":
            enable_offloaded_checkpointing(model)

    # --- data ----------------------------------------------------------------------------------------------------
    def shard_classes(self, model: torch.nn.Module) -> list[str]:
        """The LM's decoder layers: the classes transformers names in ``_no_split_modules``."""
        names = list(getattr(model.get_base_model(), "_no_split_modules", None) or [])
        if not names:
            raise ConfigError(f"fsdp: {type(model.get_base_model()).__name__} does not name its decoder layers "
                              "(_no_split_modules); remove fsdp")
        return names

    def dataset(self, summary: DataSummary) -> Dataset:
        return _ListDataset(self.rows if self.rows is not None else self.samples)

    def validation_dataset(self) -> Dataset | None:
        return _ListDataset(self.val_samples) if self.val_samples else None

    def epoch_order(self, epoch: int, seed: int, global_batch: int) -> np.ndarray | None:
        if self.rows is not None:
            return None  # packed rows are already full; a plain shuffle
        lengths = [len(s) if not hasattr(s, "chosen") else len(s.chosen) + len(s.rejected or ()) for s in self.samples]
        return np.asarray(length_grouped_order(lengths, LENGTH_GROUP, np.random.default_rng([seed, epoch])))

    def collate(self, items: list[Any]) -> dict[str, Any]:
        pad = self.tokenizer.pad_token_id
        if isinstance(items[0], PackedRow):
            return collate_flat(items, pad, flatten=self.flatten_packed)
        if self.cfg.objective != "sft":
            from ..data.preference import collate_preferences

            return collate_preferences(items, pad)
        return collate_padded(items, pad)

    def loss_count(self, batch: dict[str, Any]) -> int:
        if self.cfg.objective == "kto":
            return int(batch["input_ids"].shape[0])  # examples
        if self.cfg.objective != "sft":
            return int(batch["input_ids"].shape[0] // 2)  # pairs
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def step_metrics(self) -> dict[str, float]:
        metrics = {k: v / max(self._metric_count, 1) for k, v in getattr(self, "_metrics", {}).items()}
        self._metrics, self._metric_count = {}, 0
        return metrics

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        if self.cfg.objective != "sft":
            from .preference_loss import preference_loss

            loss, metrics = preference_loss(self.cfg, model, {k: v.to(self.device) for k, v in batch.items()})
            if torch.is_grad_enabled():  # training steps only, not evaluation
                self._metrics = getattr(self, "_metrics", {})
                for name, value in metrics.items():
                    self._metrics[name] = self._metrics.get(name, 0.0) + value
                self._metric_count = getattr(self, "_metric_count", 0) + 1
            return loss
        inputs = {k: v.to(self.device) for k, v in batch.items() if k != "labels"}
        # use_cache=False: no KV cache in training (and a cache would let transformers re-derive masks)
        logits = model(**inputs, use_cache=False).logits
        labels = batch["labels"].to(self.device)
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="sum",
        )

    # --- samples and export --------------------------------------------------------------------------------------
    def prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of ``prompt`` as a user turn followed by the template's generation prompt."""
        opts = self.template_options
        template = resolve_template(self.tokenizer, opts["chat_template"], opts["stop_ids"],
                                    opts["template_variables"])
        return generation_prompt_ids([{"role": "user", "content": prompt}], self.tokenizer, template)

    def generate_samples(self, model: torch.nn.Module) -> list[tuple[str, Any]]:
        out = []
        for sample in self.cfg.sample_prompts:
            prompt = sample.prompt
            ids = torch.tensor([self.prompt_ids(prompt)], device=self.device)
            with torch.no_grad():
                generated = model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=self.cfg.sample_max_new_tokens,
                    do_sample=False, pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.stop_ids,
                )
            out.append((prompt, self.tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)))
        return out

    def export_warnings(self) -> list[str]:
        cfg, out = self.cfg, []
        if cfg.use_rslora:
            out.append("use_rslora: llama.cpp's convert_lora_to_gguf.py scales the adapter by alpha/r, not "
                       f"alpha/sqrt(r), so it would apply at {cfg.lora_rank ** -0.5:.2f}x strength there; give "
                       "llama.cpp a merged model (lora-scripts export --merge)")
        if cfg.use_dora:
            out.append("use_dora: llama.cpp's LoRA converter refuses DoRA's magnitude vectors and vLLM cannot load "
                       "DoRA adapters; give them a merged model (lora-scripts export --merge)")
        return out

    def export(self, model: torch.nn.Module, output_dir: Path, run: RunInfo) -> list[Path]:
        adapter_dir = output_dir / "adapter"
        model.save_pretrained(str(adapter_dir), safe_serialization=True)
        self.tokenizer.save_pretrained(str(adapter_dir))
        # base_model_name_or_path: what means something on another machine (a hub id, else the folder name);
        # the full local path stays in our own lora_scripts.json
        config_path = adapter_dir / "adapter_config.json"
        adapter_config = json.loads(config_path.read_text(encoding="utf-8"))
        adapter_config["base_model_name_or_path"] = portable_base_name(self.cfg.base_model)
        config_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True), encoding="utf-8")
        for warning in self.export_warnings():
            print(f"warning: {warning}", file=sys.stderr)
        local = Path(self.cfg.base_model).expanduser()
        provenance = {**run.provenance(), "steps": run.steps, "base_model": self.cfg.base_model,
                      # how the base was stored while training; export --merge merges into the full-precision base
                      "base_quantization": self.cfg.base_quantization,
                      "base_model_path": str(local.resolve()) if local.is_dir() else None,
                      "warnings": self.export_warnings()}
        (adapter_dir / "lora_scripts.json").write_text(json.dumps(provenance, indent=2), encoding="utf-8")
        return [adapter_dir / "adapter_model.safetensors", adapter_dir / "adapter_config.json"]

"""Merge a PEFT LoRA adapter into its base causal LM and save a plain transformers model."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError


def merge_text_adapter(adapter_dir: Path, output_dir: Path, base_model: str | None = None) -> Path:
    """Load base + adapter with peft, ``merge_and_unload``, save model and tokenizer to ``output_dir``.

    ``base_model`` defaults to the local path we recorded in ``lora_scripts.json`` when it still exists, else the
    adapter's own ``base_model_name_or_path`` (a hub id, or the folder name on another machine).
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config_path = Path(adapter_dir) / "adapter_config.json"
    if not config_path.is_file():
        raise ConfigError(f"--adapter: '{adapter_dir}' is not a PEFT adapter folder (no adapter_config.json)")
    ours = Path(adapter_dir) / "lora_scripts.json"
    recorded = json.loads(ours.read_text()).get("base_model_path") if ours.is_file() else None
    if base_model is None and recorded and Path(recorded).is_dir():
        base_model = recorded
    base = base_model or json.loads(config_path.read_text())["base_model_name_or_path"]
    try:
        model = AutoModelForCausalLM.from_pretrained(base)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"base model '{base}' could not be loaded ({str(exc).splitlines()[0]}); pass --base-model") from None
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    output_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(output_dir), safe_serialization=True)
    tokenizer_source = adapter_dir if (Path(adapter_dir) / "tokenizer_config.json").is_file() else base
    AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(str(output_dir))
    return output_dir

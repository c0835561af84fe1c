"""Load full-size SD 1.5, SD 2.1 and SDXL single-file checkpoints (all-zero, sparse: no disk or memory) through
load_single_file with the shipped configs, offline. Too slow for the test suite (a minute or so); run after
upgrading diffusers or editing lora_scripts/models/configs:

    HF_HUB_OFFLINE=1 python tools/verify_single_file_full_size.py [sd1 sd2 sdxl]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

from lora_scripts.models.single_file import SHIPPED_CONFIGS, load_single_file
from lora_scripts.testing import ldm_checkpoint_shapes, write_zero_safetensors


def main(families: list[str]) -> None:
    for family in families:
        with tempfile.TemporaryDirectory() as folder:
            path = write_zero_safetensors(ldm_checkpoint_shapes(SHIPPED_CONFIGS[family], family),
                                          Path(folder) / f"{family}.safetensors")
            start = time.perf_counter()
            parts = load_single_file(path, torch_dtype=torch.float16)
            sizes = {name: f"{sum(p.numel() for p in module.parameters()) / 1e6:.1f}M" for name, module in parts.items()
                     if isinstance(module, torch.nn.Module)}
            ids = parts["tokenizer"]("a photo of a cat").input_ids
            assert ids == [49406, 320, 1125, 539, 320, 2368, 49407], ids
            print(f"{family}: loaded in {time.perf_counter() - start:.1f}s {sizes} "
                  f"{type(parts['scheduler']).__name__}({parts['scheduler'].config.prediction_type})")


if __name__ == "__main__":
    main(sys.argv[1:] or ["sd1", "sd2", "sdxl"])

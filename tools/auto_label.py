#!/usr/bin/env python
"""Seed-compatible auto-labelling: ``python tools/auto_label.py --input data/style_train --output
data/style_train/metadata.csv`` (same options as ``lora-scripts label``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lora_scripts.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["label", *sys.argv[1:]]))

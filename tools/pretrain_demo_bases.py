"""Rebuild the small pretrained demo bases in ``lora_scripts/demo_assets`` (deterministic, offline, CPU).

    python tools/pretrain_demo_bases.py            # both, about 25 minutes of one CPU core
    python tools/pretrain_demo_bases.py --only lm  # just the causal LM
    python tools/pretrain_demo_bases.py --only sd --keep-vae  # the SD base's UNet and text encoder on the committed VAE

Bit for bit the committed files on the same torch build and CPU kind (single-threaded, fixed seeds); see
:mod:`lora_scripts.pretrain`.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import tempfile
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from lora_scripts.pretrain import LM_BASE, SD_BASE, pretrain_lm, pretrain_sd  # noqa: E402


def digest(folder: Path) -> str:
    """One sha256 over every weight file of ``folder`` (what "bit for bit" is checked against)."""
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*.safetensors")):
        h.update(path.relative_to(folder).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("sd", "lm"))
    parser.add_argument("--output", type=Path, help="write here instead of lora_scripts/demo_assets")
    parser.add_argument("--keep-vae", action="store_true",
                        help="sd: train the UNet and text encoder on the committed VAE instead of training a new one "
                             "(should another machine not give back the committed VAE, the rest is still rebuilt bit for bit from it)")
    args = parser.parse_args()
    committed_vae = None
    if args.keep_vae:  # copied away first: the target folder is replaced below
        committed_vae = Path(tempfile.mkdtemp())
        shutil.copytree(SD_BASE / "vae", committed_vae / "vae")
    for name, target, build in (("sd", SD_BASE, pretrain_sd), ("lm", LM_BASE, pretrain_lm)):
        if args.only not in (None, name):
            continue
        folder = args.output / target.name if args.output else target
        if folder.exists():
            shutil.rmtree(folder)
        t0 = time.time()
        print(f"pretraining {folder} ...", flush=True)
        if name == "sd":
            build(folder, log_every=100, vae_from=committed_vae)
        else:
            build(folder, log_every=100)
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        print(f"  {folder}: {size / 1e6:.2f} MB in {time.time() - t0:.0f} s, sha256 {digest(folder)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

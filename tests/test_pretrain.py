"""``tools/pretrain_demo_bases.py`` rebuilds the committed demo bases bit for bit: the same code on a shortened
schedule, run twice, gives byte-identical weight files (the full schedule takes minutes; the determinism does not
depend on its length)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from lora_scripts.pretrain import LM_BASE, SD_BASE, Schedule, pretrain_lm, pretrain_sd

SHORT = Schedule(vae_steps=2, unet_steps=2, lm_steps=3, batch_size=2, latent_pool=4)


def _weights(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.safetensors"))}


@pytest.fixture(autouse=True)
def _restore_torch_state():
    """Pretraining pins one thread and deterministic algorithms for the process: undo both for later tests."""
    import torch

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


@pytest.mark.parametrize("build", [pretrain_sd, pretrain_lm], ids=["sd", "lm"])
def test_pretraining_is_bit_for_bit_repeatable_and_changes_the_weights(tmp_path, build):
    first, second, other_seed = (build(tmp_path / name, SHORT, seed=seed)
                                 for name, seed in (("a", 0), ("b", 0), ("c", 1)))
    assert _weights(first) and _weights(first) == _weights(second)
    assert _weights(first) != _weights(other_seed)  # the hash would see a change


def test_the_committed_bases_are_there_and_small():
    for folder in (SD_BASE, LM_BASE):
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        assert _weights(folder) and size < 8e6, (folder, size)

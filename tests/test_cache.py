"""Latent and text-embedding caches: same losses as without, reuse across runs, invalidation by content and model."""

from __future__ import annotations

import csv

import pytest

from lora_scripts.config import load_config
from lora_scripts.errors import ConfigError
from lora_scripts.train.loop import train

from .helpers import assert_same_tensors


def losses(path):
    return [float(r["loss"]) for r in csv.DictReader(open(path / "logs" / "loss.csv"))]


def test_training_from_the_cache_gives_the_same_losses(write_config, tmp_path):
    common = dict(max_train_steps=4, trigger_word="sks", caption_dropout=0.3)
    train(load_config(write_config("a.yaml", output="plain", **common)), show_progress=False)
    from lora_scripts.train.loop import Trainer

    trainer = Trainer(load_config(write_config("b.yaml", output="cached", cache_latents=True,
                                               cache_text_embeddings=True, **common)), show_progress=False)
    trainer.run()
    item = trainer.dataset[(0, 123)]
    assert {"latent_mean", "latent_std", "hidden"} <= set(item) and not {"pixels", "input_ids"} & set(item)
    assert losses(tmp_path / "plain") == pytest.approx(losses(tmp_path / "cached"), abs=1e-5)
    assert_same_tensors(tmp_path / "plain/checkpoints/step-4/adapter.safetensors",
                        tmp_path / "cached/checkpoints/step-4/adapter.safetensors", atol=1e-5)
    assert len(list((tmp_path / "cached" / "cache" / "latents").iterdir())) == 6
    assert len(list((tmp_path / "cached" / "cache" / "text").iterdir())) == 7  # 6 captions (+ trigger) and ""


def test_cache_is_reused_and_invalidated_by_content(write_config, image_data, tmp_path):
    from PIL import Image

    shared = str(tmp_path / "shared-cache")
    train(load_config(write_config("a.yaml", output="r1", cache_latents=True, cache_dir=shared, max_train_steps=1)),
          show_progress=False)
    entries = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "shared-cache" / "latents").iterdir()}
    Image.new("RGB", (48, 48), (9, 9, 9)).save(image_data / "img_000.png")  # one image changes
    train(load_config(write_config("b.yaml", output="r2", cache_latents=True, cache_dir=shared, max_train_steps=1)),
          show_progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "shared-cache" / "latents").iterdir()}
    assert len(after) == 7 and set(entries) < set(after)  # one new entry, the old ones kept and not rewritten
    assert all(after[name] == mtime for name, mtime in entries.items())
    train(load_config(write_config("c.yaml", output="r3", cache_latents=True, cache_dir=shared, max_train_steps=1,
                                   resolution=16)), show_progress=False)
    assert len(list((tmp_path / "shared-cache" / "latents").iterdir())) == 13  # a new size: new keys


def test_cache_refuses_augmentation(write_config):
    with pytest.raises(ConfigError, match="random_crop"):
        train(load_config(write_config(cache_latents=True, random_flip=True)), show_progress=False)
    with pytest.raises(ConfigError, match="shuffle_tags"):
        train(load_config(write_config(cache_text_embeddings=True, shuffle_tags=True)), show_progress=False)


def test_cache_with_buckets(write_config, image_data, tmp_path):
    from PIL import Image

    Image.new("RGB", (48, 96), (30, 90, 200)).save(image_data / "tall.png")
    with open(image_data / "metadata.csv", "a") as fh:
        fh.write("tall.png,a tall panel\n")
    common = dict(resolution=48, bucket=True, bucket_step=16, max_train_steps=3, batch_size=1)
    train(load_config(write_config("a.yaml", output="plain", **common)), show_progress=False)
    train(load_config(write_config("b.yaml", output="cached", cache_latents=True, **common)), show_progress=False)
    assert losses(tmp_path / "plain") == pytest.approx(losses(tmp_path / "cached"), abs=1e-5)

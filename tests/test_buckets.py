"""Aspect-ratio buckets: bucket choice, batches that never mix buckets, training and layout independence."""

from __future__ import annotations

import numpy as np
from PIL import Image

from lora_scripts.config import load_config
from lora_scripts.data.buckets import assign_bucket, bucketed_order, make_buckets
from lora_scripts.testing import make_captioned_images
from lora_scripts.train.batches import BatchPlan
from lora_scripts.train.loop import Trainer, train

from .helpers import assert_same_tensors


def test_buckets_cover_aspects_within_the_area():
    buckets = make_buckets(512, 64)
    assert (512, 512) in buckets and (768, 320) in buckets and (320, 768) in buckets
    assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in buckets)
    assert assign_bucket(1200, 800, buckets) == (640, 384)  # 3:2 lands in the nearest-aspect bucket
    assert assign_bucket(800, 800, buckets) == (512, 512)
    assert assign_bucket(300, 200, buckets, step=64, no_upscale=True) == (256, 192)  # small: never enlarged
    assert assign_bucket(300, 200, buckets, step=64) == (640, 384)


def test_batches_never_mix_buckets_and_cover_every_sample():
    bucket_of = [(64, 32)] * 5 + [(32, 64)] * 3 + [(48, 48)] * 1
    order = bucketed_order(bucket_of, 2, np.random.default_rng(0))
    assert len(order) % 2 == 0 and set(order) == set(range(9))
    for i in range(0, len(order), 2):
        assert len({bucket_of[j] for j in order[i : i + 2]}) == 1
    plan = BatchPlan(9, 1, 2, 1, seed=0, order_fn=lambda e, s, g: bucketed_order(bucket_of, g, np.random.default_rng([s, e])))
    for epoch in range(2):
        for r0, r1 in zip(plan.micro_batches(epoch, 0), plan.micro_batches(epoch, 1)):
            assert bucket_of[r0[0][0]] == bucket_of[r1[0][0]]  # the two processes train the same bucket


def mixed_aspect_data(folder):
    make_captioned_images(folder, count=6, size=48)  # landscape-ish (48..71 x 48)
    for i in range(3):
        Image.new("RGB", (48, 96), (30 * i, 90, 200)).save(folder / f"tall_{i}.png")
    with open(folder / "metadata.csv", "a") as fh:
        fh.writelines(f"tall_{i}.png,a tall blue panel\n" for i in range(3))
    return folder


def test_training_with_buckets_uses_non_square_batches(write_config, image_data):
    mixed_aspect_data(image_data)
    cfg = load_config(write_config(resolution=48, bucket=True, bucket_step=16, batch_size=2, max_train_steps=4))
    trainer = Trainer(cfg, show_progress=False)
    trainer.run()
    assert set(trainer.task._buckets) >= {(32, 64)}  # the 1:2 images got a tall bucket
    shapes = {tuple(trainer.dataset[key]["pixels"].shape) for batch in trainer.plan.micro_batches(0, 0) for key in batch}
    assert (3, 64, 32) in shapes


def test_buckets_two_processes_equal_one(write_config, image_data, tmp_path):
    from .helpers import run_torchrun

    mixed_aspect_data(image_data)
    common = dict(resolution=48, bucket=True, bucket_step=16, max_train_steps=3)
    train(load_config(write_config("a.yaml", output="one", batch_size=2, **common)), show_progress=False)
    config = write_config("b.yaml", output="two", batch_size=1, **common)
    proc = run_torchrun(config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_tensors(tmp_path / "one/checkpoints/step-3/adapter.safetensors",
                        tmp_path / "two/checkpoints/step-3/adapter.safetensors", atol=1e-5)

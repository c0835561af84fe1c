"""Image loading and metadata parsing; the batch plan that makes runs layout-independent."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lora_scripts.data.images import check_image_dataset, load_image_tensor, read_metadata
from lora_scripts.train.batches import BatchPlan


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK", "I;16", "LA", "1"])
def test_any_pil_mode_becomes_rgb_square(tmp_path, mode):
    path = tmp_path / f"img.{'tiff' if mode in ('CMYK', 'I;16') else 'png'}"
    Image.new("RGB", (40, 24), (200, 30, 30)).convert(mode).save(path)
    array = load_image_tensor(path, 16, np.random.default_rng(0))
    assert array.shape == (3, 16, 16) and array.dtype == np.float32
    assert array.min() >= -1.0 and array.max() <= 1.0


def test_transparent_pixels_become_white(tmp_path):
    path = tmp_path / "t.png"
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(path)
    assert np.allclose(load_image_tensor(path, 8, np.random.default_rng(0)), 1.0)


def test_centre_crop_and_seeded_random_crop_flip(tmp_path):
    path = tmp_path / "wide.png"
    img = Image.new("RGB", (64, 16), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 16, 16))  # white block at the far left
    img.save(path)
    centre = load_image_tensor(path, 16, np.random.default_rng(0))
    assert centre.mean() < -0.9  # the centre crop misses the white block
    crops = {load_image_tensor(path, 16, np.random.default_rng(s), random_crop=True).mean().round(3) for s in range(20)}
    assert len(crops) > 1
    a = load_image_tensor(path, 16, np.random.default_rng(7), random_crop=True, random_flip=True)
    b = load_image_tensor(path, 16, np.random.default_rng(7), random_crop=True, random_flip=True)
    assert np.array_equal(a, b)


def test_metadata_columns_in_any_order_with_quotes_and_bom(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "b c.png")
    (tmp_path / "metadata.csv").write_text('\ufeffprompt,filename\n"oil painting, Van Gogh style",a.png\n\nsketch,b c.png\n',
                                           encoding="utf-8")
    samples = read_metadata(tmp_path, tmp_path / "metadata.csv")
    assert [(s.path.name, s.prompt) for s in samples] == [("a.png", "oil painting, Van Gogh style"), ("b c.png", "sketch")]


def test_dataset_hash_changes_with_content(image_data):
    first = check_image_dataset(image_data, image_data / "metadata.csv").dataset_hash
    assert first == check_image_dataset(image_data, image_data / "metadata.csv").dataset_hash
    Image.new("RGB", (48, 48), (1, 2, 3)).save(image_data / "img_000.png")
    assert first != check_image_dataset(image_data, image_data / "metadata.csv").dataset_hash


def test_batch_plan_is_layout_independent():
    one = BatchPlan(num_samples=7, batch_size=4, world_size=1, accumulation=1, seed=3)
    two = BatchPlan(num_samples=7, batch_size=2, world_size=2, accumulation=1, seed=3)
    assert one.steps_per_epoch == two.steps_per_epoch == 2
    for epoch in range(3):
        whole = one.micro_batches(epoch, rank=0)
        r0, r1 = two.micro_batches(epoch, rank=0), two.micro_batches(epoch, rank=1)
        assert [a + b for a, b in zip(r0, r1)] == whole  # same samples, same per-sample seeds
        flat = [idx for batch in whole for idx, _ in batch]
        assert set(flat) == set(range(7)) and len(flat) == 8  # every sample, padded by wrapping around
    assert one.micro_batches(0, 0) != one.micro_batches(1, 0)  # a new order every epoch
    assert one.micro_batches(1, 0, start_step=1) == one.micro_batches(1, 0)[1:]  # resume mid-epoch


def test_caption_options_shuffle_keep_trigger_dropout():
    from lora_scripts.data.images import augment_caption

    prompt = "style of lora, red, circle, bold, flat"
    assert augment_caption(prompt, np.random.default_rng(0)) == prompt  # no options, no change
    shuffled = {augment_caption(prompt, np.random.default_rng(s), shuffle_tags=True, keep_tokens=1) for s in range(20)}
    assert len(shuffled) > 1 and all(c.startswith("style of lora, ") for c in shuffled)
    assert all(sorted(c.split(", ")) == sorted(prompt.split(", ")) for c in shuffled)
    assert augment_caption("red, circle", np.random.default_rng(0), trigger_word="sks") == "sks, red, circle"
    assert augment_caption("sks, red", np.random.default_rng(0), trigger_word="sks") == "sks, red"
    dropped = [augment_caption(prompt, np.random.default_rng(s), caption_dropout=0.5) for s in range(200)]
    assert 60 < dropped.count("") < 140 and set(dropped) == {"", prompt}
    a = augment_caption(prompt, np.random.default_rng(5), shuffle_tags=True, caption_dropout=0.3)
    assert a == augment_caption(prompt, np.random.default_rng(5), shuffle_tags=True, caption_dropout=0.3)

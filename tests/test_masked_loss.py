"""Masked loss: an image's alpha channel or a mask file weights the loss per latent pixel; the mask follows the
image's crop, flip and bucket, survives the latent cache, and works the same for the flow-matching families."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lora_scripts.config import build_config
from lora_scripts.data.images import latent_mask, load_image_and_mask
from lora_scripts.tasks.image import ImageTask
from lora_scripts.testing import make_captioned_images, tiny_image_config


def loaded(cfg):
    """The image task with its model loaded on the CPU, as the loop sets it up."""
    task = ImageTask(cfg)
    task.check_base_model()
    summary = task.check_data()
    model = task.load_model(torch.device("cpu"), torch.float32)
    return task, model, task.dataset(summary)


def loss_and_grads(task, model, batch):
    model.zero_grad()
    loss = task.loss(model, batch)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    return loss.item(), torch.cat([g.flatten() for g in grads if g is not None])


def test_mask_follows_crop_and_flip(tmp_path):
    # a wide image: a red block on the left, opaque only there (alpha 0 elsewhere)
    img = Image.new("RGBA", (64, 16), (0, 0, 255, 0))
    img.paste((255, 0, 0, 255), (0, 0, 24, 16))
    img.save(tmp_path / "a.png")
    seen = set()
    for seed in range(12):
        pixels, crop, mask = load_image_and_mask(tmp_path / "a.png", 16, np.random.default_rng(seed), True, True,
                                                 alpha_mask=True)
        red = (pixels[0] > 0.5) & (pixels[1] < -0.5)  # red where the block is; the transparent rest turns white
        assert mask.shape == (16, 16)
        assert np.array_equal(mask > 0.5, red), seed  # wherever the crop and flip put the block, the mask is there
        seen.add((crop.top_left, bool(mask[:, 0].mean() > mask[:, -1].mean())))
    assert len(seen) > 2  # several crops, both flips
    # a mask file multiplies in; on the latent grid each latent pixel holds its block's mean
    Image.new("L", (64, 16), 128).save(tmp_path / "m.png")
    _, _, grey = load_image_and_mask(tmp_path / "a.png", 16, np.random.default_rng(0), mask_path=tmp_path / "m.png")
    assert np.allclose(grey, 128 / 255)
    half = np.zeros((16, 16), np.float32)
    half[:, :4] = 1.0
    assert np.allclose(latent_mask(half, 8), [[0.5, 0.0], [0.5, 0.0]])


@pytest.fixture()
def masked_data(tmp_path):
    data = make_captioned_images(tmp_path / "data", count=2, size=32)
    masks = tmp_path / "masks"
    masks.mkdir()
    for image in sorted(data.glob("*.png")):
        Image.new("L", Image.open(image).size, 255).save(masks / image.name)
    return data, masks


def test_fully_masked_sample_contributes_nothing_and_half_mask_halves(tiny_sd, masked_data, tmp_path):
    data, masks = masked_data
    cfg = build_config(tiny_image_config(tiny_sd, data, tmp_path / "out", mask_dir=str(masks), batch_size=1))
    task, model, dataset = loaded(cfg)
    batch = task.collate([dataset[(0, 1234)]])
    assert batch["mask"].shape == (1, 32, 32) and torch.all(batch["mask"] == 1)
    full, full_grad = loss_and_grads(task, model, batch)
    assert full > 0 and full_grad.abs().sum() > 0

    batch["mask"] = torch.zeros_like(batch["mask"])
    nothing, grad = loss_and_grads(task, model, batch)
    assert nothing == 0.0 and torch.count_nonzero(grad) == 0

    batch["mask"] = torch.full_like(batch["mask"], 0.5)
    half, grad = loss_and_grads(task, model, batch)
    assert half == pytest.approx(full / 2, rel=1e-5)
    torch.testing.assert_close(grad, full_grad / 2, rtol=1e-4, atol=1e-7)

    left = torch.zeros_like(batch["mask"])
    left[..., :16] = 1.0  # the left half trains, the right half does not: the two halves add up to the whole
    batch["mask"] = left
    left_loss, _ = loss_and_grads(task, model, batch)
    batch["mask"] = 1 - left
    right_loss, _ = loss_and_grads(task, model, batch)
    assert 0 < left_loss < full and left_loss + right_loss == pytest.approx(full, rel=1e-5)


def test_black_mask_file_and_transparent_image_train_nothing(tiny_sd, masked_data, tmp_path):
    data, masks = masked_data
    Image.new("L", Image.open(data / "img_000.png").size, 0).save(masks / "img_000.png")  # all black: ignored
    Image.new("RGBA", (40, 32), (255, 0, 0, 0)).save(data / "img_001.png")  # fully transparent
    Image.new("L", (40, 32), 255).save(masks / "img_001.png")
    cfg = build_config(tiny_image_config(tiny_sd, data, tmp_path / "out", mask_dir=str(masks), alpha_mask=True,
                                         batch_size=1, bucket=True, bucket_step=8))
    task, model, dataset = loaded(cfg)
    for index in range(2):
        item = dataset[(index, 99)]
        assert item["mask"].shape == item["pixels"].shape[1:]  # at the bucket's size
        loss, grad = loss_and_grads(task, model, task.collate([item]))
        assert loss == 0.0 and torch.count_nonzero(grad) == 0


def test_cached_latents_keep_the_mask(tiny_sd, masked_data, tmp_path):
    data, masks = masked_data
    size = Image.open(data / "img_000.png").size
    mask = Image.new("L", size, 0)
    mask.paste(255, (0, 0, size[0] // 2, 32))
    mask.save(masks / "img_000.png")
    plain = build_config(tiny_image_config(tiny_sd, data, tmp_path / "a", mask_dir=str(masks)))
    cached = build_config(tiny_image_config(tiny_sd, data, tmp_path / "b", mask_dir=str(masks), cache_latents=True))
    task_a, model_a, uncached = loaded(plain)
    task_b, model_b, from_cache = loaded(cached)
    a, b = task_a.collate([uncached[(0, 5)]]), task_b.collate([from_cache[(0, 5)]])
    grid = tuple(b["latent_mean"].shape[-2:])
    assert b["mask"].shape == (1, *grid) and a["mask"].shape == (1, 32, 32)  # the cache keeps it on the latent grid
    torch.testing.assert_close(task_a._latent_mask(a["mask"], grid), b["mask"][:, None])
    assert 0 < b["mask"].mean() < 1
    assert task_a.loss(model_a, a).item() == pytest.approx(task_b.loss(model_b, b).item(), rel=1e-4)
    # another mask file is another cache entry
    keys = list(task_b._caches.latent_keys)
    Image.new("L", size, 255).save(masks / "img_000.png")
    _, _, again = loaded(build_config(tiny_image_config(tiny_sd, data, tmp_path / "c", mask_dir=str(masks),
                                                        cache_latents=True, cache_dir=str(tmp_path / "b/cache"))))
    assert again.caches.latent_keys[0] != keys[0] and again.caches.latent_keys[1] == keys[1]


def test_flux_mask_applies_in_the_unpacked_latent_space(masked_data, tmp_path):
    """FLUX packs 2x2 latent patches into tokens; its prediction comes back unpacked, so the mask weights the
    same latent pixels as for a UNet: zero trains nothing, the left and right halves add up to the whole."""
    from lora_scripts.tiny_models.flux import make_tiny_model

    data, masks = masked_data
    model_dir = make_tiny_model(tmp_path / "tiny-flux")
    cfg = build_config(tiny_image_config(model_dir, data, tmp_path / "out", mask_dir=str(masks), batch_size=1,
                                         text_max_length=16))
    task, model, dataset = loaded(cfg)
    batch = task.collate([dataset[(1, 7)]])
    full, _ = loss_and_grads(task, model, batch)
    left = torch.zeros_like(batch["mask"])
    left[..., :16] = 1.0
    batch["mask"] = left
    left_loss, _ = loss_and_grads(task, model, batch)
    batch["mask"] = 1 - left
    right_loss, _ = loss_and_grads(task, model, batch)
    assert 0 < left_loss < full and left_loss + right_loss == pytest.approx(full, rel=1e-5)
    batch["mask"] = torch.zeros_like(left)
    nothing, grad = loss_and_grads(task, model, batch)
    assert nothing == 0.0 and torch.count_nonzero(grad) == 0

"""`lora-scripts check`: every finding at once, a readable report or JSON, exit 2 on errors, no model loaded."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from lora_scripts.cli import main
from lora_scripts.data.images import load_image_tensor
from lora_scripts.tasks.image import ImageTask


@pytest.fixture(autouse=True)
def no_model_loading(monkeypatch):
    monkeypatch.setattr(ImageTask, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("model loaded")))


def check_json(config, capsys):
    code = main(["check", "--config", str(config), "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_clean_data_passes(write_config, capsys):
    code, report = check_json(write_config(), capsys)
    assert code == 0 and report["ok"] and report["num_samples"] == 6 and report["errors"] == 0


def test_every_problem_is_reported_at_once(write_config, image_data, capsys):
    meta = image_data / "metadata.csv"
    shutil.copy(image_data / "img_000.png", image_data / "copy.png")                    # duplicate file
    Image.new("RGB", (20, 20)).save(image_data / "small.png")                            # smaller than resolution 32
    Image.new("RGB", (4, 4)).save(image_data / "tiny.png")                               # unusably small
    (image_data / "img_003.png").write_bytes(b"broken")                                  # unreadable
    Image.new("RGB", (40, 40)).save(image_data / "stray.png")                            # no caption
    long_caption = " ".join(["red circle"] * 20)                                        # over the 16-token limit
    meta.write_text(meta.read_text() + f"copy.png,a red circle in the style of lora\nsmall.png,\ntiny.png,x\n"
                    f"img_000.png,{long_caption}\n")
    code, report = check_json(write_config(), capsys)
    codes = sorted(f["code"] for f in report["findings"])
    assert code == 2 and not report["ok"]
    for expected in ("duplicate_file", "small", "too_small", "unreadable", "uncaptioned", "empty_caption",
                     "duplicate_caption", "long_caption"):
        assert expected in codes, (expected, codes)
    assert report["errors"] == 2


def test_readable_report_and_train_refuses_with_a_count(write_config, image_data, capsys):
    (image_data / "img_001.png").write_bytes(b"broken")
    (image_data / "img_002.png").write_bytes(b"broken")
    assert main(["check", "--config", str(write_config())]) == 2
    out = capsys.readouterr().out
    assert out.startswith("FAILED: 6 captioned images") and out.count("error: ") == 2
    assert main(["train", "--config", str(write_config()), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "img_001.png: unreadable image" in err and "and 1 more errors" in err and "\n" not in err


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 20))  # white left half
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "rot.jpg", exif=exif, quality=100)
    array = load_image_tensor(tmp_path / "rot.jpg", 20, np.random.default_rng(0))
    # displayed upright the image is 20 wide, 40 tall, the white half on top: the centre crop is half white
    top, bottom = array[:, :5].mean(), array[:, -5:].mean()
    assert top > 0.5 and bottom < -0.5

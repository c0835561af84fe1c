"""Auto-labelling: the seed's tools/auto_label.py, every back-end, CSV quoting, existing-row modes, errors."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest
from PIL import Image

from lora_scripts.cli import main
from lora_scripts.data.images import check_image_dataset, read_metadata
from lora_scripts.testing import make_captioned_images, make_tiny_blip

from .helpers import REPO_ROOT, cli_env


@pytest.fixture()
def images(tmp_path):
    folder = make_captioned_images(tmp_path / "imgs", count=4)
    (folder / "metadata.csv").unlink()
    return folder


def rows(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return [tuple(r) for r in csv.reader(fh)]


def test_seed_command_with_filename_backend_trigger_and_prefix(images):
    out = images / "metadata.csv"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "auto_label.py"), "--input", str(images),
                           "--output", str(out), "--backend", "filename", "--trigger", "sks", "--prefix", "oil painting"],
                          env=cli_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert rows(out)[0] == ("filename", "prompt")
    assert rows(out)[1] == ("img_000.png", "sks, oil painting, img")
    assert len(check_image_dataset(images, out).samples) == 4  # the output is training-ready


def test_caption_backend_with_a_tiny_blip(images, tmp_path):
    from lora_scripts.data.label import BlipCaptioner

    model = make_tiny_blip(tmp_path / "blip")
    assert main(["label", "--input", str(images), "--model", str(model), "--batch-size", "3"]) == 0
    got = dict(rows(images / "metadata.csv")[1:])
    assert sorted(got) == [f"img_{i:03d}.png" for i in range(4)]
    expected = BlipCaptioner(str(model))([images / name for name in sorted(got)])
    assert [got[name] for name in sorted(got)] == expected and all(expected)


def test_sidecar_captions_are_quoted_correctly(images, capsys):
    (images / "img_000.txt").write_text('oil painting, "Van Gogh" style\nswirling sky', encoding="utf-8")
    (images / "img_001.caption").write_text("café au lait, über-detailed", encoding="utf-8")
    assert main(["label", "--input", str(images), "--backend", "sidecar"]) == 0
    samples = read_metadata(images, images / "metadata.csv")
    assert [(s.path.name, s.prompt) for s in samples] == [
        ("img_000.png", 'oil painting, "Van Gogh" style swirling sky'),
        ("img_001.png", "café au lait, über-detailed"),
    ]
    assert "2 images have no .txt/.caption file" in capsys.readouterr().out


def test_skip_existing_overwrite_and_append(images):
    out = images / "metadata.csv"
    out.write_text("filename,prompt\nimg_000.png,hand written\n")
    main(["label", "--input", str(images), "--backend", "filename"])
    assert dict(rows(out)[1:])["img_000.png"] == "hand written" and len(rows(out)) == 5
    main(["label", "--input", str(images), "--backend", "filename", "--append"])
    assert dict(rows(out)[1:])["img_000.png"] == "hand written, img"
    main(["label", "--input", str(images), "--backend", "filename", "--overwrite"])
    assert dict(rows(out)[1:])["img_000.png"] == "img"


def test_recursive_finds_subfolders(images):
    (images / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(images / "sub" / "blue_square_03.jpg")
    main(["label", "--input", str(images), "--backend", "filename"])
    assert "sub/blue_square_03.jpg" not in dict(rows(images / "metadata.csv")[1:])
    main(["label", "--input", str(images), "--backend", "filename", "--recursive"])
    assert dict(rows(images / "metadata.csv")[1:])["sub/blue_square_03.jpg"] == "blue square"


@pytest.mark.parametrize("case", ["missing-folder", "no-images", "bad-model"])
def test_label_errors_are_one_line_exit_2(tmp_path, capsys, case):
    folder = tmp_path / "empty"
    folder.mkdir()
    args = {"missing-folder": ["--input", str(tmp_path / "nope"), "--backend", "filename"],
            "no-images": ["--input", str(folder), "--backend", "filename"],
            "bad-model": ["--input", str(make_captioned_images(tmp_path / "i", count=1)),
                          "--model", str(tmp_path / "no-model")]}[case]
    assert main(["label", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err

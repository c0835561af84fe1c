"""Captions from metadata.csv, sidecar files, kohya json and imagefolder metadata.jsonl all train the same."""

from __future__ import annotations

import csv
import json

import pytest

from lora_scripts.config import load_config
from lora_scripts.data.captions import read_captions, resolve_caption_source
from lora_scripts.data.images import check_image_dataset
from lora_scripts.errors import DataError
from lora_scripts.train.loop import train


def csv_rows(folder):
    with open(folder / "metadata.csv", newline="") as fh:
        return [(r["filename"], r["prompt"]) for r in csv.DictReader(fh)]


def convert(folder, kind):
    """Rewrite the CSV captions of ``folder`` as another source and remove the CSV."""
    rows = csv_rows(folder)
    (folder / "metadata.csv").unlink()
    if kind == "sidecar":
        for name, prompt in rows:
            (folder / name).with_suffix(".txt").write_text(prompt)
    elif kind == "jsonl":
        (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": p}) + "\n" for n, p in rows))
    elif kind == "kohya_json":
        # kohya keys drop the extension; caption and tags are joined with ", "
        meta = {n.rsplit(".", 1)[0]: {"caption": p.split(" in ")[0], "tags": "in " + p.split(" in ")[1]} for n, p in rows}
        (folder / "meta_cap.json").write_text(json.dumps(meta))
    return rows


@pytest.mark.parametrize("kind", ["sidecar", "jsonl"])
def test_auto_detects_and_reads_the_same_captions(image_data, kind):
    reference = check_image_dataset(image_data, image_data / "metadata.csv")
    convert(image_data, kind)
    assert resolve_caption_source(image_data, image_data / "metadata.csv") == kind
    found = check_image_dataset(image_data, image_data / "metadata.csv")
    assert [(s.path, s.prompt) for s in found.samples] == [(s.path, s.prompt) for s in reference.samples]
    assert found.dataset_hash == reference.dataset_hash


def test_kohya_json_joins_caption_and_tags(image_data):
    rows = convert(image_data, "kohya_json")
    samples, _ = read_captions(image_data, image_data / "meta_cap.json")
    assert [(s.path.name, s.prompt) for s in samples] == [(n, p.replace(" in ", ", in ")) for n, p in rows]


def test_training_from_sidecar_captions(write_config, image_data, tmp_path):
    convert(image_data, "sidecar")
    result = train(load_config(write_config(max_train_steps=1)), show_progress=False)
    assert result.steps == 1 and (tmp_path / "out" / "out.safetensors").is_file()


def test_explicit_caption_source_overrides_auto(write_config, image_data):
    (image_data / "img_000.txt").write_text("only one sidecar")
    with pytest.raises(DataError, match="5 images have no .txt/.caption file"):
        train(load_config(write_config(caption_source="sidecar")), show_progress=False)


def test_jsonl_errors_name_the_line(image_data):
    convert(image_data, "jsonl")
    path = image_data / "metadata.jsonl"
    path.write_text(path.read_text() + '{"file_name": "ghost.png", "text": "x"}\n{broken\n')
    with pytest.raises(DataError, match=r"metadata.jsonl:7: image 'ghost.png' not found"):
        read_captions(image_data, image_data / "metadata.csv")


def test_kohya_json_missing_image(image_data):
    (image_data / "meta.json").write_text(json.dumps({"nope": {"caption": "x"}}))
    with pytest.raises(DataError, match="image for key 'nope' not found"):
        read_captions(image_data, image_data / "meta.json")


def test_caption_options_train_and_resume_exactly(write_config, tmp_path):
    from .helpers import assert_same_tensors

    opts = dict(shuffle_tags=True, keep_tokens=1, trigger_word="sks", caption_dropout=0.3, save_steps=2)
    train(load_config(write_config("a.yaml", output="straight", max_train_steps=4, **opts)), show_progress=False)
    train(load_config(write_config("b.yaml", output="split", max_train_steps=2, **opts)), show_progress=False)
    train(load_config(write_config("b.yaml", output="split", max_train_steps=4, resume="latest", **opts)),
          show_progress=False)
    assert_same_tensors(tmp_path / "straight/checkpoints/step-4/adapter.safetensors",
                        tmp_path / "split/checkpoints/step-4/adapter.safetensors")

"""Datasets as sd-scripts users have them: `N_token` folder trees with repeats, regularisation images, a `datasets:`
section of subsets, `import-kohya` of their TOML files; per-epoch counts as sd-scripts makes them; exact resume and
2-process equality with subsets; `check` lists every finding at once."""

from __future__ import annotations

import json

import pytest
import yaml
from PIL import Image

from lora_scripts.cli import main
from lora_scripts.config import load_config
from lora_scripts.data.images import CaptionedImage
from lora_scripts.data.subsets import Subset, epoch_entries, parse_kohya_folder, read_subset_captions
from lora_scripts.testing import make_captioned_images, make_kohya_tree, tiny_image_config
from lora_scripts.train.loop import train

from .helpers import assert_same_tensors, run_cli


def write_yaml(path, data):
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def tree_config(tiny_sd, tmp_path, train_dir, output="out", **overrides):
    cfg = tiny_image_config(tiny_sd, train_dir, tmp_path / output, **overrides)
    cfg.pop("metadata_path")
    return cfg


# --- how sd-scripts reads folders and counts an epoch ----------------------------------------------------------

def test_folder_names_and_captions_as_sd_scripts_reads_them(tmp_path):
    assert parse_kohya_folder("10_sks dog") == (10, "sks dog")
    assert parse_kohya_folder("3_a_b") == (3, "a_b")
    assert parse_kohya_folder("abc_dog") is None and parse_kohya_folder("dog") is None
    folder = make_captioned_images(tmp_path / "10_sks dog", count=2)
    (folder / "metadata.csv").unlink()
    (folder / "img_001.txt").write_text("sks dog, running\n", encoding="utf-8")
    subset = Subset(image_dir=folder, metadata_path=folder / "metadata.csv", name=folder.name, class_tokens="sks dog",
                    caption_prefix="photo of")
    samples, _, _ = read_subset_captions(subset)
    # the sidecar wins; without one the folder's token is the caption; the prefix is joined with a space
    assert [s.prompt for s in samples] == ["photo of sks dog", "photo of sks dog, running"]


def _subsets(*specs):
    """(count, repeats, is_reg) per subset -> samples and subsets."""
    subsets, samples = [], []
    for k, (count, repeats, is_reg) in enumerate(specs):
        subsets.append(Subset(image_dir=tmp, metadata_path=tmp, name=str(k), num_repeats=repeats, is_reg=is_reg))
        samples += [CaptionedImage(tmp / f"{k}_{i}.png", "", subset=k) for i in range(count)]
    return samples, subsets


tmp = __import__("pathlib").Path("unused")


@pytest.mark.parametrize("specs, train_count, reg_count", [
    ([(3, 10, False), (2, 5, False)], 40, 0),             # 10_a (3 images) + 5_b (2 images)
    ([(3, 10, False), (2, 5, False), (3, 1, True)], 40, 40),  # 3 reg images cycled up to the 40 training samples
    ([(3, 10, False), (2, 5, False), (5, 10, True)], 40, 40),  # 4 reg images x 10 reach 40: the fifth is unused
    ([(3, 10, False), (2, 5, False), (3, 15, True)], 40, 45),  # registered whole: 15 + 15 + 15 passes 40
    ([(2, 1, False), (100, 1, True)], 2, 2),              # more reg images than training samples: the first ones
])
def test_epoch_counts_as_sd_scripts(specs, train_count, reg_count):
    samples, subsets = _subsets(*specs)
    entries = epoch_entries(samples, subsets)
    reg = [i for i in entries if subsets[samples[i].subset].is_reg]
    assert len(entries) - len(reg) == train_count and len(reg) == reg_count
    if specs[-1] == (5, 10, True):
        assert sorted(set(samples[i].path.name for i in reg)) == ["2_0.png", "2_1.png", "2_2.png", "2_3.png"]


# --- through the CLI ---------------------------------------------------------------------------------------------

def test_kohya_tree_with_regularisation_trains_through_the_cli(tiny_sd, tmp_path, capsys):
    train_dir = make_kohya_tree(tmp_path / "train", {"10_a": 3, "5_b": 2})
    reg_dir = make_kohya_tree(tmp_path / "reg", {"1_dog": 3})
    alone = write_yaml(tmp_path / "alone.yaml", tree_config(tiny_sd, tmp_path, train_dir))
    assert main(["check", "--config", str(alone)]) == 0
    assert "40 samples per epoch: 10_a: 3 images x 10, 5_b: 2 images x 5" in capsys.readouterr().out

    config = write_yaml(tmp_path / "reg.yaml", tree_config(tiny_sd, tmp_path, train_dir, reg_data_dir=str(reg_dir),
                                                           prior_loss_weight=0.5, max_train_steps=1, batch_size=4))
    proc = run_cli("train", "--config", str(config), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "80 samples per epoch (40 training + 40 regularisation)" in proc.stdout
    assert "1_dog: 3 regularisation images, 40 drawn" in proc.stdout


KOHYA_DATASET = """\
[general]
enable_bucket = false
shuffle_caption = true
keep_tokens = 1

[[datasets]]
resolution = 32
batch_size = 4

  [[datasets.subsets]]
  image_dir = '{a}'
  class_tokens = 'hoge girl'
  num_repeats = 10

  [[datasets.subsets]]
  image_dir = '{b}'
  caption_extension = '.txt'
  num_repeats = 5
  caption_prefix = 'photo of'

  [[datasets.subsets]]
  is_reg = true
  image_dir = '{reg}'
  class_tokens = 'girl'
  num_repeats = 1

[[datasets]]
resolution = [48, 48]
batch_size = 2

  [[datasets.subsets]]
  image_dir = '{c}'
  class_tokens = 'fuga boy'
  keep_tokens = 2
  color_aug = true
"""

KOHYA_TRAINING = """\
[model_arguments]
pretrained_model_name_or_path = "{model}"
v2 = false

[additional_network_arguments]
network_module = "networks.lora"
network_dim = 4
network_alpha = 2
network_train_unet_only = true

[optimizer_arguments]
optimizer_type = "AdamW"
learning_rate = 1e-3
optimizer_args = ["weight_decay=0.05", "betas=(0.9,0.99)", "amsgrad=True"]
lr_scheduler = "cosine"

[training_arguments]
output_dir = "{out}"
output_name = "kohya_lora"
max_train_epochs = 1
save_every_n_steps = 1
mixed_precision = "no"
gradient_checkpointing = true
xformers = true
prior_loss_weight = 0.5
seed = 3
wandb_api_key = "secret123"

[saving_arguments]
save_model_as = "safetensors"
"""


def test_import_kohya_maps_lists_and_trains(tiny_sd, tmp_path):
    folders = make_kohya_tree(tmp_path / "img", {"a": 3, "b": 2, "reg": 3, "c": 2}, sidecars=True)
    for image in (folders / "a").glob("*.txt"):
        image.unlink()  # subset a: the class tokens are the captions
    dataset = tmp_path / "dataset.toml"
    dataset.write_text(KOHYA_DATASET.format(**{k: (folders / k).as_posix() for k in ("a", "b", "reg", "c")}))
    training = tmp_path / "config.toml"
    training.write_text(KOHYA_TRAINING.format(model=tiny_sd.as_posix(), out=(tmp_path / "out").as_posix()))
    output = tmp_path / "imported.yaml"

    proc = run_cli("import-kohya", "--dataset-config", str(dataset), "--training-config", str(training),
                   "--output", str(output))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    not_mapped = [line for line in lines if line.startswith("  not mapped: ")]
    for key in ("v2", "xformers", "save_model_as", "color_aug", "optimizer_args amsgrad", "batch_size"):
        assert sum(f": {key} = " in line for line in not_mapped) == 1, (key, not_mapped)
    assert "secret123" not in proc.stdout and "wandb_api_key = (hidden)" in proc.stdout
    assert "secret123" not in output.read_text()

    cfg = load_config(output)
    assert (cfg.base_model, cfg.lora_rank, cfg.lora_alpha, cfg.learning_rate) == (str(tiny_sd.as_posix()), 4, 2, 1e-3)
    assert (cfg.optimizer, cfg.weight_decay, cfg.adam_beta2, cfg.lr_scheduler) == ("adamw", 0.05, 0.99, "cosine")
    assert (cfg.epochs, cfg.save_steps, cfg.prior_loss_weight, cfg.seed, cfg.output_name) == (1, 1, 0.5, 3,
                                                                                                "kohya_lora")
    assert cfg.gradient_checkpointing is True and cfg.train_text_encoder is False and cfg.batch_size == 4
    assert cfg.resolution == 32 and cfg.shuffle_tags is True and cfg.keep_tokens == 1
    a, b, reg, c = cfg.datasets
    assert (a.num_repeats, a.class_tokens, b.caption_extension, b.caption_prefix) == (10, "hoge girl", ".txt",
                                                                                    "photo of")
    assert reg.is_regularization and not a.is_regularization and c.resolution == 48 and c.keep_tokens == 2

    proc = run_cli("train", "--config", str(output), "--set", "max_train_steps=1", "--set",
                   "logging.tensorboard=false", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    # 3 x 10 + 2 x 5 + 2 x 1 = 42 training samples, the 3 regularisation images cycled up to 42
    assert "84 samples per epoch (42 training + 42 regularisation)" in proc.stdout
    assert (tmp_path / "out/kohya_lora.safetensors").is_file()


def test_import_kohya_refuses_broken_files_in_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[[datasets]\nresolution = 1\n")
    proc = run_cli("import-kohya", "--dataset-config", str(bad), "--output", str(tmp_path / "x.yaml"))
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {bad}: TOML syntax error")
    assert len(proc.stderr.strip().splitlines()) == 1
    empty = tmp_path / "empty.toml"
    empty.write_text("[general]\nshuffle_caption = true\n")
    proc = run_cli("import-kohya", "--dataset-config", str(empty), "--output", str(tmp_path / "x.yaml"))
    assert proc.returncode == 2 and "no [[datasets]] table" in proc.stderr


def test_datasets_and_train_data_dir_together_are_refused(write_config, image_data, capsys):
    config = write_config(datasets=[{"image_dir": str(image_data)}])
    assert main(["check", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert "both train_data_dir and datasets are set" in err and "\n" not in err


# --- resume and two processes with subsets -----------------------------------------------------------------------

@pytest.fixture()
def subset_data(tmp_path):
    train_dir = make_kohya_tree(tmp_path / "train", {"3_a": 3, "2_b": 2})
    reg_dir = make_kohya_tree(tmp_path / "reg", {"1_dog": 2})
    return dict(train_data_dir=str(train_dir), reg_data_dir=str(reg_dir), prior_loss_weight=0.7, alpha_mask=True)


def test_resume_with_subsets_is_exact(tiny_sd, tmp_path, subset_data):
    common = dict(subset_data, save_steps=2, lora_dropout=0.1, random_flip=True, random_crop=True, shuffle_tags=True,
                  caption_dropout=0.2)
    straight = tree_config(tiny_sd, tmp_path, subset_data["train_data_dir"], "straight", max_train_steps=4, **common)
    train(load_config(write_yaml(tmp_path / "a.yaml", straight)), show_progress=False)
    first = tree_config(tiny_sd, tmp_path, subset_data["train_data_dir"], "split", max_train_steps=2, **common)
    train(load_config(write_yaml(tmp_path / "b.yaml", first)), show_progress=False)
    second = dict(first, max_train_steps=4, resume="latest")
    result = train(load_config(write_yaml(tmp_path / "b.yaml", second)), show_progress=False)
    assert result.resumed_from.name == "step-2"
    assert_same_tensors(tmp_path / "straight/checkpoints/step-4/adapter.safetensors",
                        tmp_path / "split/checkpoints/step-4/adapter.safetensors")


def test_two_processes_equal_one_with_subsets(tiny_sd, tmp_path, subset_data):
    common = dict(subset_data, max_train_steps=2, save_steps=2, bucket=True, bucket_step=8)
    one = tree_config(tiny_sd, tmp_path, subset_data["train_data_dir"], "one", batch_size=4, **common)
    train(load_config(write_yaml(tmp_path / "one.yaml", one)), show_progress=False)
    two = tree_config(tiny_sd, tmp_path, subset_data["train_data_dir"], "two", batch_size=2, **common)
    proc = run_cli("train", "--config", str(write_yaml(tmp_path / "two.yaml", two)), "--nproc", "2", "--no-progress",
                   timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "26 samples per epoch (13 training + 13 regularisation)" in proc.stdout
    assert_same_tensors(tmp_path / "one/checkpoints/step-2/adapter.safetensors",
                        tmp_path / "two/checkpoints/step-2/adapter.safetensors", atol=1e-5)


# --- check: every finding at once --------------------------------------------------------------------------------

def check_json(config, capsys):
    code = main(["check", "--config", str(config), "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_check_goes_on_past_a_missing_file_row(write_config, image_data, capsys):
    meta = image_data / "metadata.csv"
    meta.write_text(meta.read_text() + "gone.png,a missing image\n")
    (image_data / "img_002.png").write_bytes(b"broken")
    code, report = check_json(write_config(), capsys)
    assert code == 2 and report["errors"] == 2
    messages = [f["message"] for f in report["findings"] if f["level"] == "error"]
    assert any("image 'gone.png' not found" in m for m in messages)
    assert any("img_002.png: unreadable image" in m for m in messages)


def test_check_lists_every_subset_and_mask_problem(tiny_sd, tmp_path, capsys):
    train_dir = make_kohya_tree(tmp_path / "train", {"10_a": 3, "abc_dog": 1})
    (train_dir / "3_empty").mkdir()
    masks = tmp_path / "masks"
    masks.mkdir()
    images = sorted((train_dir / "10_a").glob("*.png"))
    Image.new("L", Image.open(images[0]).size, 255).save(masks / images[0].name)   # fine
    Image.new("L", (7, 7), 255).save(masks / images[1].name)                         # wrong size
    (masks / "img_002.png").write_bytes(b"not a png")                                # unreadable
    config = write_yaml(tmp_path / "c.yaml", tree_config(tiny_sd, tmp_path, train_dir, mask_dir=str(masks),
                                                         reg_data_dir=str(tmp_path / "no-such-folder")))
    code, report = check_json(config, capsys)
    codes = sorted(f["code"] for f in report["findings"] if f["level"] == "error")
    assert code == 2
    assert codes == ["empty_subset", "folder_name", "mask_size", "missing_dir", "unreadable_mask"], report["findings"]
    # and a missing mask
    (masks / images[0].name).unlink()
    code, report = check_json(config, capsys)
    assert "missing_mask" in {f["code"] for f in report["findings"]}


def test_datasets_section_options_per_subset(tiny_sd, tmp_path):
    from lora_scripts.config import build_config
    from lora_scripts.tasks.image import ImageTask

    a = make_captioned_images(tmp_path / "a", count=3)
    b = make_captioned_images(tmp_path / "b", count=2)
    raw = tree_config(tiny_sd, tmp_path, a, shuffle_tags=True, keep_tokens=1, datasets=[
        {"image_dir": str(a), "num_repeats": 2, "caption_prefix": "sks,", "shuffle_tags": False},
        {"image_dir": str(b), "num_repeats": 3, "resolution": 48, "caption_dropout": 0.5, "trigger_word": "xyz"},
    ])
    raw.pop("train_data_dir")
    task = ImageTask(build_config(raw))
    task.check_base_model()
    summary = task.check_data()
    assert summary.num_samples == 12 and "12 samples per epoch: a: 3 images x 2, b: 2 images x 3" in summary.description
    first, second = task._subsets
    assert (first.shuffle_tags, first.keep_tokens, first.resolution) == (False, 1, 32)  # keep_tokens inherited
    assert (second.shuffle_tags, second.caption_dropout, second.trigger_word, second.resolution) == (True, 0.5, "xyz", 48)
    assert all(s.prompt.startswith("sks, a ") for s in task._samples if s.subset == 0)
    # subsets of different sizes never share a batch (of 2, here), in any epoch
    for epoch in range(3):
        order = task.epoch_order(epoch, 42, 2)
        sizes = [task._buckets[task._entries[i]] for i in order]
        assert all(sizes[i] == sizes[i + 1] for i in range(0, len(sizes), 2))
        assert sorted(set(order.tolist())) == list(range(12))


def test_import_training_config_alone_in_folder_mode(tmp_path):
    from lora_scripts.kohya_import import import_kohya

    training = tmp_path / "config.toml"
    training.write_text('pretrained_model_name_or_path = "m"\noutput_dir = "out"\ntrain_data_dir = "train"\n'
                        'reg_data_dir = "reg"\nresolution = "512,768"\nenable_bucket = true\ncaption_extension = ".txt"\n'
                        'unet_lr = 5e-4\nlearning_rate = 1e-4\nnetwork_args = ["conv_dim=8", "conv_alpha=4", "algo=loha"]\n'
                        'optimizer_type = "Lion"\nmasked_loss = true\nclip_skip = 2\n')
    result = import_kohya(None, training)
    cfg = result.config
    assert (cfg["train_data_dir"], cfg["reg_data_dir"], cfg["bucket"]) == ("train", "reg", True)
    assert cfg["resolution"] == 624  # the square of 512 x 768's area, in multiples of 8
    assert (cfg["learning_rate"], cfg["text_encoder_lr"]) == (5e-4, 1e-4)  # unet_lr wins, as in sd-scripts
    assert (cfg["conv_rank"], cfg["conv_alpha"]) == (8, 4.0)
    assert [line.split(" = ")[0] for line in result.unmapped] == [
        "config.toml: network_args algo", "config.toml: optimizer_type", "config.toml: clip_skip"]

"""Every mistake in point 9 of the foundation issue: one line naming the file and field or line, exit code 2,
no traceback, and no model loaded."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from lora_scripts.cli import main
from lora_scripts.tasks.image import ImageTask

from .helpers import REPO_ROOT, cli_env


@pytest.fixture(autouse=True)
def no_model_loading(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(ImageTask, "load_model", forbidden)


def run_train(config, capsys, *extra):
    code = main(["train", "--config", str(config), "--no-progress", *extra])
    captured = capsys.readouterr()
    return code, captured.err.strip()


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def test_missing_config(tmp_path, capsys):
    code, err = run_train(tmp_path / "missing.yaml", capsys)
    assert_one_line_error(code, err, "config file not found", "missing.yaml")


def test_yaml_syntax_error(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("train_data_dir: d\nbase_model: m\n  output_dir: o\n")
    code, err = run_train(path, capsys)
    assert_one_line_error(code, err, f"{path}:3:", "YAML syntax error")


def test_unknown_key(write_config, capsys):
    path = write_config(lora_rnk=4)
    code, err = run_train(path, capsys)
    assert_one_line_error(code, err, str(path), "unknown key 'lora_rnk'", "did you mean 'lora_rank'")


def test_wrong_type(write_config, capsys):
    path = write_config(batch_size="four")
    code, err = run_train(path, capsys)
    assert_one_line_error(code, err, str(path), "batch_size", "'four'")


def test_missing_data_dir(write_config, tmp_path, capsys):
    code, err = run_train(write_config(train_data_dir=str(tmp_path / "nope")), capsys)
    assert_one_line_error(code, err, "train_data_dir not found", "nope")


def test_missing_metadata(write_config, image_data, capsys):
    (image_data / "metadata.csv").unlink()
    code, err = run_train(write_config(), capsys)
    assert_one_line_error(code, err, "metadata_path not found", "metadata.csv", "auto_label.py")


def test_metadata_without_header(write_config, image_data, capsys):
    meta = image_data / "metadata.csv"
    meta.write_text("img_000.png,a red circle\n")
    code, err = run_train(write_config(), capsys)
    assert_one_line_error(code, err, f"{meta}:1:", "filename,prompt")


def test_metadata_row_names_absent_file(write_config, image_data, capsys):
    meta = image_data / "metadata.csv"
    meta.write_text(meta.read_text() + "ghost.png,a ghost\n")
    code, err = run_train(write_config(), capsys)
    assert_one_line_error(code, err, f"{meta}:8:", "'ghost.png' not found")


def test_empty_metadata(write_config, image_data, capsys):
    (image_data / "metadata.csv").write_text("filename,prompt\n")
    code, err = run_train(write_config(), capsys)
    assert_one_line_error(code, err, "no rows after the header")


def test_unreadable_image(write_config, image_data, capsys):
    (image_data / "img_002.png").write_bytes(b"this is not a png")
    code, err = run_train(write_config(), capsys)
    assert_one_line_error(code, err, "img_002.png", "unreadable image")


def test_truncated_image(write_config, image_data, capsys):
    path = image_data / "img_001.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    code, err = run_train(write_config(), capsys)
    assert_one_line_error(code, err, "img_001.png", "unreadable image")


@pytest.mark.parametrize(
    "base, fragment",
    [
        ("./models/missing-model", "base_model not found"),
        ("./models/v1-5-pruned.safetensors", "not found; check the path"),
        ("/abs/path/to/model", "base_model not found"),
    ],
)
def test_missing_base_model(write_config, capsys, base, fragment):
    code, err = run_train(write_config(base_model=base), capsys)
    assert_one_line_error(code, err, fragment, base.removeprefix("./"))


def test_base_model_folder_that_is_not_diffusers(write_config, tmp_path, capsys):
    (tmp_path / "empty_model").mkdir()
    code, err = run_train(write_config(base_model=str(tmp_path / "empty_model")), capsys)
    assert_one_line_error(code, err, "not a diffusers Stable Diffusion folder")


def test_broken_single_file_checkpoint(write_config, tmp_path, capsys):
    ckpt = tmp_path / "v1-5-pruned.safetensors"
    ckpt.write_bytes(b"\0" * 16)
    code, err = run_train(write_config(base_model=str(ckpt)), capsys)
    assert_one_line_error(code, err, "v1-5-pruned.safetensors")


def test_fp16_on_cpu(write_config, capsys):
    code, err = run_train(write_config(mixed_precision="fp16"), capsys)
    assert_one_line_error(code, err, "fp16 needs a CUDA GPU")


def test_real_process_prints_one_line_and_exits_2(tmp_path):
    """The same through `python train.py` in a real process: no traceback reaches the terminal."""
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"train_data_dir": str(tmp_path), "base_model": "m/x", "output_dir": "o",
                                    "lora_rank": "big"}))
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "train.py"), "--config", str(path)],
                          env=cli_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "lora_rank" in proc.stderr and str(path) in proc.stderr

"""Config schema: seed keys, defaults, overrides and one-line errors that name the file, line and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_scripts.config import TrainConfig, build_config, describe_fields, load_config
from lora_scripts.errors import ConfigError

from .conftest import REPO_ROOT

SEED_KEYS = [
    "train_data_dir", "metadata_path", "base_model", "lora_rank", "batch_size",
    "epochs", "learning_rate", "output_dir", "save_steps",
]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_seed_config_loads_verbatim():
    cfg = load_config(REPO_ROOT / "configs" / "my_lora_config.yaml")
    assert set(SEED_KEYS) <= set(TrainConfig.model_fields)
    assert cfg.learning_rate == pytest.approx(2e-4)  # YAML reads 2e-4 as a string; the schema makes it a float
    assert cfg.lora_rank == 8 and cfg.batch_size == 4 and cfg.epochs == 10 and cfg.save_steps == 100
    assert cfg.output_name == "my_style_lora"
    assert cfg.task == "image"


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO_ROOT / "configs").glob("*.yaml")))
def test_every_example_config_validates(name):
    load_config(REPO_ROOT / "configs" / name)


def test_defaults():
    cfg = build_config({"train_data_dir": "d", "base_model": "m", "output_dir": "out/run1", "lora_rank": 16})
    assert cfg.alpha == 16.0 and cfg.lora_alpha is None
    assert cfg.metadata_path == Path("d/metadata.csv")
    assert cfg.output_name == "run1"
    assert cfg.resolution == 512 and cfg.mixed_precision == "no" and cfg.task == "image"
    assert cfg.logging.tensorboard and cfg.logging.loss_csv and not cfg.logging.wandb


def test_overrides_any_key_including_nested(tmp_path):
    path = write(tmp_path, "train_data_dir: d\nbase_model: m\noutput_dir: o\n")
    cfg = load_config(path, ["lora_rank=32", "learning_rate=3e-4", "logging.tensorboard=false", "resume=latest",
                             "target_modules=[to_q, to_v]"])
    assert cfg.lora_rank == 32 and cfg.learning_rate == pytest.approx(3e-4)
    assert cfg.logging.tensorboard is False and cfg.resume == "latest" and cfg.target_modules == ["to_q", "to_v"]


def test_override_without_equals_is_an_error(tmp_path):
    path = write(tmp_path, "train_data_dir: d\nbase_model: m\noutput_dir: o\n")
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(path, ["lora_rank"])


def test_unknown_key_suggests_the_right_one(tmp_path):
    path = write(tmp_path, "train_data_dir: d\nbase_model: m\noutput_dir: o\nlearning_rat: 1e-4\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}:4: unknown key 'learning_rat' (did you mean 'learning_rate'?)"


def test_unknown_nested_key_suggests(tmp_path):
    path = write(tmp_path, "train_data_dir: d\nbase_model: m\noutput_dir: o\nlogging:\n  tensorbord: true\n")
    with pytest.raises(ConfigError, match=r"cfg.yaml:5: unknown key 'logging.tensorbord' \(did you mean 'tensorboard'"):
        load_config(path)


def test_unknown_key_from_set_is_an_error(tmp_path):
    path = write(tmp_path, "train_data_dir: d\nbase_model: m\noutput_dir: o\n")
    with pytest.raises(ConfigError, match="unknown key 'lora_rnak' \\(did you mean 'lora_rank'"):
        load_config(path, ["lora_rnak=4"])


def test_wrong_type_names_line_key_and_value(tmp_path):
    path = write(tmp_path, "train_data_dir: d\nbase_model: m\noutput_dir: o\nlora_rank: eight\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith(f"{path}:4: lora_rank:") and "'eight'" in message and "\n" not in message


def test_out_of_range_and_bad_choice(tmp_path):
    path = write(tmp_path, "train_data_dir: d\nbase_model: m\noutput_dir: o\nmixed_precision: fp8\n")
    with pytest.raises(ConfigError, match=r":4: mixed_precision: Input should be 'no', 'fp16' or 'bf16'"):
        load_config(path)
    with pytest.raises(ConfigError, match="lora_rank: Input should be greater than or equal to 1"):
        load_config(path, ["mixed_precision=no", "lora_rank=0"])


def test_missing_required_key(tmp_path):
    path = write(tmp_path, "train_data_dir: d\noutput_dir: o\n")
    with pytest.raises(ConfigError, match="missing required key 'base_model'"):
        load_config(path)


def test_yaml_syntax_error_names_line(tmp_path):
    path = write(tmp_path, "train_data_dir: d\nbase_model: m\noutput_dir: [o\nlora_rank: 4\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "YAML syntax error" in str(err.value) and str(err.value).startswith(f"{path}:")
    line = int(str(err.value).split(":")[1])
    assert line in (3, 4, 5)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_config_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_every_field_documents_itself():
    text = describe_fields()
    for name, field in TrainConfig.model_fields.items():
        if name != "logging":
            assert field.description, name
            assert name in text
    assert "logging.loss_csv" in text

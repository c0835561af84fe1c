"""Property tests: the config loader and the caption parsers fail only with their own one-line errors, whatever
they are fed, and what they accept round-trips."""

from __future__ import annotations

import csv
import io
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from lora_scripts.config import LoggingConfig, TrainConfig, build_config, load_config
from lora_scripts.data.images import augment_caption, read_metadata
from lora_scripts.data.text import load_records
from lora_scripts.errors import ConfigError, DataError

PROPERTY = settings(max_examples=50, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory() as folder:
        yield Path(folder)


# --- the config loader ------------------------------------------------------------------------------------------

KEYS = sorted(TrainConfig.model_fields) + [f"logging.{k}" for k in LoggingConfig.model_fields]
scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20)
           | st.sampled_from(["all-linear", "latest", "fp16", "2e-4", ".inf", "~", "[a, b]", "{x: 1}", "2024-13-01"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.sampled_from(KEYS) | st.text(max_size=8), inner, max_size=3), max_leaves=8)
mappings = st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=10), values, max_size=8)
overrides = st.lists(st.text(max_size=30) | st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS + ["a..b", "", "x."]),
                                                      st.text(max_size=20) | scalars.map(str)), max_size=3)
VALID = {"train_data_dir": "data", "base_model": "org/model", "output_dir": "out/run"}
yaml_ish = st.text(alphabet=st.sampled_from(list("ab: -\n\t[]{}#&*!|>'\",.%@`?0123456789\\") + ["\ufeff", "é"]), max_size=60)


def load_or_config_error(path: Path, extra: list[str]) -> None:
    try:
        load_config(path, extra)
    except ConfigError as exc:
        assert str(exc).strip(), "an empty error message"


@PROPERTY
@given(data=mappings, base=st.booleans(), extra=overrides)
@example(data={"sample_prompts": [{"prompt": "a", "sead": 1}]}, base=True, extra=[])  # regressions found before
@example(data={}, base=True, extra=["resume=2024-13-01", "logging.=1", "lora_rank.x=1"])
def test_config_mappings_raise_only_config_error(scratch, data, base, extra):
    path = scratch / "cfg.yaml"
    path.write_text(yaml.safe_dump({**VALID, **data} if base else data, allow_unicode=True), encoding="utf-8")
    load_or_config_error(path, extra)


@PROPERTY
@given(text=yaml_ish, raw=st.binary(max_size=40), use_raw=st.booleans(), extra=overrides)
@example(text="", raw=b"\x80", use_raw=True, extra=[])  # regressions found before
@example(text="resume: 0000-00-00\nx: &a [*a]\n", raw=b"", use_raw=False, extra=[])
def test_config_text_raises_only_config_error(scratch, text, raw, use_raw, extra):
    path = scratch / "cfg.yaml"
    path.write_bytes(raw if use_raw else ("\n".join(f"{k}: {v}" for k, v in VALID.items()) + "\n" + text).encode())
    load_or_config_error(path, extra)


names = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=12)
valid_configs = st.fixed_dictionaries({**{k: st.just(v) for k, v in VALID.items()},
                                      "output_dir": names.map(lambda n: f"out/{n}")}, optional={
    "task": st.sampled_from(["image", "text"]),
    "lora_rank": st.integers(1, 1024),
    "lora_alpha": st.none() | st.floats(1e-3, 1e3),
    "lora_dropout": st.floats(0, 0.999),
    "batch_size": st.integers(1, 64),
    "learning_rate": st.floats(1e-8, 1.0),
    "resolution": st.integers(1, 256).map(lambda n: 8 * n),
    "bucket_step": st.integers(1, 16).map(lambda n: 8 * n),
    "target_modules": st.none() | st.just("all-linear") | st.lists(names, max_size=4),
    "sample_prompts": st.lists(names | st.fixed_dictionaries({"prompt": names, "seed": st.integers(0, 2**31)}), max_size=3),
    "mixed_precision": st.sampled_from(["no", "fp16", "bf16"]),
    "lr_scheduler": st.sampled_from(["constant", "cosine", "linear"]),
    "trigger_word": st.none() | names,
    "max_train_steps": st.none() | st.integers(1, 10**6),
    "resume": st.none() | st.just("latest") | names,
    "logging": st.fixed_dictionaries({}, optional={"wandb": st.booleans(), "log_every_n_steps": st.integers(1, 100)}),
})


@PROPERTY
@given(data=valid_configs)
def test_valid_configs_round_trip(data):
    cfg = build_config(data)
    dumped = cfg.to_yaml_dict()
    assert build_config(dumped) == cfg
    assert build_config(yaml.safe_load(yaml.safe_dump(dumped, allow_unicode=True))) == cfg  # as config.yaml is written


# --- the caption parsers -----------------------------------------------------------------------------------------

tricky = st.text(st.characters(blacklist_categories=("Cs",)) | st.sampled_from([",", '"', "\n", "\r", " ", "\ufeff"]),
                 max_size=40)


@PROPERTY
@given(prompts=st.lists(tricky, min_size=1, max_size=5), bom=st.booleans(), swap=st.booleans())
@example(prompts=["0\r0", 'say "hi", twice\nthen\r\nstop'], bom=True, swap=False)  # a CR inside a prompt is kept
def test_metadata_csv_round_trips(scratch, prompts, bom, swap):
    folder = scratch / "images"
    folder.mkdir(exist_ok=True)
    rows = [(f"img {i}, ok.png", prompt) for i, prompt in enumerate(prompts)]
    for name, _ in rows:
        (folder / name).touch()
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(["prompt", "filename"] if swap else ["filename", "prompt"])
    writer.writerows([(p, n) if swap else (n, p) for n, p in rows])
    (folder / "metadata.csv").write_bytes((b"\xef\xbb\xbf" if bom else b"") + buffer.getvalue().encode())
    samples = read_metadata(folder, folder / "metadata.csv")
    assert [(s.path.name, s.prompt) for s in samples] == [(n, p.strip()) for n, p in rows]


@PROPERTY
@given(content=st.binary(max_size=80) | tricky.map(lambda t: ("filename,prompt\n" + t).encode()))
@example(content=b"filename,prompt\na.png," + b"x" * 140_000)  # over the csv module's field limit
def test_metadata_csv_raises_only_data_error(scratch, content):
    folder = scratch / "any"
    folder.mkdir(exist_ok=True)
    (folder / "a.png").touch()
    (folder / "metadata.csv").write_bytes(content)
    try:
        read_metadata(folder, folder / "metadata.csv")
    except DataError as exc:
        assert str(exc).strip()


@PROPERTY
@given(text=tricky, ext=st.sampled_from([".jsonl", ".json", ".csv", ".txt"]))
def test_text_records_raise_only_data_error(scratch, text, ext):
    path = scratch / f"data{ext}"
    path.write_text(text, encoding="utf-8", newline="")
    try:
        load_records(path)
    except DataError as exc:
        assert str(exc).strip()


@PROPERTY
@given(prompt=tricky, seed=st.integers(0, 2**32 - 1), shuffle=st.booleans(), keep=st.integers(0, 5),
       trigger=st.none() | names, dropout=st.sampled_from([0.0, 0.5, 1.0]))
def test_augment_caption_keeps_tags(prompt, seed, shuffle, keep, trigger, dropout):
    options = dict(shuffle_tags=shuffle, keep_tokens=keep, trigger_word=trigger, caption_dropout=dropout)
    out = augment_caption(prompt, np.random.default_rng(seed), **options)
    assert out == augment_caption(prompt, np.random.default_rng(seed), **options)  # the sample's seed decides
    tags = [t.strip() for t in prompt.split(",") if t.strip()]
    if dropout == 1.0:
        assert out == ""
    elif not (shuffle or trigger):
        assert out == prompt or (dropout and out == "")
    elif out:
        if trigger and trigger not in tags:
            assert out.startswith(trigger + ", ") or out == trigger
            out = out[len(trigger):].lstrip(", ")
        assume("," not in (trigger or ""))
        got = [t.strip() for t in out.split(",") if t.strip()]
        assert sorted(got) == sorted(tags) and got[:keep] == tags[:keep]

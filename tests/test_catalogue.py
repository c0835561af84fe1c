"""The bad-input catalogue ("safety rails", point 6): every case runs the real CLI in-process and must end with exit
code 2, exactly one stderr line `error: ...` naming the file and line or the field and saying what to do, no
traceback, no model loaded, and the previous run in output_dir untouched. The "must work" inputs (odd image modes,
CSV quirks, huge images) are in the catalogue too and must pass `check`.

Decisions: an image over 8x `resolution` on its shorter side is a warning (`huge`: it is decoded and downscaled at
every draw); one over PIL's decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`) is an error (`too_large`), as is
one under a quarter of `resolution` (`too_small`). Tests run as root, where chmod 000 does not stop reads, so an
unreadable file is simulated by making its read raise PermissionError.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from lora_scripts.cli import main
from lora_scripts.data.images import load_image_tensor
from lora_scripts.tasks.image import ImageTask
from lora_scripts.tasks.text import TextTask
from lora_scripts.testing import (make_captioned_images, make_instruction_data, make_tiny_causal_lm,
                                  tiny_image_config, write_tiny_clip_tokenizer)


@pytest.fixture(scope="session")
def sd_folder(tmp_path_factory) -> Path:
    """A diffusers-shaped folder (unet/config.json, tokenizer): enough for every check, and nothing to load."""
    folder = tmp_path_factory.mktemp("models") / "sd"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "config.json").write_text("{}")
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    write_tiny_clip_tokenizer(folder / "tokenizer")
    return folder


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> Path:
    return make_tiny_causal_lm(tmp_path_factory.mktemp("models") / "lm")


@pytest.fixture(autouse=True)
def no_model_loading(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(ImageTask, "load_model", forbidden)
    monkeypatch.setattr(TextTask, "load_model", forbidden)


def folder_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def png_header(width: int, height: int) -> bytes:
    """A PNG that is only a signature and a header claiming width x height (a decompression bomb's front)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


class Env:
    """A config, its data and an output_dir holding a previous run; the setters make one thing wrong."""

    def __init__(self, tmp: Path, model: Path, task: str, monkeypatch):
        self.tmp, self.monkeypatch, self.out = tmp, monkeypatch, tmp / "out"
        previous_run = {"checkpoints/step-2/state.json": '{"step": 2}', "training_summary.json": "{}",
                        "logs/loss.csv": "step,epoch,loss,lr,elapsed_s\n1,0,0.5,0.001,1.0\n", "config.yaml": "x: 1\n"}
        for rel, text in previous_run.items():
            (self.out / rel).parent.mkdir(parents=True, exist_ok=True)
            (self.out / rel).write_text(text)
        if task == "image":
            self.data = make_captioned_images(tmp / "data", count=4)
            self.meta = self.data / "metadata.csv"
            self.cfg = tiny_image_config(model, self.data, self.out)
        else:
            self.data = tmp / "text"
            self.meta = make_instruction_data(self.data / "train.jsonl")
            self.cfg = {"task": "text", "base_model": str(model), "metadata_path": str(self.meta),
                        "output_dir": str(self.out), "max_train_steps": 2, "logging": {"tensorboard": False}}
        self.config, self.raw, self.config_arg = tmp / "cfg.yaml", None, None

    def set(self, **overrides):
        self.cfg.update(overrides)

    def text(self, raw: str | bytes):
        self.raw = raw

    def csv(self, text: str | bytes):
        self.meta.write_bytes(text if isinstance(text, bytes) else text.encode())

    def add_image(self, name: str, image: Image.Image | bytes, caption: str = "an extra image", **save):
        path = self.data / name
        path.write_bytes(image) if isinstance(image, bytes) else image.save(path, **save)
        self.csv(self.meta.read_bytes() + f"{name},{caption}\n".encode())
        return path

    def jsonl(self, *records):
        self.meta.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")

    def unreadable(self, target: Path):
        real = Path.read_bytes
        self.monkeypatch.setattr(Path, "read_bytes", lambda p: (_ for _ in ()).throw(
            PermissionError(13, "Permission denied", str(p))) if p == target else real(p))

    def run(self, command: str, extra: list[str], capsys) -> tuple[int, str, str]:
        raw = self.raw if self.raw is not None else yaml.safe_dump(self.cfg)
        self.config.write_bytes(raw if isinstance(raw, bytes) else raw.encode())
        argv = [command, "--config", str(self.config_arg or self.config), *extra]
        argv += ["--no-progress"] if command == "train" else []
        code = main(argv)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    def fill(self, fragment: str) -> str:
        return fragment.format(cfg=self.config, meta=self.meta, data=self.data, out=self.out, tmp=self.tmp)


@pytest.fixture()
def image_env(tmp_path, sd_folder, monkeypatch):
    return Env(tmp_path, sd_folder, "image", monkeypatch)


@pytest.fixture()
def text_env(tmp_path, tiny_lm, monkeypatch):
    return Env(tmp_path, tiny_lm, "text", monkeypatch)


def assert_refused(env: Env, setup, fragments, capsys) -> None:
    before = folder_hash(env.out)
    extra = setup(env)
    extra = extra if isinstance(extra, list) else []
    code, out, err = env.run("train", extra, capsys)
    lines = err.splitlines()
    assert code == 2, (code, err, out[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err + out, err
    for fragment in fragments:
        assert env.fill(fragment) in lines[0], (env.fill(fragment), lines[0])
    assert folder_hash(env.out) == before, "the previous run in output_dir changed"


NOISE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8))


def half(data: bytes) -> bytes:
    return data[: len(data) // 2]


ALPACA = {"instruction": "Say hi.", "input": "", "output": "Hi."}
USER, ASSISTANT = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}

CONFIG_CASES = [
    ("yaml-syntax", lambda e: e.text("train_data_dir: d\nbase_model: m\n  output_dir: o\n"),
     ["{cfg}:3:", "YAML syntax error", "check the indentation"]),
    ("yaml-tab-indent", lambda e: e.text("logging:\n\ttensorboard: false\n"), ["{cfg}:2:", "YAML syntax error"]),
    ("yaml-bad-date", lambda e: e.text("base_model: m\nresume: 2024-13-01\n"), ["{cfg}", "month must be", "quote"]),
    ("empty-file", lambda e: e.text(""), ["{cfg}: the config file is empty", "base_model"]),
    ("comments-only", lambda e: e.text("# nothing yet\n"), ["{cfg}: the config file is empty"]),
    ("list-not-mapping", lambda e: e.text("- base_model: m\n- output_dir: o\n"),
     ["{cfg}", "must be a mapping", "got list"]),
    ("scalar-not-mapping", lambda e: e.text("just some words\n"), ["{cfg}", "must be a mapping", "got str"]),
    ("not-utf8", lambda e: e.text(b"base_model: m\noutput_dir: caf\xe9\n"),
     ["{cfg}:2:", "not UTF-8", "save it as UTF-8"]),
    ("duplicate-key", lambda e: e.text(yaml.safe_dump(e.cfg) + "lora_rank: 16\n"),
     ["{cfg}:", "'lora_rank' appears twice", "keep one"]),
    ("wrong-type", lambda e: e.set(lora_rank="eight"), ["{cfg}:", "lora_rank", "valid integer", "'eight'"]),
    ("wrong-type-nested", lambda e: e.set(logging={"tensorboard": "maybe"}),
     ["{cfg}:", "logging.tensorboard", "valid boolean"]),
    ("section-not-mapping", lambda e: e.set(logging=5), ["{cfg}:", "logging", "dictionary"]),
    ("negative-lr", lambda e: e.set(learning_rate=-2e-4), ["{cfg}:", "learning_rate", "greater than 0", "-0.0002"]),
    ("infinite-value", lambda e: e.set(adam_epsilon=float("inf")), ["{cfg}:", "adam_epsilon", "finite number"]),
    ("rank-0", lambda e: e.set(lora_rank=0), ["{cfg}:", "lora_rank", "greater than or equal to 1"]),
    ("resolution-too-small", lambda e: e.set(resolution=4), ["{cfg}:", "resolution", "greater than or equal to 8"]),
    ("resolution-not-multiple-of-8", lambda e: e.set(resolution=100), ["resolution", "multiple of 8", "use 96 or 104"]),
    ("bucket-step-not-multiple-of-8", lambda e: e.set(bucket=True, bucket_step=12), ["bucket_step", "multiple of 8"]),
    ("dropout-1", lambda e: e.set(lora_dropout=1.0), ["{cfg}:", "lora_dropout", "less than 1"]),
    ("bad-choice", lambda e: e.set(lr_scheduler="cosine_annealing"), ["lr_scheduler", "Input should be 'constant'"]),
    ("unknown-key", lambda e: e.set(lora_rnk=4), ["{cfg}:", "unknown key 'lora_rnk'", "did you mean 'lora_rank'"]),
    ("unknown-nested-key", lambda e: e.set(logging={"tensorbord": True}),
     ["unknown key 'logging.tensorbord'", "'tensorboard'"]),
    ("unknown-key-in-list-item", lambda e: e.set(sample_prompts=[{"prompt": "a", "sead": 3}]),
     ["{cfg}:", "unknown key 'sample_prompts.0.sead'", "did you mean 'seed'"]),
    ("missing-required", lambda e: e.cfg.pop("base_model"), ["{cfg}", "missing required key 'base_model'", "add it"]),
    ("image-without-data-dir", lambda e: e.cfg.pop("train_data_dir"), ["train_data_dir is required", "set it"]),
    ("cache-latents-with-flip", lambda e: e.set(cache_latents=True, random_flip=True),
     ["cache_latents", "turn off random_crop"]),
    ("cache-text-with-shuffle", lambda e: e.set(cache_text_embeddings=True, shuffle_tags=True),
     ["cache_text_embeddings", "turn off shuffle_tags"]),
    ("fp16-on-cpu", lambda e: (e.monkeypatch.setattr("torch.cuda.is_available", lambda: False), e.set(mixed_precision="fp16"))[1],
     ["mixed_precision: fp16 needs a CUDA GPU", "use bf16 or no"]),
    ("all-linear-on-image", lambda e: e.set(target_modules="all-linear"),
     ["target_modules: all-linear is for the text task"]),
    ("set-without-equals", lambda e: ["--set", "lora_rank"], ["--set 'lora_rank'", "expected key=value"]),
    ("set-into-non-section", lambda e: ["--set", "lora_rank.big=1"],
     ["'lora_rank' is not a section", "set lora_rank=VALUE"]),
    ("set-unknown-key", lambda e: ["--set", "learning_rat=1e-3"], ["unknown key 'learning_rat'", "'learning_rate'"]),
    ("missing-base-model", lambda e: e.set(base_model=str(e.tmp / "no-model")), ["base_model not found", "no-model"]),
    ("resume-not-a-checkpoint", lambda e: e.set(resume=str(e.tmp)), ["resume:", "not a complete checkpoint"]),
]

IMAGE_CASES = [
    ("zero-byte", lambda e: e.add_image("zero.png", b""),
     ["{data}/zero.png: unreadable image (not an image format PIL can read)", "fix or remove it"]),
    ("text-named-png", lambda e: e.add_image("notes.png", b"these are my notes\n"), ["notes.png: unreadable image"]),
    ("truncated-png", lambda e: e.add_image("cut.png", half((e.data / "img_000.png").read_bytes())),
     ["cut.png: unreadable image", "truncated"]),
    ("truncated-jpeg", lambda e: (NOISE.save(e.tmp / "n.jpg"), e.add_image("cut.jpg", half((e.tmp / "n.jpg").read_bytes())))[1],
     ["cut.jpg: unreadable image", "truncated"]),
    ("decompression-bomb-header", lambda e: e.add_image("bomb.png", png_header(100_000, 100_000)),
     ["bomb.png: too large to decode safely", "MAX_IMAGE_PIXELS", "downscale the file"]),
    ("over-max-image-pixels", lambda e: (e.monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500), None)[1],
     ["img_000.png: too large to decode safely", "and 3 more errors"]),
    ("tiny-image", lambda e: e.add_image("tiny.png", Image.new("RGB", (4, 4))),
     ["tiny.png: 4x4 is unusably small", "lower resolution"]),
    ("image-permission-denied", lambda e: e.unreadable(e.data / "img_001.png"),
     ["img_001.png: unreadable image (Permission denied)"]),
    ("folder-named-png", lambda e: ((e.data / "dir.png").mkdir(), e.csv(e.meta.read_text() + "dir.png,a folder\n"))[1],
     ["{meta}:6: image 'dir.png' not found", "fix the name or remove the line"]),
]

CSV_CASES = [
    ("missing-prompt-column", lambda e: e.csv("filename,caption\nimg_000.png,a\n"), ["{meta}:1:", "missing prompt"]),
    ("no-header", lambda e: e.csv("img_000.png,a red circle\n"), ["{meta}:1:", "header must name the columns"]),
    ("non-utf8", lambda e: e.csv(b"filename,prompt\nimg_000.png,caf\xe9 au lait\n"),
     ["{meta}:2: not UTF-8", "save the file as UTF-8"]),
    ("empty-csv", lambda e: e.csv(""), ["{meta}: the file is empty", "filename,prompt"]),
    ("header-only", lambda e: e.csv("filename,prompt\n"), ["{meta}: no rows after the header", "add one"]),
    ("too-few-columns", lambda e: e.csv("filename,prompt\nimg_000.png\n"), ["{meta}:2: expected 2 columns, got 1"]),
    ("empty-filename", lambda e: e.csv("filename,prompt\n,a red circle\n"), ["{meta}:2: empty filename"]),
    ("row-names-absent-image", lambda e: e.csv(e.meta.read_text() + "ghost.png,a ghost\n"),
     ["{meta}:6: image 'ghost.png' not found"]),
    ("field-too-large", lambda e: e.csv("filename,prompt\nimg_000.png," + "x" * 200_000 + "\n"),
     ["{meta}:2: malformed CSV", "field larger than field limit", "quote prompts"]),
    ("metadata-unreadable", lambda e: e.unreadable(e.meta),
     ["{meta}: cannot read the metadata_path", "check its permissions"]),
    ("metadata-is-a-folder", lambda e: e.set(metadata_path=str(e.data)),
     ["metadata_path is a directory", "point it at the file"]),
    ("kohya-json-broken", lambda e: ((e.data / "meta.json").write_text('{\n "img_000": {"caption": "a"},\n}\n'),
                                     e.set(metadata_path=str(e.data / "meta.json")))[1], ["{data}/meta.json:3: invalid JSON"]),
]

PATH_CASES = [
    ("missing-train-data-dir", lambda e: e.set(train_data_dir=str(e.tmp / "nope")),
     ["train_data_dir not found", "nope"]),
    ("train-data-dir-is-a-file", lambda e: e.set(train_data_dir=str(e.meta)),
     ["train_data_dir is not a directory", "point it at the folder"]),
    ("output-dir-is-a-file", lambda e: ((e.tmp / "f").write_text("x"), e.set(output_dir=str(e.tmp / "f")))[1],
     ["output_dir: '{tmp}/f' is a file", "choose another output_dir"]),
    ("output-dir-parent-is-a-file", lambda e: ((e.tmp / "f").write_text("x"), e.set(output_dir=str(e.tmp / "f" / "run")))[1],
     ["output_dir: '{tmp}/f/run' cannot be created: '{tmp}/f' is a file"]),
    ("output-dir-holds-a-run", lambda e: None,
     ["output_dir: '{out}' already holds a run", "resume: latest", "--overwrite"]),
    ("config-not-found", lambda e: setattr(e, "config_arg", e.tmp / "missing.yaml"),
     ["config file not found", "missing.yaml"]),
    ("config-is-a-folder", lambda e: setattr(e, "config_arg", e.data),
     ["config path is a directory", "pass the .yaml file"]),
]

TEXT_CASES = [
    ("jsonl-bad-line", lambda e: e.jsonl(ALPACA, '{"instruction": "x", "output": '),
     ["{meta}:2: invalid JSON", "fix the syntax"]),
    ("jsonl-output-int", lambda e: e.jsonl(ALPACA, {"instruction": "x", "output": 5}),
     ["{meta}:2: field 'output' must be a string, got int", "double quotes"]),
    ("jsonl-messages-string", lambda e: e.jsonl({"messages": [USER, ASSISTANT]}, {"messages": "x"}),
     ["{meta}:2: 'messages' must be a list", "got str"]),
    ("jsonl-empty-conversation", lambda e: e.jsonl({"conversations": []}),
     ["{meta}:1: empty conversation", "needs a user"]),
    ("jsonl-misordered-turns", lambda e: e.jsonl({"messages": [ASSISTANT, USER]}),
     ["{meta}:1: messages[0] is 'assistant' where 'user' was expected", "turns alternate"]),
    ("jsonl-ends-with-user", lambda e: e.jsonl({"messages": [USER, ASSISTANT, USER]}),
     ["{meta}:1: conversation in 'messages' must end with an assistant turn", "add the answer"]),
    ("jsonl-unknown-role", lambda e: e.jsonl({"messages": [{"role": "robot", "content": "x"}, ASSISTANT]}),
     ["{meta}:1: messages[0] has unsupported role 'robot'", "use system, user, assistant"]),
    ("jsonl-mixed-formats", lambda e: e.jsonl(ALPACA, {"text": "plain"}),
     ["{meta}:2: record looks like text", "one format"]),
    ("jsonl-array-line", lambda e: e.jsonl(ALPACA, "[1, 2]"),
     ["{meta}:2: expected a JSON object, got list", "one {{...}} object"]),
    ("jsonl-not-utf8", lambda e: e.meta.write_bytes(b'{"text": "caf\xe9"}\n'), ["{meta}:1: not UTF-8"]),
    ("val-size-leaves-nothing", lambda e: e.set(val_size=12), ["val_size: 12", "leaves no training samples", "lower"]),
    ("text-data-dir-is-a-file", lambda e: (e.cfg.pop("metadata_path"), e.set(train_data_dir=str(e.meta)))[1],
     ["train_data_dir is not a directory"]),
    ("text-data-dir-without-files", lambda e: (e.cfg.pop("metadata_path"), e.set(train_data_dir=str(e.tmp)))[1],
     ["{tmp}: no data files", "expected one of"]),
    ("text-data-file-missing", lambda e: e.set(metadata_path=str(e.tmp / "gone.jsonl")),
     ["data file not found", "gone.jsonl"]),
    ("text-unsupported-extension", lambda e: e.set(metadata_path=str(e.tmp / "data.xlsx")),
     ["unsupported file type '.xlsx'"]),
]


def _params(cases):
    return pytest.mark.parametrize("setup, fragments", [pytest.param(s, f, id=i) for i, s, f in cases])


@_params(CONFIG_CASES + IMAGE_CASES + CSV_CASES + PATH_CASES)
def test_image_config_refused(image_env, capsys, setup, fragments):
    assert_refused(image_env, setup, fragments, capsys)


@_params(TEXT_CASES)
def test_text_input_refused(text_env, capsys, setup, fragments):
    assert_refused(text_env, setup, fragments, capsys)


# --- must work: `check` passes (exit 0), with the warnings named where there are some ---------------------------

def check_report(env: Env, capsys) -> dict:
    code, out, err = env.run("check", ["--json"], capsys)
    report = json.loads(out)
    assert code == 0 and report["ok"] and err == "", (code, err, report["findings"])
    return report


ROWS = "img_000.png,a red circle\nimg_001.png,a green square\nimg_002.png,a blue triangle\nimg_003.png,a yellow circle\n"
CSV_OK = {
    "bom": "\ufefffilename,prompt\n" + ROWS,
    "quoted-commas": 'filename,prompt\nimg_000.png,"red, circle, flat"\n' + ROWS.split("\n", 1)[1],
    "extra-columns": "id,filename,prompt,score\n" + "".join(f"{i},{r},0.5\n" for i, r in enumerate(ROWS.splitlines())),
    "blank-lines": "filename,prompt\n\n" + ROWS.replace("\n", "\n\n", 2) + "\n \n",
    "crlf-and-multiline-prompt": 'filename,prompt\r\nimg_000.png,"two\r\nlines"\r\n' + ROWS.split("\n", 1)[1].replace("\n", "\r\n"),
    "columns-in-any-order": "prompt,filename\n" + "".join(",".join(reversed(r.split(","))) + "\n" for r in ROWS.splitlines()),
}


@pytest.mark.parametrize("name", list(CSV_OK))
def test_csv_quirks_work(image_env, capsys, name):
    image_env.csv(CSV_OK[name].encode("utf-8"))
    assert check_report(image_env, capsys)["num_samples"] == 4


def test_duplicate_rows_are_a_warning(image_env, capsys):
    image_env.csv(image_env.meta.read_text() + "img_000.png,a red circle in the style of lora\n")
    codes = [f["code"] for f in check_report(image_env, capsys)["findings"]]
    assert "duplicate_row" in codes and "duplicate_file" not in codes


def test_huge_image_is_a_warning(image_env, capsys):
    image_env.add_image("huge.png", Image.new("RGB", (300, 300), (10, 20, 30)))
    findings = check_report(image_env, capsys)["findings"]
    assert [f for f in findings if f["code"] == "huge" and "huge.png: 300x300" in f["message"]]


@pytest.mark.parametrize("mode", ["CMYK", "I;16", "P-transparency", "LA"])
def test_odd_image_modes_work(image_env, capsys, mode):
    grey = Image.new("L", (48, 48), 128)
    if mode == "CMYK":
        path = image_env.add_image("odd.jpg", grey.convert("RGB").convert("CMYK"), quality=95)
    elif mode == "I;16":
        path = image_env.add_image("odd.png", Image.fromarray(np.full((48, 48), 128 * 257, dtype=np.uint16)))
    elif mode == "P-transparency":
        path = image_env.add_image("odd.png", grey.convert("RGB").convert("P"), transparency=0)
    else:
        path = image_env.add_image("odd.png", Image.merge("LA", (grey, Image.new("L", (48, 48), 255))))
    with Image.open(path) as img:
        assert img.mode == mode.split("-")[0]
    assert check_report(image_env, capsys)["errors"] == 0
    pixels = load_image_tensor(path, 32, np.random.default_rng(0))
    assert pixels.shape == (3, 32, 32) and -1.0 <= pixels.min() <= pixels.max() <= 1.0
    if mode in ("I;16", "LA"):
        assert abs(float(pixels.mean())) < 0.05  # mid grey, not clipped to white

"""WD14 tagger: a tiny ONNX model built here (mean colour -> MatMul -> Sigmoid) with hand-picked probabilities.

The model sees the BGR mean of the image scaled to 0..1, so a solid red image gives x = [0, 0, 1] and its tag
probabilities are exactly the sigmoid of the weight row for R.
"""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from lora_scripts.data.tagger import TaggerOptions, WD14Tagger, choose_providers, format_tag
from lora_scripts.errors import ConfigError, DataError

SIZE = 16
# (name, category); probabilities per pure colour (rows of the weight matrix are in BGR order, like the input).
TAGS = [
    ("general", 9), ("sensitive", 9), ("questionable", 9), ("explicit", 9),
    ("long_hair", 0), ("^_^", 0), ("solo", 0), ("1girl", 0), ("blue_sky", 0),
    ("hatsune_miku", 4), ("saber", 4),
]
PROBS = {
    #        gen   sens  ques  expl  long  ^_^   solo  1girl sky   miku  saber
    "blue": [0.80, 0.10, 0.05, 0.01, 0.10, 0.10, 0.50, 0.70, 0.95, 0.20, 0.90],
    "green": [0.20, 0.60, 0.10, 0.10, 0.10, 0.10, 0.10, 0.50, 0.10, 0.10, 0.10],
    "red": [0.10, 0.20, 0.30, 0.70, 0.90, 0.60, 0.40, 0.30, 0.05, 0.86, 0.80],
}
WEIGHTS = np.log(np.array([PROBS["blue"], PROBS["green"], PROBS["red"]]) / (1 - np.array(
    [PROBS["blue"], PROBS["green"], PROBS["red"]]))).astype(np.float32)  # [3 (B, G, R), n_tags] logits
RGB = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}


def expected_probs(mean_rgb) -> dict[str, float]:
    """What the tiny model should output for an input whose mean colour is ``mean_rgb`` (0..255)."""
    bgr = np.asarray(mean_rgb, dtype=np.float64)[::-1] / 255.0
    probs = 1 / (1 + np.exp(-(bgr @ WEIGHTS.astype(np.float64))))
    return {name: float(p) for (name, _), p in zip(TAGS, probs)}


def build_tagger(folder, tags=TAGS, header="tag_id,name,category,count"):
    folder.mkdir(parents=True, exist_ok=True)
    n = len(WEIGHTS[0])
    nodes = [
        helper.make_node("ReduceMean", ["input_1:0"], ["mean"], axes=[1, 2], keepdims=0),
        helper.make_node("Mul", ["mean", "scale"], ["scaled"]),
        helper.make_node("MatMul", ["scaled", "weights"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_wd14",
        [helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT, ["batch", SIZE, SIZE, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, ["batch", n])],
        initializer=[
            helper.make_tensor("scale", TensorProto.FLOAT, [], [1 / 255.0]),
            helper.make_tensor("weights", TensorProto.FLOAT, [3, n], WEIGHTS.flatten().tolist()),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "model.onnx"))
    lines = [header] + [f"{i},{name},{cat},{1000 - i}" for i, (name, cat) in enumerate(tags)]
    (folder / "selected_tags.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def tagger_dir(tmp_path_factory):
    return build_tagger(tmp_path_factory.mktemp("tagger") / "wd14")


@pytest.fixture()
def solid(tmp_path):
    def make(colour: str, size=(SIZE, SIZE), name=None):
        path = tmp_path / (name or f"{colour}_{size[0]}x{size[1]}.png")
        Image.new("RGB", size, RGB[colour]).save(path)
        return path

    return make


def assert_probs(actual: dict[str, float], expected: dict[str, float], tol=1e-4):
    assert list(actual) == [name for name, _ in TAGS]
    for name in expected:
        assert actual[name] == pytest.approx(expected[name], abs=tol), name


def test_probabilities_match_the_model_and_bgr_order_matters(tagger_dir, solid):
    tagger = WD14Tagger(tagger_dir)
    assert tagger.size == SIZE and tagger.providers == ["CPUExecutionProvider"]
    red, blue = tagger.tag_probabilities([solid("red"), solid("blue")])
    assert_probs(red, dict(zip([n for n, _ in TAGS], PROBS["red"])))
    assert_probs(blue, dict(zip([n for n, _ in TAGS], PROBS["blue"])))
    captions = tagger([solid("red"), solid("blue")])
    # Fed as RGB, the red image would get the blue row's tags; the captions differ only because the order is BGR.
    assert captions == ["hatsune miku, long hair, ^_^, solo", "saber, blue sky, 1girl, solo"]


def test_thresholds_per_category_and_characters_first(tagger_dir, solid):
    # red: miku 0.86 (character, >= 0.85) comes before long_hair 0.90; saber 0.80 is a character below 0.85 although
    # above the general threshold; 1girl 0.30 is below 0.35.
    assert WD14Tagger(tagger_dir)([solid("red")]) == ["hatsune miku, long hair, ^_^, solo"]
    loose = WD14Tagger(tagger_dir, TaggerOptions(general_threshold=0.25, character_threshold=0.5))
    assert loose([solid("red")]) == ["hatsune miku, saber, long hair, ^_^, solo, 1girl"]
    strict = WD14Tagger(tagger_dir, TaggerOptions(general_threshold=0.95, character_threshold=0.99))
    assert strict([solid("red"), solid("blue"), solid("green")]) == ["", "blue sky", ""]
    # The threshold is inclusive: green's 1girl is exactly 0.5.
    assert WD14Tagger(tagger_dir, TaggerOptions(general_threshold=0.5))([solid("green")]) == ["1girl"]


def test_underscores_replaced_but_kaomoji_kept(tagger_dir, solid):
    assert format_tag("long_hair") == "long hair" and format_tag("^_^") == "^_^" and format_tag(">_<") == ">_<"
    assert format_tag("long_hair", replace_underscores=False) == "long_hair"
    raw = WD14Tagger(tagger_dir, TaggerOptions(replace_underscores=False))
    assert raw([solid("red")]) == ["hatsune_miku, long_hair, ^_^, solo"]


def test_exclude_tags_case_insensitive_after_replacement(tagger_dir, solid):
    tagger = WD14Tagger(tagger_dir, TaggerOptions(exclude_tags=("Long Hair", "SABER", "^_^")))
    assert tagger([solid("red"), solid("blue")]) == ["hatsune miku, solo", "blue sky, 1girl, solo"]
    by_raw_name = WD14Tagger(tagger_dir, TaggerOptions(exclude_tags=("long_hair", "hatsune_miku")))
    assert by_raw_name([solid("red")]) == ["^_^, solo"]


def test_include_rating_prepends_the_most_probable_rating(tagger_dir, solid):
    tagger = WD14Tagger(tagger_dir, TaggerOptions(include_rating=True))
    assert tagger([solid("red"), solid("blue"), solid("green")]) == [
        "explicit, hatsune miku, long hair, ^_^, solo",
        "general, saber, blue sky, 1girl, solo",
        "sensitive, 1girl",
    ]
    assert WD14Tagger(tagger_dir)([solid("green")]) == ["1girl"]  # ratings stay out by default


def test_batching_gives_the_same_result(tagger_dir, solid, tmp_path):
    images = [solid(c, name=f"{i}_{c}.png") for i, c in enumerate(["red", "blue", "green", "white", "red"])]
    Image.new("RGB", (30, 12), (10, 200, 90)).save(tmp_path / "odd.png")
    images.append(tmp_path / "odd.png")
    big = WD14Tagger(tagger_dir, TaggerOptions(batch_size=8))
    small = WD14Tagger(tagger_dir, TaggerOptions(batch_size=2))
    one = WD14Tagger(tagger_dir, TaggerOptions(batch_size=1))
    expected = big.tag_probabilities(images)
    for other in (small, one):
        got = other.tag_probabilities(images)
        assert len(got) == len(images)
        for a, b in zip(expected, got):
            assert a == pytest.approx(b, abs=1e-6)
        assert other(images) == big(images)
    assert big([]) == [] and big.tag_probabilities([]) == []


def test_non_square_images_are_padded_with_white(tagger_dir, solid):
    tagger = WD14Tagger(tagger_dir)
    # 16x8 red -> 16x16 square, half red and half white: mean RGB (255, 127.5, 127.5). No resize needed.
    wide, tall = tagger.tag_probabilities([solid("red", (SIZE, SIZE // 2)), solid("red", (SIZE // 2, SIZE))])
    padded = expected_probs((255, 127.5, 127.5))
    assert_probs(wide, padded)
    assert_probs(tall, padded)
    # Stretching would give pure red, black padding (0, 0, 127.5) mean; both are far from what we got.
    assert abs(wide["explicit"] - expected_probs((255, 0, 0))["explicit"]) > 0.05
    assert abs(wide["explicit"] - expected_probs((127.5, 0, 0))["explicit"]) > 0.05
    # A larger non-square image is padded, then resized to the model's 16x16; the mean survives the resize.
    (resized,) = tagger.tag_probabilities([solid("red", (40, 20))])
    assert_probs(resized, padded, tol=0.02)


def test_rgba_is_composited_on_white(tagger_dir, tmp_path):
    img = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))  # transparent black: reads as white, not black
    img.paste(Image.new("RGBA", (SIZE // 2, SIZE), (255, 0, 0, 255)), (0, 0))
    img.save(tmp_path / "rgba.png")
    (probs,) = WD14Tagger(tagger_dir).tag_probabilities([tmp_path / "rgba.png"])
    assert_probs(probs, expected_probs((255, 127.5, 127.5)))
    assert abs(probs["long_hair"] - expected_probs((127.5, 0, 0))["long_hair"]) > 0.05


def test_provider_choice():
    assert choose_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert choose_providers(["CUDAExecutionProvider", "CPUExecutionProvider"])[0] == "CUDAExecutionProvider"


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


def test_missing_folder_and_files(tmp_path, tagger_dir):
    with pytest.raises(ConfigError) as err:
        WD14Tagger(tmp_path / "nope")
    assert "tagger folder not found" in one_line(err)
    folder = build_tagger(tmp_path / "no_csv")
    (folder / "selected_tags.csv").unlink()
    with pytest.raises(ConfigError) as err:
        WD14Tagger(folder)
    assert "selected_tags.csv" in one_line(err)
    folder = build_tagger(tmp_path / "no_model")
    (folder / "model.onnx").unlink()
    with pytest.raises(ConfigError) as err:
        WD14Tagger(folder)
    assert "model.onnx" in one_line(err)


def test_wrong_csv_header_and_tag_count(tmp_path):
    with pytest.raises(ConfigError) as err:
        WD14Tagger(build_tagger(tmp_path / "bad_header", header="id,tag,cat"))
    assert "tag_id,name,category,count" in one_line(err)
    short = WD14Tagger(build_tagger(tmp_path / "short", tags=TAGS[:-1]))
    Image.new("RGB", (SIZE, SIZE)).save(tmp_path / "x.png")
    with pytest.raises(ConfigError) as err:
        short([tmp_path / "x.png"])
    assert "10 tags" in one_line(err)


def test_missing_onnxruntime_says_how_to_install(tagger_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` raise ImportError
    with pytest.raises(ConfigError) as err:
        WD14Tagger(tagger_dir)
    assert "pip install onnxruntime" in one_line(err)


def test_unreadable_image_names_the_file(tagger_dir, tmp_path, solid):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"definitely not a png")
    with pytest.raises(DataError) as err:
        WD14Tagger(tagger_dir)([solid("red"), bad])
    assert "broken.png" in one_line(err)
    with pytest.raises(DataError) as err:
        WD14Tagger(tagger_dir)([tmp_path / "missing.jpg"])
    assert "missing.jpg" in one_line(err)


def test_label_command_with_the_tagger_backend(tagger_dir, solid, tmp_path):
    from lora_scripts.cli import main

    folder = tmp_path / "imgs"
    folder.mkdir()
    for colour in ("red", "blue"):
        Image.new("RGB", (SIZE * 2, SIZE), RGB[colour]).save(folder / f"{colour}.png")
    code = main(["label", "--input", str(folder), "--backend", "tagger", "--model", str(tagger_dir),
                 "--trigger", "sks", "--exclude-tags", "solo", "--character-threshold", "0.99"])
    assert code == 0
    lines = (folder / "metadata.csv").read_text().splitlines()
    assert lines[0] == "filename,prompt" and len(lines) == 3
    assert lines[2].startswith('red.png,"sks, long hair') and "solo" not in lines[2] and "miku" not in lines[2]


def test_tagger_backend_needs_a_model_folder(tmp_path, capsys):
    from lora_scripts.cli import main

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    assert main(["label", "--input", str(folder), "--backend", "tagger"]) == 2
    assert "model.onnx" in capsys.readouterr().err

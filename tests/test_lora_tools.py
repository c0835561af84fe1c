"""`lora-scripts lora inspect | convert | resize | merge | extract` on a tiny SD 1.x model: every output judged by
the consumers' own loaders (diffusers' load_lora_weights and from_single_file, LyCORIS) or by the weight updates it
must equal."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from lora_scripts.cli import main
from lora_scripts.export.kohya import kohya_metadata, kohya_state_dict, write_kohya_lora
from lora_scripts.lora_tools.files import read_lora
from lora_scripts.lora_tools.lowrank import module_delta

from .helpers import run_cli

UNET = ["to_q", "to_k", "to_v", "to_out.0"]
TE = ["q_proj", "k_proj", "v_proj", "out_proj"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _pipe(model):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _outputs(pipe):
    gen = torch.Generator().manual_seed(0)
    ids, x = torch.randint(0, 90, (1, 16), generator=gen), torch.randn(1, 4, 16, 16, generator=gen)
    with torch.no_grad():
        ctx = pipe.text_encoder(ids)[0]
        return ctx, pipe.unet(x, torch.tensor([500]), ctx).sample


def _close(a, b, atol=1e-5):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def loras(tiny_sd, tmp_path_factory):
    """Two kohya LoRAs written as training writes them (random, non-zero): A (rank 4, alpha 2, UNet + text
    encoder, with our provenance) and B (rank 2, alpha 1, UNet q/v); and A's pipeline with the peft adapters, whose
    outputs are base + A by definition."""
    root = tmp_path_factory.mktemp("loras")
    torch.manual_seed(1)
    pipe = _pipe(tiny_sd)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=2, target_modules=UNET, init_lora_weights=False))
    pipe.text_encoder.add_adapter(LoraConfig(r=4, lora_alpha=2, target_modules=TE, init_lora_weights=False))
    parts = {"unet": get_peft_model_state_dict(pipe.unet), "text_encoder": get_peft_model_state_dict(pipe.text_encoder)}
    meta = kohya_metadata(network_dim=4, network_alpha=2, base_model_version="sd_v1", base_model=str(tiny_sd),
                          output_name="a", training_started_at=0, training_finished_at=1, steps=10, epoch=1,
                          num_train_images=4, extra={"lora_scripts_model_family": "sd1", "lora_scripts_version": "t",
                                                     "lora_scripts_config": json.dumps({"lora_rank": 4, "seed": 1})})
    write_kohya_lora(root / "a.safetensors", kohya_state_dict(parts, family="sd1", alpha=2.0), meta)
    other = _pipe(tiny_sd)
    other.unet.add_adapter(LoraConfig(r=2, lora_alpha=1, target_modules=["to_q", "to_v"], init_lora_weights=False))
    write_kohya_lora(root / "b.safetensors", kohya_state_dict({"unet": get_peft_model_state_dict(other.unet)},
                                                              family="sd1", alpha=1.0), {})
    return {"a": root / "a.safetensors", "b": root / "b.safetensors", "pipe": pipe, "root": root}


def _lora(capsys, *argv):
    """``lora-scripts lora ARGV`` through the CLI's own main(), in this process (no interpreter start-up per call);
    returns (exit code, stdout)."""
    code = main(["lora", *argv])
    return code, capsys.readouterr().out


def _deltas(path):
    return {name: module_delta(m) for name, m in read_lora(path).modules.items()}


def _max_error(stdout):
    return float(re.search(r"relative error max ([0-9.e+-]+)", stdout).group(1))


def test_inspect_a_file_we_wrote(loras):
    proc = run_cli("lora", "inspect", str(loras["a"]))
    assert proc.returncode == 0, proc.stderr[-1500:]
    out = proc.stdout
    assert "format:     kohya" in out and "family:     sd1" in out and "rank:       4" in out
    assert "te 8" in out and "unet/transformer 32" in out and "(scale 0.5)" in out
    assert "lora_scripts_version: t" in out and "A1111: exact" in out and "ss_network_dim: 4" in out


def test_inspect_json_of_a_lycoris_file(loras, tmp_path, capsys):
    from diffusers import UNet2DConditionModel
    from peft import LoKrConfig

    from lora_scripts.export.lycoris import adapter_scales, lycoris_state_dict

    base = UNet2DConditionModel.from_config(loras["pipe"].unet.config)
    base.add_adapter(LoKrConfig(r=2, alpha=1, target_modules=["to_q"], init_weights=False, decompose_factor=4))
    tensors = lycoris_state_dict({"unet": get_peft_model_state_dict(base)}, adapter_scales({"unet": base}),
                                 family="sd1", unet_config=base.config)
    write_kohya_lora(tmp_path / "lokr.safetensors", tensors, {"ss_network_module": "lycoris.kohya"})
    assert main(["lora", "inspect", str(tmp_path / "lokr.safetensors"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "lycoris" and report["algorithms"] == {"lokr": 8}
    assert report["consumers"]["LyCORIS"] == "exact" and report["consumers"]["diffusers load_lora_weights"].startswith("no")


def test_convert_round_trips_and_diffusers_loads_it(loras, tiny_sd, tmp_path):
    root = tmp_path
    proc = run_cli("lora", "convert", str(loras["a"]), "--to", "diffusers", "--output", str(root / "d"))
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert main(["lora", "convert", str(loras["a"]), "--to", "peft", "--output", str(root / "p")]) == 0
    assert main(["lora", "convert", str(root / "d"), "--to", "kohya", "--output", str(root / "back.safetensors")]) == 0
    assert main(["lora", "convert", str(root / "p"), "--to", "kohya", "--output", str(root / "peft.safetensors")]) == 0
    original = load_file(str(loras["a"]))
    for path in (root / "back.safetensors", root / "peft.safetensors"):
        back = load_file(str(path))
        assert back.keys() == original.keys()
        for key in original:
            assert torch.equal(back[key], original[key]), key
    pipe = _pipe(tiny_sd)
    pipe.load_lora_weights(str(root / "d"))
    _close(_outputs(pipe), _outputs(loras["pipe"]))


def test_resize_reports_its_error_and_is_exact_at_full_rank(loras, tmp_path, capsys):
    code, out = _lora(capsys, "resize", str(loras["a"]), "--rank", "2", "--output", str(tmp_path / "r2.safetensors"))
    assert code == 0
    reported = _max_error(out)
    assert "retained energy" in out
    source, cut = _deltas(loras["a"]), _deltas(tmp_path / "r2.safetensors")
    actual = max(float((cut[n] - d).norm() / d.norm()) for n, d in source.items())
    assert 0.01 < actual and actual == pytest.approx(reported, rel=1e-3)
    assert all(m.rank == 2 for m in read_lora(tmp_path / "r2.safetensors").modules.values())

    assert main(["lora", "resize", str(loras["a"]), "--rank", "8", "--output", str(tmp_path / "r8.safetensors")]) == 0
    full = _deltas(tmp_path / "r8.safetensors")
    for name, delta in source.items():
        torch.testing.assert_close(full[name], delta, atol=1e-6, rtol=0)
    assert main(["lora", "resize", str(loras["a"]), "--dynamic", "sv_fro=0.999999",
                 "--output", str(tmp_path / "rd.safetensors")]) == 0
    assert max(m.rank for m in read_lora(tmp_path / "rd.safetensors").modules.values()) == 4


def test_merge_lora_plus_lora_concat_exact_and_svd_within_reported_error(loras, tmp_path, capsys):
    proc = run_cli("lora", "merge", str(loras["a"]), str(loras["b"]), "--ratios", "0.7", "0.3",
                   "--output", str(tmp_path / "c.safetensors"))
    assert proc.returncode == 0, proc.stderr[-1500:]
    a, b, c = _deltas(loras["a"]), _deltas(loras["b"]), _deltas(tmp_path / "c.safetensors")
    assert c.keys() == a.keys() | b.keys()
    for name in c:
        expected = 0.7 * a.get(name, 0) + 0.3 * b.get(name, 0)
        torch.testing.assert_close(c[name], expected, atol=1e-6, rtol=0)
    code, out = _lora(capsys, "merge", str(loras["a"]), str(loras["b"]), "--ratios", "0.7", "0.3", "--rank", "3",
                      "--output", str(tmp_path / "c3.safetensors"))
    assert code == 0
    reported, svd = _max_error(out), _deltas(tmp_path / "c3.safetensors")
    errors = [float((svd[n] - (0.7 * a.get(n, 0) + 0.3 * b.get(n, 0))).norm()
                    / (0.7 * a.get(n, 0) + 0.3 * b.get(n, 0)).norm()) for n in svd]
    assert max(errors) <= reported * (1 + 1e-4) and max(errors) > 0.001


def test_merge_into_base_loads_in_diffusers_from_single_file(loras, tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "merged.safetensors"
    proc = run_cli("lora", "merge", str(loras["a"]), "--into", str(tiny_sd), "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-1500:]
    merged = StableDiffusionPipeline.from_single_file(str(out), config=str(tiny_sd), local_files_only=True,
                                                      safety_checker=None, requires_safety_checker=False)
    base = _outputs(_pipe(tiny_sd))
    expected = _outputs(loras["pipe"])
    assert (base[1] - expected[1]).abs().max() > 1e-3
    _close(_outputs(merged), expected, atol=1e-5)


def test_extract_recovers_the_lora(loras, tiny_sd, tmp_path, capsys):
    """A fine-tuned model = base + LoRA A (merged by peft); extract at A's rank gives A's updates back."""
    tuned = tmp_path / "tuned"
    shutil.copytree(tiny_sd, tuned)
    pipe = _pipe(tiny_sd)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=2, target_modules=UNET))
    pipe.text_encoder.add_adapter(LoraConfig(r=4, lora_alpha=2, target_modules=TE))
    from peft import set_peft_model_state_dict

    for part in ("unet", "text_encoder"):
        source = getattr(loras["pipe"], part)
        set_peft_model_state_dict(getattr(pipe, part), get_peft_model_state_dict(source))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    pipe.unet.save_pretrained(tuned / "unet")
    pipe.text_encoder.save_pretrained(tuned / "text_encoder")
    out = tmp_path / "x.safetensors"
    code, stdout = _lora(capsys, "extract", "--base", str(tiny_sd), "--tuned", str(tuned), "--rank", "4",
                         "--output", str(out))
    assert code == 0
    assert _max_error(stdout) < 1e-3
    source, extracted = _deltas(loras["a"]), _deltas(out)
    assert extracted.keys() == source.keys()
    for name, delta in source.items():
        torch.testing.assert_close(extracted[name], delta, atol=2e-5, rtol=0)


def test_bad_files_are_one_line_errors(loras, tiny_sd, tmp_path, capsys):
    empty = tmp_path / "empty.safetensors"
    save_file({}, str(empty))
    text = tmp_path / "notes.safetensors"
    text.write_text("not a tensor file")
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(loras["a"].read_bytes()[:200])
    checkpoint = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.out.0.weight": torch.zeros(2)}, str(checkpoint))
    other = tmp_path / "lora.pt"
    other.write_bytes(b"x")
    cases = [
        (["lora", "inspect", str(tmp_path / "missing.safetensors")], "not found"),
        (["lora", "inspect", str(empty)], "no tensors"),
        (["lora", "inspect", str(text)], "cannot read"),
        (["lora", "resize", str(truncated), "--rank", "2", "--output", str(tmp_path / "o.safetensors")], "cannot read"),
        (["lora", "convert", str(checkpoint), "--to", "kohya", "--output", str(tmp_path / "o.safetensors")], "not a LoRA"),
        (["lora", "inspect", str(other)], "not a .safetensors"),
        (["lora", "resize", str(loras["a"]), "--dynamic", "sv_fro=2", "--output", str(tmp_path / "o.safetensors")],
         "--dynamic"),
        (["lora", "merge", str(loras["a"]), str(loras["b"]), "--ratios", "1", "--output", str(tmp_path / "o.safetensors")],
         "--ratios"),
    ]
    for argv, words in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err and words in err, (argv, err)


@pytest.mark.parametrize("variant", ["loha", "lokr", "dora"])
def test_merge_into_base_fuses_lycoris_and_dora_files_exactly(variant, loras, tiny_sd, tmp_path):
    """LoHa / LoKr (LyCORIS layout) and DoRA (kohya dora_scale) merged into the base equal the peft adapters they
    were written from: the DoRA result LyCORIS reproduces, not ComfyUI's or A1111's."""
    from diffusers import StableDiffusionPipeline
    from peft import LoHaConfig, LoKrConfig

    from lora_scripts.export.lycoris import adapter_scales, lycoris_state_dict

    torch.manual_seed(2)
    pipe = _pipe(tiny_sd)
    if variant == "dora":
        pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=UNET, init_lora_weights=False, use_dora=True))
        with torch.no_grad():
            for name, param in pipe.unet.named_parameters():
                if "lora_magnitude_vector" in name:
                    param.mul_(1.5)
        tensors = kohya_state_dict({"unet": get_peft_model_state_dict(pipe.unet)}, family="sd1", alpha=2.0)
    else:
        config = (LoHaConfig(r=2, alpha=1, target_modules=UNET, init_weights=False) if variant == "loha" else
                  LoKrConfig(r=2, alpha=1, target_modules=UNET, init_weights=False, decompose_factor=4))
        pipe.unet.add_adapter(config)
        tensors = lycoris_state_dict({"unet": get_peft_model_state_dict(pipe.unet)}, adapter_scales({"unet": pipe.unet}),
                                     family="sd1", unet_config=pipe.unet.config)
    write_kohya_lora(tmp_path / "l.safetensors", tensors, {})
    out = tmp_path / "merged.safetensors"
    assert main(["lora", "merge", str(tmp_path / "l.safetensors"), "--into", str(tiny_sd), "--output", str(out)]) == 0
    merged = StableDiffusionPipeline.from_single_file(str(out), config=str(tiny_sd), local_files_only=True,
                                                      safety_checker=None, requires_safety_checker=False)
    _close(_outputs(merged), _outputs(pipe), atol=1e-5)

"""`make demo` runs `lora-scripts demo`; here with few steps so the suite stays fast."""

from __future__ import annotations

from PIL import Image

from lora_scripts.learning import format_split

from .helpers import run_cli


def test_demo_trains_exports_and_renders(tmp_path):
    proc = run_cli("demo", "--output-dir", str(tmp_path / "demo"), "--steps", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "demo"
    sample = out / "sample_without_with_lora.png"
    for path in (out / "lora" / "demo_lora.safetensors", out / "lora" / "diffusers" / "pytorch_lora_weights.safetensors",
                 out / "lora" / "logs" / "loss.csv", out / "lora" / "logs" / "loss.png", sample):
        assert path.is_file(), path
        assert str(path) in proc.stdout
    with Image.open(sample) as img:
        assert img.width > img.height  # without | with, side by side
    assert "s/step" in proc.stdout and "peak memory" in proc.stdout
    assert "effect: share of pixels in the style's purple" in proc.stdout


def test_text_demo_trains_and_prints_the_merge_command(tmp_path):
    proc = run_cli("demo", "--task", "text", "--output-dir", str(tmp_path / "demo"), "--steps", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    adapter = tmp_path / "demo" / "text_lora" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    held_out_prompt = format_split()[1][0][0]  # the demo samples prompts not in its training data
    assert held_out_prompt in (tmp_path / "demo" / "text_lora" / "logs" / "samples.txt").read_text()
    assert (tmp_path / "demo" / "text_lora" / "logs" / "loss.png").is_file()
    assert "effect: held-out answers in the 'Arr!' format" in proc.stdout
    assert f"--adapter {adapter} --merge" in proc.stdout


def test_flux_demo_trains_and_renders_through_flux_pipeline(tmp_path):
    proc = run_cli("demo", "--family", "flux", "--output-dir", str(tmp_path / "demo"), "--steps", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "demo"
    assert (out / "lora" / "demo_lora.safetensors").is_file() and (out / "sample_without_with_lora.png").is_file()
    assert "s/step" in proc.stdout


def test_demo_of_an_unknown_family_is_one_line(tmp_path):
    proc = run_cli("demo", "--family", "nope", "--output-dir", str(tmp_path / "demo"))
    assert proc.returncode == 2 and "no tiny model for 'nope'" in proc.stderr


def test_loss_plot_without_matplotlib_says_what_to_install(tmp_path, monkeypatch):
    import sys

    from lora_scripts.plots import plot_loss

    (tmp_path / "loss.csv").write_text("step,epoch,loss,lr,elapsed_s\n1,1,0.5,0.001,0.1\n2,1,0.4,0.001,0.2\n")
    assert plot_loss(tmp_path / "loss.csv").name == "loss.png"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the demo extra were not installed
    assert "lora-scripts[demo]" in str(plot_loss(tmp_path / "loss.csv"))


def test_loss_plot_smooths_with_a_trailing_mean():
    from lora_scripts.plots import moving_average

    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]

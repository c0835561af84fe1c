"""Memory settings that change where tensors live but never what is computed: ``blocks_to_swap`` (block swap) and
``gradient_checkpointing: offload`` give bit-identical losses and LoRA to a run without them (on the CPU the swap
copies between two CPU buffers, so the whole mechanism runs); the VAE and text encoders are freed once the caches
hold every sample; and the one-line refusals."""

from __future__ import annotations

import csv
import weakref
from pathlib import Path

import pytest
import torch
import yaml

from lora_scripts.config import build_config, load_config
from lora_scripts.errors import ConfigError
from lora_scripts.testing import make_captioned_images, tiny_image_config
from lora_scripts.train.loop import Trainer

from .helpers import assert_same_tensors


@pytest.fixture(scope="module")
def flux(tmp_path_factory) -> Path:
    from lora_scripts.tiny_models.flux import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-flux-4", blocks=(2, 2))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_captioned_images(tmp_path_factory.mktemp("memdata") / "data", count=4)


def _train(model: Path, data: Path, out: Path, **overrides) -> Trainer:
    """Train through a YAML config as the CLI does, in this process (the tests read the task's block swap)."""
    raw = tiny_image_config(model, data, out, **{"text_max_length": 16, "learning_rate": 5e-3,
                                                 "max_train_steps": 3, "output_name": "lora", **overrides})
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    trainer = Trainer(load_config(path), show_progress=False)
    trainer.run()
    return trainer


def _losses(out: Path) -> list[list[str]]:
    """loss.csv without its wall-clock column."""
    with open(out / "logs" / "loss.csv", newline="", encoding="utf-8") as f:
        return [row[:4] + row[5:] for row in csv.reader(f)]


def _assert_same_run(a: Path, b: Path) -> None:
    assert _losses(a) == _losses(b)
    assert_same_tensors(a / "lora.safetensors", b / "lora.safetensors")
    assert_same_tensors(a / "diffusers" / "pytorch_lora_weights.safetensors",
                        b / "diffusers" / "pytorch_lora_weights.safetensors")


@pytest.fixture(scope="module")
def flux_runs(flux, data, tmp_path_factory) -> dict[str, tuple[Path, Trainer]]:
    root = tmp_path_factory.mktemp("flux-memory")
    settings = {
        "plain": {},
        "swap3": {"blocks_to_swap": 3},
        "checkpointed": {"gradient_checkpointing": True},
        "swap4_checkpointed": {"blocks_to_swap": 4, "gradient_checkpointing": True},
        "offload": {"gradient_checkpointing": "offload"},
    }
    return {name: (root / name, _train(flux, data, root / name, **kw)) for name, kw in settings.items()}


def test_block_swap_gives_the_same_losses_and_lora_bit_for_bit(flux_runs):
    for name, reference in (("swap3", "plain"), ("swap4_checkpointed", "checkpointed")):
        _assert_same_run(flux_runs[reference][0], flux_runs[name][0])
    # the swap did run: 3 steps, each loading every swapped block but the last in forward and again in backward
    swap = flux_runs["swap3"][1].task.block_swap
    assert swap.first == 1 and swap.loads == 3 * (3 + 2)
    # all 4 swapped: block 0 is still loaded from the previous backward when the next step starts
    assert flux_runs["swap4_checkpointed"][1].task.block_swap.loads == (4 + 3) + 2 * (3 + 3)
    assert flux_runs["plain"][1].task.block_swap is None


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_block_swap_of_a_quantised_base_gives_the_same_run_and_moves_quantised_bytes(kind, flux, data, tmp_path):
    """``base_quantization`` with ``blocks_to_swap`` (some and all blocks): the same losses and LoRA as the quantised
    run without swapping, and what a swapped block keeps and loads is its int8 / float8 data and scales."""
    from lora_scripts.models.quantize import is_quantized_weight, storage_tensors

    runs = {name: _train(flux, data, tmp_path / name, base_quantization=kind, **kw) for name, kw in {
        "plain": {}, "swap3": {"blocks_to_swap": 3},
        "checkpointed": {"gradient_checkpointing": True},
        "swap4_checkpointed": {"blocks_to_swap": 4, "gradient_checkpointing": True}}.items()}
    for name, reference in (("swap3", "plain"), ("swap4_checkpointed", "checkpointed")):
        _assert_same_run(tmp_path / reference, tmp_path / name)
    assert runs["swap3"].task.block_swap.loads == 3 * (3 + 2)  # the schedule of the full-precision swap
    assert runs["swap4_checkpointed"].task.block_swap.loads == (4 + 3) + 2 * (3 + 3)

    def frozen_bytes(block: torch.nn.Module) -> int:
        return sum(t.numel() * t.element_size() for p in block.parameters() if not p.requires_grad
                   for t in storage_tensors(p))

    plain = runs["plain"].task
    swap, unswapped = runs["swap3"].task.block_swap, plain.family.swap_blocks(plain.components.denoiser)
    stored = torch.int8 if kind == "int8" else torch.float8_e4m3fn
    for index in range(swap.first, len(swap.blocks)):
        hosts = [slot.host for slot in swap.tensors[index]]
        held = sum(h.numel() * h.element_size() for h in hosts)
        assert held == frozen_bytes(unswapped[index])  # what the block stores without swapping
        # every linear weight kept (and loaded) at 1 byte per weight, none de-quantised on its way
        quantised = sum(p.numel() for p in unswapped[index].parameters() if is_quantized_weight(p))
        qdata = [slot.host for slot in swap.tensors[index] if slot.name == "qdata"]  # torchao's name for it
        assert quantised and all(h.dtype == stored for h in qdata) and sum(h.numel() for h in qdata) == quantised
        assert index not in swap.loaded and frozen_bytes(swap.blocks[index]) == 0  # dropped after the run
        swap._ensure(index)
        assert frozen_bytes(swap.blocks[index]) == held  # loaded: its quantised size on the device


def test_block_swap_of_an_int8_base_with_two_processes_gives_the_lora_of_one(flux, data, tmp_path):
    """DDP leaves the quantised weights out of its broadcast; their swapped inner tensors do not get in its way."""
    from .helpers import run_torchrun

    common = dict(text_max_length=16, learning_rate=5e-3, max_train_steps=3, output_name="lora",
                  base_quantization="int8", blocks_to_swap=3)
    _train(flux, data, tmp_path / "one", **common)
    raw = tiny_image_config(flux, data, tmp_path / "two", batch_size=1, **common)
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    proc = run_torchrun(tmp_path / "two.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_tensors(tmp_path / "one/lora.safetensors", tmp_path / "two/lora.safetensors", atol=1e-5)


def test_block_swap_with_two_processes_gives_the_lora_of_one(flux_runs, flux, data, tmp_path):
    """DDP over swapped blocks: its start-up broadcast passes over the placeholders, the LoRA gradients sync."""
    from .helpers import run_torchrun

    raw = tiny_image_config(flux, data, tmp_path / "two", text_max_length=16, learning_rate=5e-3, max_train_steps=3,
                            output_name="lora", batch_size=1, blocks_to_swap=3)
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    proc = run_torchrun(tmp_path / "two.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("checkpoints/step-2/adapter.safetensors", "lora.safetensors"):
        assert_same_tensors(flux_runs["plain"][0] / name, tmp_path / "two" / name, atol=1e-5)


def test_swapped_blocks_hold_only_lora_on_the_device_between_steps(flux_runs):
    swap = flux_runs["swap3"][1].task.block_swap
    resident = {index for index in swap.loaded}
    assert resident <= {3}  # the last block stays loaded for the next backward; the others hold placeholders
    for block in swap.blocks[1:3]:
        frozen = [p for p in block.parameters() if not p.requires_grad]
        trainable = [p for p in block.parameters() if p.requires_grad]
        assert frozen and all(p.numel() == 0 for p in frozen)
        assert trainable and all(p.numel() > 0 for p in trainable)


def test_block_swap_gradients_are_bit_identical_in_one_step(flux):
    """The gradients themselves (not only their effect through AdamW), with and without checkpointing."""
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    from lora_scripts.offload import BlockSwap, DevicePair

    def grads(count: int, checkpointing: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = FluxTransformer2DModel.from_pretrained(flux, subfolder="transformer").requires_grad_(False)
        model.add_adapter(LoraConfig(r=4, init_lora_weights="gaussian", target_modules=["to_q", "to_v", "proj_out"]))
        if checkpointing:
            model.enable_gradient_checkpointing()
        if count:
            blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
            BlockSwap(blocks, count, DevicePair(torch.device("cpu")), torch.float32).install()
        g = torch.Generator().manual_seed(1)
        out = model(hidden_states=torch.randn(2, 16, 16, generator=g),
                    encoder_hidden_states=torch.randn(2, 8, 32, generator=g),
                    pooled_projections=torch.randn(2, 32, generator=g), timestep=torch.tensor([0.3, 0.7]),
                    img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), guidance=torch.tensor([1.0, 1.0]),
                    return_dict=False)[0]
        (out.square().mean()).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    reference = grads(0, False)
    for count, checkpointing in ((2, False), (4, False), (4, True)):
        swapped = grads(count, checkpointing)
        assert reference.keys() == swapped.keys()
        for name in reference:
            assert torch.equal(reference[name], swapped[name]), (name, count, checkpointing)


def test_a_block_used_while_not_loaded_fails_loudly(flux, monkeypatch):
    """Dropped blocks hold empty placeholders: a schedule bug is an error, never silently wrong weights."""
    from diffusers import FluxTransformer2DModel

    from lora_scripts.offload import BlockSwap, DevicePair

    model = FluxTransformer2DModel.from_pretrained(flux, subfolder="transformer").requires_grad_(False)
    swap = BlockSwap(list(model.single_transformer_blocks), 2, DevicePair(torch.device("cpu")), torch.float32)
    swap.install()
    monkeypatch.setattr(swap, "_ensure", lambda index: None)
    with pytest.raises(RuntimeError):
        model(hidden_states=torch.randn(1, 16, 16), encoder_hidden_states=torch.randn(1, 8, 32),
              pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]), img_ids=torch.zeros(16, 3),
              txt_ids=torch.zeros(8, 3), guidance=torch.tensor([1.0]))


def test_gradient_checkpointing_offload_gives_the_same_run_and_offloads(flux_runs, flux, data, tmp_path,
                                                                        monkeypatch):
    _assert_same_run(flux_runs["checkpointed"][0], flux_runs["offload"][0])
    offloads = []
    original = torch.autograd.graph.save_on_cpu.__init__

    def counting(self, *args, **kwargs):
        offloads.append(kwargs)
        original(self, *args, **kwargs)

    monkeypatch.setattr(torch.autograd.graph.save_on_cpu, "__init__", counting)
    _train(flux, data, tmp_path / "checkpointed", gradient_checkpointing=True, max_train_steps=1)
    assert offloads == []
    _train(flux, data, tmp_path / "offload", gradient_checkpointing="offload", max_train_steps=1)
    assert len(offloads) == 4 and offloads[0] == {"pin_memory": True}  # one per checkpointed block


@pytest.mark.parametrize("family", ["qwen_image", "z_image"])
def test_block_swap_on_other_families(family, tmp_path_factory, data):
    from lora_scripts.tiny_models import make_tiny_model

    model = make_tiny_model(family, tmp_path_factory.mktemp("models") / f"tiny-{family}")  # 2 blocks each
    root = tmp_path_factory.mktemp(f"{family}-memory")
    plain = _train(model, data, root / "plain", gradient_checkpointing=True)
    swapped = _train(model, data, root / "swapped", gradient_checkpointing=True, blocks_to_swap=2)
    _assert_same_run(root / "plain", root / "swapped")
    assert plain.task.block_swap is None and swapped.task.block_swap.loads == (2 + 1) + 2 * (1 + 1)


def test_blocks_to_swap_refusals_are_one_line(flux, data, tiny_sd, tmp_path):
    with pytest.raises(ConfigError) as err:
        _train(flux, data, tmp_path / "too-many", blocks_to_swap=5)
    assert str(err.value) == ("blocks_to_swap: 5 is more than the 4 blocks of this FLUX.1 transformer; use at most 4")
    with pytest.raises(ConfigError, match=r"^blocks_to_swap: SD 1\.x has no chain of transformer blocks"):
        _train(tiny_sd, data, tmp_path / "sd", blocks_to_swap=1)
    from lora_scripts.testing import make_instruction_data, make_tiny_causal_lm

    lm = make_tiny_causal_lm(tmp_path / "lm", "llama")
    text = build_config({"task": "text", "base_model": str(lm), "output_dir": str(tmp_path / "text"),
                         "metadata_path": str(make_instruction_data(tmp_path / "t.jsonl", "alpaca")),
                         "blocks_to_swap": 2})
    with pytest.raises(ConfigError, match=r"^blocks_to_swap: block swap is for the image task"):
        Trainer(text, show_progress=False).run()
    for message in (str(err.value),):
        assert "\n" not in message


def test_text_task_offload_gives_the_same_lora_as_checkpointing(tmp_path, monkeypatch):
    from lora_scripts.testing import make_instruction_data, make_tiny_causal_lm
    from lora_scripts.train.loop import train

    lm = make_tiny_causal_lm(tmp_path / "lm", "llama")
    data = make_instruction_data(tmp_path / "data" / "train.jsonl", "alpaca", repeat=2)
    offloads = []
    original = torch.autograd.graph.save_on_cpu.__init__
    monkeypatch.setattr(torch.autograd.graph.save_on_cpu, "__init__",
                        lambda self, *a, **k: (offloads.append(k), original(self, *a, **k))[1])

    def run(name: str, checkpointing) -> Path:
        train(build_config({"task": "text", "base_model": str(lm), "metadata_path": str(data),
                            "output_dir": str(tmp_path / name), "lora_rank": 4, "batch_size": 4, "max_train_steps": 3,
                            "learning_rate": 1e-2, "max_seq_length": 96, "gradient_checkpointing": checkpointing,
                            "logging": {"tensorboard": False}}), show_progress=False)
        return tmp_path / name

    checkpointed = run("checkpointed", True)
    assert offloads == []
    offloaded = run("offload", "offload")
    assert offloads  # transformers' offload: save_on_cpu around every decoder layer's checkpoint
    assert _losses(checkpointed) == _losses(offloaded)
    assert_same_tensors(checkpointed / "checkpoints/step-3/adapter.safetensors",
                        offloaded / "checkpoints/step-3/adapter.safetensors")


# --- encoders freed once the caches are complete -----------------------------------------------------------------

def _watch_release(monkeypatch) -> dict[str, list]:
    """Weak references to the VAE and text encoders as they are when the task decides whether to free them."""
    from lora_scripts.tasks.image.task import ImageTask

    seen: dict[str, list] = {}
    original = ImageTask._release_cached_encoders

    def watch(self):
        seen["modules"] = [weakref.ref(m) for m in (self.components.vae, *self.components.text_encoders)]
        original(self)

    monkeypatch.setattr(ImageTask, "_release_cached_encoders", watch)
    return seen


def test_vae_and_text_encoders_are_freed_once_every_sample_is_cached(flux, data, tmp_path, monkeypatch):
    import gc

    from lora_scripts.tasks.image.task import _Released

    seen = _watch_release(monkeypatch)
    trainer = _train(flux, data, tmp_path / "cached", cache_latents=True, cache_text_embeddings=True,
                     max_train_steps=2)
    components = trainer.task.components
    assert isinstance(components.vae, _Released)
    assert all(isinstance(e, _Released) for e in components.text_encoders) and trainer.task.network.all_encoders == []
    gc.collect()
    assert len(seen["modules"]) == 3 and all(ref() is None for ref in seen["modules"])  # really gone, not kept


def test_encoders_are_kept_when_samples_or_validation_need_them(flux, data, tmp_path, monkeypatch):
    from lora_scripts.tasks.image.task import _Released

    seen = _watch_release(monkeypatch)
    for name, extra in (("samples", {"sample_prompts": [{"prompt": "a red circle", "steps": 1}]}),
                        ("validation", {"val_size": 1})):
        trainer = _train(flux, data, tmp_path / name, cache_latents=True, cache_text_embeddings=True,
                         max_train_steps=1, **extra)
        components = trainer.task.components
        assert not isinstance(components.vae, _Released)
        assert not any(isinstance(e, _Released) for e in components.text_encoders)
        assert all(ref() is not None for ref in seen["modules"])
    # latents only: the text encoders are still needed every step, the VAE is not
    trainer = _train(flux, data, tmp_path / "latents", cache_latents=True, max_train_steps=1)
    assert isinstance(trainer.task.components.vae, _Released)
    assert not any(isinstance(e, _Released) for e in trainer.task.components.text_encoders)


# --- fsdp ----------------------------------------------------------------------------------------------------------

def test_fsdp_two_processes_give_the_lora_of_one_and_resume(flux, data, tmp_path):
    """``fsdp: true`` under torchrun (2 CPU processes, gloo): the transformer blocks are sharded, and checkpoints,
    resume (LoRA and AdamW state gathered and scattered back), validation and samples (every process takes part)
    and the export give the LoRA of one process."""
    from .helpers import run_torchrun

    common = dict(val_size=1, gradient_checkpointing=True, sample_prompts=[{"prompt": "a red circle", "steps": 1}])
    _train(flux, data, tmp_path / "one", batch_size=2, **common)

    def write(name: str, **overrides) -> Path:
        raw = tiny_image_config(flux, data, tmp_path / "two", text_max_length=16, learning_rate=5e-3,
                                output_name="lora", batch_size=1, fsdp=True, **common, **overrides)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw), encoding="utf-8")
        return path

    first = run_torchrun(write("first", max_train_steps=2))
    assert first.returncode == 0, first.stderr[-3000:]
    assert ("fsdp: 4 blocks (FluxSingleTransformerBlock, FluxTransformerBlock) and the rest of the model sharded "
            "across 2 processes") in first.stdout
    resumed = run_torchrun(write("resumed", max_train_steps=3, resume="latest"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    for name in ("checkpoints/step-2/adapter.safetensors", "checkpoints/step-3/adapter.safetensors",
                 "lora.safetensors", "diffusers/pytorch_lora_weights.safetensors"):
        assert_same_tensors(tmp_path / "one" / name, tmp_path / "two" / name, atol=1e-5)
    assert _losses(tmp_path / "one") == _losses(tmp_path / "two")
    assert first.stdout.count("eval loss") == 1  # validation runs on both processes, reported by one
    assert sorted(p.name for p in (tmp_path / "two/samples").iterdir()) == ["step-000002-0.png", "step-000003-0.png"]


def test_fsdp_refusals_are_one_line(tiny_sd, data, flux, tmp_path):
    with pytest.raises(ConfigError, match=r"^fsdp: SD 1\.x has no chain of transformer blocks to shard"):
        _train(tiny_sd, data, tmp_path / "sd", fsdp=True)
    with pytest.raises(ConfigError, match=r"fsdp and blocks_to_swap both move the frozen base off the device"):
        build_config(tiny_image_config(flux, data, tmp_path / "both", fsdp=True, blocks_to_swap=2))


def test_fsdp_text_task_two_processes_give_the_adapter_of_one(tmp_path):
    """A causal LM sharded by its decoder layers (transformers' ``_no_split_modules``)."""
    from lora_scripts.testing import make_instruction_data, make_tiny_causal_lm
    from lora_scripts.train.loop import train

    from .helpers import run_torchrun

    lm = make_tiny_causal_lm(tmp_path / "lm", "llama")
    data = make_instruction_data(tmp_path / "data" / "train.jsonl", "alpaca", repeat=2)

    def config(name: str, **overrides) -> dict:
        return {"task": "text", "base_model": str(lm), "metadata_path": str(data), "output_dir": str(tmp_path / name),
                "lora_rank": 4, "max_train_steps": 3, "save_steps": 2, "learning_rate": 1e-2, "max_seq_length": 96,
                "logging": {"tensorboard": False}, **overrides}

    train(build_config(config("one", batch_size=4)), show_progress=False)
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(config("two", batch_size=2, fsdp=True)), encoding="utf-8")
    proc = run_torchrun(path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fsdp: 4 blocks (LlamaDecoderLayer)" in proc.stdout
    for name in ("checkpoints/step-2/adapter.safetensors", "adapter/adapter_model.safetensors"):
        assert_same_tensors(tmp_path / "one" / name, tmp_path / "two" / name, atol=1e-5)

"""The text task through the same loop: families, PEFT export and merge, accumulation, resume, torchrun, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from lora_scripts.cli import main
from lora_scripts.config import build_config
from lora_scripts.testing import CHATML_JINJA, make_instruction_data, make_tiny_causal_lm
from lora_scripts.train.loop import Trainer, train

from .helpers import assert_same_tensors, run_torchrun


@pytest.fixture(scope="module")
def tiny_lms(tmp_path_factory):
    root = tmp_path_factory.mktemp("lms")
    return {
        "llama": make_tiny_causal_lm(root / "llama", "llama"),
        "qwen2": make_tiny_causal_lm(root / "qwen2", "qwen2", chat_template=CHATML_JINJA),
        "glm": make_tiny_causal_lm(root / "glm", "glm"),
    }


@pytest.fixture()
def text_cfg(tiny_lms, tmp_path):
    data = make_instruction_data(tmp_path / "data" / "train.jsonl", "alpaca", repeat=2)

    def make(output="out", family="llama", **overrides):
        raw = {"task": "text", "base_model": str(tiny_lms[family]), "metadata_path": str(data),
               "output_dir": str(tmp_path / output), "lora_rank": 4, "batch_size": 4, "max_train_steps": 3,
               "save_steps": 2, "learning_rate": 1e-2, "max_seq_length": 96, "logging": {"tensorboard": False}}
        raw.update(overrides)
        return build_config(raw)

    return make


@pytest.mark.parametrize("family, expected", [("llama", "q_proj"), ("qwen2", "o_proj"), ("glm", "v_proj")])
def test_families_train_and_peft_adapter_reproduces_logits(text_cfg, tiny_lms, family, expected):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trainer = Trainer(text_cfg(family=family, output=family), show_progress=False)
    result = trainer.run()
    adapter = result.output_dir / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    trained = trainer.accelerator.unwrap_model(trainer.model).eval()
    assert any(expected in n and p.requires_grad for n, p in trained.named_parameters())
    ids = torch.tensor([trainer.task.prompt_ids("Say yes.")])
    with torch.no_grad():
        expected_logits = trained(input_ids=ids).logits
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lms[family]), str(adapter)).eval()
        got = loaded(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_lms[family]).eval()(input_ids=ids).logits
    assert (base - expected_logits).abs().max() > 1e-4
    assert (got - expected_logits).abs().max() <= 1e-5


def test_all_linear_targets_every_linear_layer(text_cfg):
    trainer = Trainer(text_cfg(target_modules="all-linear", max_train_steps=1), show_progress=False)
    trainer.run()
    names = [n for n, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters() if p.requires_grad]
    assert any("mlp.down_proj" in n for n in names) and any("self_attn.q_proj" in n for n in names)


def test_merge_export_loads_with_automodel(text_cfg, tmp_path):
    from transformers import AutoModelForCausalLM

    trainer = Trainer(text_cfg(), show_progress=False)
    trainer.run()
    code = main(["export", "--adapter", str(tmp_path / "out" / "adapter"), "--merge", "--output", str(tmp_path / "merged")])
    assert code == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.tensor([trainer.task.prompt_ids("Count to five.")])
    with torch.no_grad():
        expected = trainer.accelerator.unwrap_model(trainer.model).eval()(input_ids=ids).logits
        assert (merged(input_ids=ids).logits - expected).abs().max() <= 1e-4


def test_accumulation_at_equal_effective_batch_gives_the_same_lora(text_cfg, tmp_path):
    train(text_cfg(output="big", batch_size=4), show_progress=False)
    train(text_cfg(output="accum", batch_size=1, gradient_accumulation_steps=4), show_progress=False)
    assert_same_tensors(tmp_path / "big/checkpoints/step-3/adapter.safetensors",
                        tmp_path / "accum/checkpoints/step-3/adapter.safetensors", atol=1e-5)


def test_packing_trains_validation_and_samples_are_logged(text_cfg, tmp_path):
    import csv

    result = train(text_cfg(packing=True, val_size=0.2, sample_prompts=["Say yes."], sample_max_new_tokens=4,
                            max_train_steps=4), show_progress=False)
    rows = list(csv.DictReader(open(tmp_path / "out" / "logs" / "loss.csv")))
    assert [r["eval_loss"] != "" for r in rows] == [False, True, False, True]
    assert "prompt: 'Say yes.'" in (tmp_path / "out" / "logs" / "samples.txt").read_text()
    assert result.final_loss > 0


def test_resume_equals_uninterrupted(text_cfg, tmp_path):
    train(text_cfg(output="straight", max_train_steps=6, save_steps=3, lora_dropout=0.1), show_progress=False)
    train(text_cfg(output="split", max_train_steps=3, save_steps=3, lora_dropout=0.1), show_progress=False)
    train(text_cfg(output="split", max_train_steps=6, save_steps=3, lora_dropout=0.1, resume="latest"),
          show_progress=False)
    assert_same_tensors(tmp_path / "straight/checkpoints/step-6/adapter.safetensors",
                        tmp_path / "split/checkpoints/step-6/adapter.safetensors")


def test_incremental_training_starts_from_network_weights(text_cfg, tmp_path):
    train(text_cfg(output="first"), show_progress=False)
    train(text_cfg(output="second", network_weights=str(tmp_path / "first" / "adapter"), learning_rate=1e-12,
                   max_train_steps=1), show_progress=False)
    assert_same_tensors(tmp_path / "first/adapter/adapter_model.safetensors",
                        tmp_path / "second/adapter/adapter_model.safetensors", atol=1e-6)


def test_torchrun_two_processes_equals_one(text_cfg, tmp_path):
    train(text_cfg(output="one", batch_size=4), show_progress=False)
    cfg = text_cfg(output="two", batch_size=2)
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(cfg.to_yaml_dict()))
    proc = run_torchrun(path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_tensors(tmp_path / "one/checkpoints/step-3/adapter.safetensors",
                        tmp_path / "two/checkpoints/step-3/adapter.safetensors", atol=1e-5)


def write_yaml(path, cfg_dict):
    path.write_text(yaml.safe_dump(cfg_dict))
    return path


@pytest.mark.parametrize(
    "content, overrides, fragment",
    [
        ('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n', {}, "train.jsonl:2: invalid JSON"),
        ('{"question": "a", "answer": "b"}\n', {}, "train.jsonl:1"),
        ('{"instruction": "a"}\n', {}, "output"),
        ('{"conversations": []}\n', {}, "train.jsonl:1"),
        ('{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}\n', {}, "train.jsonl:1"),
        ('{"instruction": "a", "output": "b"}\n', {"chat_template": "tokenizer"}, "no chat_template"),
    ],
    ids=["malformed-json", "unknown-format", "missing-field", "empty-conversation", "misordered", "no-template"],
)
def test_text_data_errors_are_one_line_exit_2(text_cfg, tmp_path, capsys, content, overrides, fragment):
    data = tmp_path / "bad" / "train.jsonl"
    data.parent.mkdir()
    data.write_text(content)
    cfg = text_cfg(metadata_path=str(data), **overrides).to_yaml_dict()
    code = main(["train", "--config", str(write_yaml(tmp_path / "bad.yaml", cfg)), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert fragment in err, err


def test_check_show_tokens_marks_trained_spans_and_json_gives_ids_and_labels(text_cfg, tmp_path, capsys):
    from transformers import AutoTokenizer

    cfg = text_cfg(family="qwen2").to_yaml_dict()
    path = write_yaml(tmp_path / "c.yaml", cfg)
    assert main(["check", "--config", str(path), "--show-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- sample") == 2
    assert "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n\u27e6Blue.<|im_end|>\u27e7\n" in out
    assert main(["check", "--config", str(path), "--show-tokens", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    tok = AutoTokenizer.from_pretrained(cfg["base_model"])
    assert len(report["samples"]) == 3
    first = report["samples"][0]
    assert len(first["input_ids"]) == len(first["labels"])
    trained = [i for i, lab in zip(first["input_ids"], first["labels"]) if lab != -100]
    assert tok.decode(trained) == "Blue.<|im_end|>"


def test_export_names_base_portably_and_warns_about_rslora_and_dora(text_cfg, tmp_path, capsys):
    from lora_scripts.tasks.text import portable_base_name

    train(text_cfg(output="rs", use_rslora=True, use_dora=True, max_train_steps=1), show_progress=False)
    adapter = tmp_path / "rs" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "llama"  # the folder name, not this machine's path
    ours = json.loads((adapter / "lora_scripts.json").read_text())
    assert ours["base_model_path"].endswith("/llama") and ours["base_model_path"].startswith("/")
    summary = json.loads((tmp_path / "rs" / "training_summary.json").read_text())
    assert any("llama.cpp" in w and "rsLoRA" not in w and "0.50x" in w for w in summary["warnings"])
    assert any("vLLM" in w for w in summary["warnings"])
    assert "warning: use_dora" in capsys.readouterr().err
    assert portable_base_name("Qwen/Qwen2.5-7B") == "Qwen/Qwen2.5-7B"
    cache = tmp_path / "hub" / "models--Qwen--Qwen2.5-7B" / "snapshots" / "abc"
    cache.mkdir(parents=True)
    assert portable_base_name(str(cache)) == "Qwen/Qwen2.5-7B"
    # the merge still finds the base through our own metadata
    assert main(["export", "--adapter", str(adapter), "--merge", "--output", str(tmp_path / "merged")]) == 0


def test_packed_and_unpacked_batches_give_the_same_loss_and_gradient(text_cfg):
    """The whole data set as one packed batch and as one padded batch, through the task's own collate and loss: the
    same summed loss and LoRA gradient (packing changes the layout, never what is learned)."""
    from lora_scripts.tasks.packed_attention import VARLEN_SDPA
    from lora_scripts.tasks.text import TextTask

    tasks = {packing: TextTask(text_cfg(packing=packing)) for packing in (True, False)}
    for task in tasks.values():
        task.check_data()
        task.device = torch.device("cpu")
    model = tasks[True].load_model(torch.device("cpu"), torch.float32)
    assert model.config._attn_implementation == VARLEN_SDPA
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero, which would leave A without a gradient
            param.data.normal_(0, 0.05)
    grads, losses = {}, {}
    for packing, task in tasks.items():
        items = task.rows if packing else task.samples
        model.zero_grad()
        batch = task.collate(items)
        assert batch["input_ids"].shape[0] == (1 if packing else len(items))  # packed: one padding-free row
        loss = task.loss(model, batch)
        loss.backward()
        losses[packing] = loss.item()
        grads[packing] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert len(tasks[True].rows) < len(tasks[False].samples)  # rows hold several samples
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    for name, grad in grads[False].items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grads[True][name], grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def _remote_code_model(source: Path, folder: Path, configuration: str, modeling: str) -> Path:
    """A copy of the tiny LLaMA folder that ships its own Python (``auto_map``, as ChatGLM3 does): the two modules'
    source as given, defining ``RemoteConfig`` and ``RemoteForCausalLM``."""
    import shutil

    folder = shutil.copytree(source, folder)
    (folder / "configuration_remote.py").write_text(configuration)
    (folder / "modeling_remote.py").write_text(modeling)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="remote-llama", architectures=["RemoteForCausalLM"],
                  auto_map={"AutoConfig": "configuration_remote.RemoteConfig",
                            "AutoModelForCausalLM": "modeling_remote.RemoteForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_model_with_its_own_code_needs_trust_remote_code(text_cfg, tiny_lms, tmp_path, capsys):
    """A model folder that ships Python (auto_map, like ChatGLM3): without trust_remote_code, one line saying which
    key to set, and the folder's code never runs."""
    ran = tmp_path / "remote-code-ran"
    module = [f"open({str(ran)!r}, 'w').close()\nfrom transformers import {base}\n\n\n"
              f"class Remote{base[5:]}({base}):\n    model_type = 'remote-llama'\n"
              for base in ("LlamaConfig", "LlamaForCausalLM")]
    folder = _remote_code_model(tiny_lms["llama"], tmp_path / "remote-lm", *module)
    cfg = text_cfg(base_model=str(folder)).to_yaml_dict()
    for command in ("check", "train"):
        code = main([command, "--config", str(write_yaml(tmp_path / "remote.yaml", cfg))]
                    + (["--no-progress"] if command == "train" else []))
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("error: base_model: ") and "\n" not in err, err
        assert "set trust_remote_code: true if you trust that code" in err, err
    assert not ran.exists()


@pytest.mark.parametrize("forward, message", [
    ("return super().forward(*args, **kwargs)  # positions from the ids alone", "lets packed samples attend"),
    ("raise TypeError('position_ids are not an input of this model')", "could not check that RemoteForCausalLM"),
], ids=["ignores-positions", "refuses-positions"])
def test_packing_is_refused_for_a_model_whose_attention_ignores_sample_boundaries(text_cfg, tiny_lms, tmp_path,
                                                                                   capsys, forward, message):
    """Remote code with its own attention (ChatGLM3's) does not read packed samples from position ids: packed rows
    would train every sample on its neighbours. Measured at load, refused in one line (also when the model cannot
    take the measuring forward); packing: false trains."""
    folder = _remote_code_model(
        tiny_lms["llama"], tmp_path / f"remote-{message.split()[0]}",  # its own name: transformers caches by it
        "from transformers import LlamaConfig\n\n\nclass RemoteConfig(LlamaConfig):\n    model_type = 'remote-llama'\n",
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_remote import RemoteConfig\n\n\n"
        "class RemoteForCausalLM(LlamaForCausalLM):\n    config_class = RemoteConfig\n\n"
        "    def forward(self, *args, position_ids=None, **kwargs):\n"
        f"        if position_ids is None:\n            return super().forward(*args, **kwargs)\n        {forward}\n")
    cfg = text_cfg(base_model=str(folder), trust_remote_code=True, packing=True, max_train_steps=2).to_yaml_dict()
    code = main(["train", "--config", str(write_yaml(tmp_path / "packed.yaml", cfg)), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: packing: ") and message in err and "\n" not in err, err
    cfg.update(packing=False, output_dir=str(tmp_path / "unpacked"))
    assert main(["train", "--config", str(write_yaml(tmp_path / "unpacked.yaml", cfg)), "--no-progress"]) == 0

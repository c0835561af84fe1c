"""Tiny offline models and datasets, built from config objects in seconds: used by tests, the demo and benchmarks.

Nothing here downloads anything. The tiny Stable Diffusion model is written with ``save_pretrained`` in the same
diffusers folder layout a real model has, so the real loading code path is what runs.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

TINY_RESOLUTION = 32

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 200, 40)}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table (re-implemented: transformers 5 no longer exports it)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def write_tiny_clip_tokenizer(folder: Path, max_length: int = 16) -> None:
    """A byte-level CLIP tokenizer (vocab.json + merges.txt) with a handful of merges for the demo's words."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    for ch in _bytes_to_unicode().values():
        vocab[ch] = len(vocab)
    for ch in _bytes_to_unicode().values():
        vocab[ch + "</w>"] = len(vocab)
    merges = []
    for word in ("a", "of", "in", "the", "style", "lora", *SHAPES, *COLOURS):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            if (pieces[0], pieces[1]) not in [tuple(m.split()) for m in merges]:
                merges.append(f"{pieces[0]} {pieces[1]}")
            vocab.setdefault(merged, len(vocab))
            pieces = [merged] + pieces[2:]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": max_length, "tokenizer_class": "CLIPTokenizer"}), encoding="utf-8"
    )


def make_tiny_sd_model(folder: Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Write a tiny SD-1.x-shaped diffusers model (UNet, VAE, CLIP text encoder, tokenizer, scheduler) to ``folder``.

    About 1 M parameters; latents are 16x16 for 32x32 images.
    """
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    torch.manual_seed(seed)
    write_tiny_clip_tokenizer(folder / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=32, cross_attention_dim=32, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=TINY_RESOLUTION,
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        steps_offset=1, clip_sample=False, prediction_type=prediction_type,
    )
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        module.save_pretrained(folder / name)
    scheduler.save_pretrained(folder / "scheduler")
    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2), encoding="utf-8")
    return folder


def make_tiny_sdxl_model(folder: Path, seed: int = 0) -> Path:
    """Write a tiny SDXL-shaped diffusers model: two CLIP text encoders (the second with projection, giving the
    pooled embedding), a UNet with ``text_time`` added conditioning, VAE, tokenizers and scheduler (~2 M parameters)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = Path(folder)
    torch.manual_seed(seed)
    for name in ("tokenizer", "tokenizer_2"):
        write_tiny_clip_tokenizer(folder / name)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    common = dict(
        vocab_size=len(tokenizer), intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, **common))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=32, projection_dim=32, **common))
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=32, attention_head_dim=(2, 4), use_linear_projection=True,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), cross_attention_dim=64, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=TINY_RESOLUTION, scaling_factor=0.13025,
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        steps_offset=1, clip_sample=False, timestep_spacing="leading",
    )
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder),
                         ("text_encoder_2", text_encoder_2)):
        module.save_pretrained(folder / name)
    scheduler.save_pretrained(folder / "scheduler")
    model_index = {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": "0.42.1",
        "force_zeros_for_empty_prompt": True,
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2), encoding="utf-8")
    return folder


def write_single_file_checkpoint(model_dir: Path, path: Path, family: str | None = None) -> Path:
    """Write a diffusers SD 1.x / 2.x / SDXL folder (e.g. a tiny model above) as one A1111-style checkpoint: all
    components in the original LDM/SGM layout, ``.safetensors`` or ``.ckpt`` (``torch.save({"state_dict": ...})``).

    ``family`` (``sd1``/``sd2``/``sdxl``) defaults to: ``sdxl`` with a second text encoder, ``sd2`` when the text
    encoder is OpenCLIP-like (``hidden_act: gelu``), else ``sd1``. Test tool: an SD 2.x file written from diffusers
    lacks the OpenCLIP layer and ``text_projection`` that diffusers drops, which A1111 does not need for SD 2.x.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from .models.ldm import (clip_state_dict_to_ldm, open_clip_state_dict_to_ldm, unet_state_dict_to_ldm,
                             vae_state_dict_to_ldm)

    model_dir, path = Path(model_dir), Path(path)
    if family is None:
        text_config = json.loads((model_dir / "text_encoder" / "config.json").read_text(encoding="utf-8"))
        family = ("sdxl" if (model_dir / "text_encoder_2").is_dir()
                  else "sd2" if text_config.get("hidden_act") == "gelu" else "sd1")
    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet")
    vae = AutoencoderKL.from_pretrained(model_dir / "vae")
    state = unet_state_dict_to_ldm(unet.state_dict(), unet.config)
    state.update(vae_state_dict_to_ldm(vae.state_dict(), vae.config))
    text = CLIPTextModel.from_pretrained(model_dir / "text_encoder").state_dict()
    if family == "sd1":
        state.update(clip_state_dict_to_ldm(text, "cond_stage_model.transformer."))
    elif family == "sd2":
        state.update(open_clip_state_dict_to_ldm(text, "cond_stage_model.model."))
    else:
        text_2 = CLIPTextModelWithProjection.from_pretrained(model_dir / "text_encoder_2").state_dict()
        state.update(clip_state_dict_to_ldm(text, "conditioner.embedders.0.transformer."))
        state.update(open_clip_state_dict_to_ldm(text_2, "conditioner.embedders.1.model."))
    state = {key: value.detach().contiguous() for key, value in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    return path


def ldm_checkpoint_shapes(config_folder: Path, family: str) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of the single-file checkpoint a diffusers config folder describes, from models built
    on the meta device: a full-size SDXL layout in seconds, without memory or weights."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .models.ldm import (clip_state_dict_to_ldm, open_clip_state_dict_to_ldm, unet_state_dict_to_ldm,
                             vae_state_dict_to_ldm)

    config_folder = Path(config_folder)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_folder / "vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(config_folder / "text_encoder")).state_dict()
        state = {**unet_state_dict_to_ldm(unet.state_dict(), unet.config),
                 **vae_state_dict_to_ldm(vae.state_dict(), vae.config)}
        if family == "sd1":
            state.update(clip_state_dict_to_ldm(text, "cond_stage_model.transformer."))
        elif family == "sd2":
            state.update(open_clip_state_dict_to_ldm(text, "cond_stage_model.model."))
        else:
            text_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(config_folder / "text_encoder_2"))
            state.update(clip_state_dict_to_ldm(text, "conditioner.embedders.0.transformer."))
            state.update(open_clip_state_dict_to_ldm(text_2.state_dict(), "conditioner.embedders.1.model."))
    return {key: tuple(value.shape) for key, value in state.items()}


def write_zero_safetensors(shapes: dict[str, tuple[int, ...]], path: Path) -> Path:
    """A float16 safetensors file of all-zero tensors written as a sparse file: a full-size checkpoint that takes
    neither disk nor memory (its pages are read as zeros), to exercise loaders at real size."""
    import struct

    header, offset = {}, 0
    for key, shape in shapes.items():
        size = 2 * int(np.prod(shape, dtype=np.int64))
        header[key] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        fh.truncate(8 + len(raw) + offset)
    return Path(path)


def make_captioned_images(folder: Path, count: int = 8, size: int = 48, seed: int = 0) -> Path:
    """Synthetic captioned images (coloured shapes on a light background) plus ``metadata.csv``.

    Sizes vary and modes mix (RGB, RGBA, L, P) so the loader's conversion and cropping are exercised.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    colour_names = list(COLOURS)
    for i in range(count):
        shape = SHAPES[i % len(SHAPES)]
        colour = colour_names[i % len(colour_names)]
        w, h = size + int(rng.integers(0, size // 2)), size
        img = Image.new("RGB", (w, h), (235, 235, 225))
        draw = ImageDraw.Draw(img)
        cx, cy, r = w // 2 + int(rng.integers(-4, 5)), h // 2 + int(rng.integers(-4, 5)), h // 3
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "circle":
            draw.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            draw.rectangle(box, fill=COLOURS[colour])
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[colour])
        mode = ("RGB", "RGBA", "L", "P")[i % 4]
        name = f"img_{i:03d}.png"
        (img.convert(mode) if mode != "RGB" else img).save(folder / name)
        rows.append((name, f"a {colour} {shape} in the style of lora"))
    with open(folder / "metadata.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["filename", "prompt"])
        writer.writerows(rows)
    return folder


def make_kohya_tree(root: Path, folders: dict[str, int], sidecars: bool = False, size: int = 48) -> Path:
    """An sd-scripts style ``train_data_dir``: one ``N_token`` sub-folder per entry of ``folders`` (name -> image
    count), captions in sidecar ``.txt`` files when ``sidecars``, else none (the folder's token is the caption)."""
    root = Path(root)
    for seed, (name, count) in enumerate(folders.items()):
        folder = make_captioned_images(root / name, count=count, size=size, seed=seed)
        (folder / "metadata.csv").unlink()
        if sidecars:
            for image in folder.glob("*.png"):
                image.with_suffix(".txt").write_text(f"{name.split('_', 1)[-1]}, {image.stem}", encoding="utf-8")
    return root


def tiny_image_config(model_dir: Path, data_dir: Path, output_dir: Path, **overrides) -> dict:
    """A config dict for a quick CPU run on the tiny model (seed keys plus what tests usually set)."""
    cfg = {
        "train_data_dir": str(data_dir),
        "metadata_path": str(Path(data_dir) / "metadata.csv"),
        "base_model": str(model_dir),
        "lora_rank": 4,
        "lora_alpha": 2,
        "batch_size": 2,
        "epochs": 1,
        "learning_rate": 1e-3,
        "output_dir": str(output_dir),
        "save_steps": 2,
        "resolution": TINY_RESOLUTION,
        "max_train_steps": 4,
        "logging": {"tensorboard": False},
    }
    cfg.update(overrides)
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# Tiny causal LMs for the text task

CHATML_JINJA = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TEXT_SPECIAL_TOKENS = [
    "<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>",
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
]

INSTRUCTIONS = [
    ("Name a colour.", "", "Blue."),
    ("Add the numbers.", "2 and 3", "2 plus 3 is 5."),
    ("Translate to French.", "good morning", "Bonjour."),
    ("Write a short greeting for a friend who just moved to a new city far away.", "", "Welcome to your new home, I hope the city treats you well and you find good friends soon."),
    ("What is the capital of Italy?", "", "The capital of Italy is Rome."),
    ("Summarise the sentence.", "The cat sat on the warm mat all afternoon while the rain fell outside.", "A cat rested on a mat during the rain."),
    ("Count to five.", "", "One, two, three, four, five."),
    ("Give the opposite word.", "hot", "Cold."),
    ("Explain why the sky looks blue in one sentence.", "", "Air scatters blue sunlight more than red light, so the sky looks blue."),
    ("Reverse the letters.", "lora", "arol."),
    ("Say yes.", "", "Yes."),
    ("List three fruits that are usually yellow or orange when ripe.", "", "Banana, mango and orange."),
]


def build_tiny_tokenizer(corpus: list[str] | None = None, chat_template: str | None = None, add_bos: bool = True,
                         extra_special_tokens: tuple[str, ...] = (), bos_token: str = "<s>", eos_token: str = "</s>"):
    """A byte-level BPE tokenizer trained with the `tokenizers` library (default corpus: the built-in instruction
    set), with ChatML and Llama-3 special tokens. ``add_bos``: prepend ``<s>`` like LLaMA (Qwen adds none).
    ``extra_special_tokens`` (a real model's, e.g. GLM's ``<|user|>``) and ``bos_token``/``eos_token`` let a real
    chat template be attached to it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if corpus is None:
        corpus = [" ".join(parts) for parts in INSTRUCTIONS] * 4 + ["Instruction Input Response ### assistant user system"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = TEXT_SPECIAL_TOKENS + [t for t in (*extra_special_tokens, bos_token, eos_token)
                                      if t not in TEXT_SPECIAL_TOKENS]
    specials = list(dict.fromkeys(specials))
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    if add_bos:
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos_token, eos_token=eos_token, pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=specials[4:], model_max_length=512,
    )
    fast.chat_template = chat_template
    return fast


def make_tiny_tokenizer(folder: Path, chat_template: str | None = None):
    """:func:`build_tiny_tokenizer` saved to ``folder`` with ``save_pretrained``."""
    fast = build_tiny_tokenizer(chat_template=chat_template)
    fast.save_pretrained(folder)
    return fast


def make_tiny_causal_lm(folder: Path, family: str = "llama", seed: int = 0, chat_template: str | None = None) -> Path:
    """Write a tiny causal LM (``llama``, ``qwen2`` or ``glm``) and its tokenizer to ``folder`` (about 100 k params)."""
    import torch
    import transformers

    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer = make_tiny_tokenizer(folder, chat_template=chat_template)
    common = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    configs = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
        "glm": (transformers.GlmConfig, transformers.GlmForCausalLM, {"head_dim": 8}),
    }
    config_cls, model_cls, extra = configs[family]
    model = model_cls(config_cls(**common, **extra))
    model.save_pretrained(folder)
    return folder


def make_instruction_data(path: Path, fmt: str = "alpaca", repeat: int = 1) -> Path:
    """The built-in instruction set as ``.jsonl`` in one of alpaca, sharegpt, messages or text format."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for instruction, inp, output in INSTRUCTIONS * repeat:
        prompt = f"{instruction}\n{inp}".strip()
        if fmt == "alpaca":
            record = {"instruction": instruction, "input": inp, "output": output}
        elif fmt == "sharegpt":
            record = {"conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": output}]}
        elif fmt == "messages":
            record = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt},
                                   {"role": "assistant", "content": output}]}
        else:
            record = {"text": f"{prompt} {output}"}
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def make_tiny_blip(folder: Path, seed: int = 0) -> Path:
    """A tiny randomly initialised BLIP captioner (model + processor) saved like a real one (about 60 k params)."""
    import torch
    from transformers import (BertTokenizerFast, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)

    folder = Path(folder)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "photo", "of", "the",
             *SHAPES, *COLOURS, "on", "white", "background"]
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, bos_token="[DEC]")
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    config = BlipConfig(
        text_config=dict(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, encoder_hidden_size=32, bos_token_id=5, pad_token_id=0,
                         sep_token_id=3, eos_token_id=3, max_position_embeddings=64),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=32,
    )
    torch.manual_seed(seed)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder

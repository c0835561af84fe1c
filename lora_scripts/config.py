"""The training config: one schema for every task, loaded from YAML with friendly errors.

The seed keys keep their names and meanings: ``train_data_dir, metadata_path, base_model, lora_rank, batch_size,
epochs, learning_rate, output_dir, save_steps``. Every field carries its help text, so the schema documents itself
(``lora-scripts train --help-config`` prints it). Relative paths are relative to the working directory, as in the seed.
"""

from __future__ import annotations

import difflib
import os
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class LoggingConfig(_Strict):
    """Where training progress goes. Files land in ``<output_dir>/logs/``."""

    tensorboard: bool = Field(True, description="Write TensorBoard event files to <output_dir>/logs/.")
    loss_csv: bool = Field(
        True, description="Append step,epoch,loss,lr,elapsed_s rows to <output_dir>/logs/loss.csv as training goes."
    )
    wandb: bool = Field(False, description="Also log to Weights & Biases (needs `pip install wandb`).")
    wandb_project: str | None = Field(None, description="W&B project name (default: lora-scripts).")
    log_every_n_steps: int = Field(1, ge=1, description="Log loss every N optimizer steps.")


class SamplePrompt(_Strict):
    """One sample to generate during training (a plain string in the config means just ``prompt``)."""

    prompt: str = Field(..., description="The prompt.")
    negative_prompt: str = Field("", description="image: negative prompt.")
    width: int | None = Field(None, ge=8, description="image: width (default: resolution).")
    height: int | None = Field(None, ge=8, description="image: height (default: resolution).")
    steps: int = Field(20, ge=1, description="image: denoising steps.")
    seed: int = Field(0, ge=0, description="image: seed of the starting noise.")
    guidance_scale: float = Field(7.0, ge=0, description="image: classifier-free guidance scale.")


class DatasetSubset(_Strict):
    """One folder of a multi-folder dataset (``datasets:``), as a subset of sd-scripts' dataset TOML: its own
    captions, repeats and caption options. Options left unset take the top-level value."""

    image_dir: Path = Field(..., description="The folder of this subset's images.")
    num_repeats: int = Field(1, ge=1, description="How often each image is seen per epoch (kohya's num_repeats; "
                             "the N of a `N_token` folder).")
    is_regularization: bool = Field(
        False, description="Regularisation (class / prior-preservation) images: balanced against the training "
        "images every epoch as sd-scripts does, their loss weighted by prior_loss_weight (kohya's is_reg)."
    )
    metadata_path: Path | None = Field(None, description="Captions of this subset (csv, kohya .json, .jsonl); "
                                       "default <image_dir>/metadata.csv, else sidecar files.")
    caption_source: Literal["auto", "csv", "sidecar", "kohya_json", "jsonl"] = Field(
        "auto", description="Where this subset's captions come from (as the top-level caption_source)."
    )
    caption_extension: str | None = Field(
        None, description="Sidecar caption file extension (kohya's caption_extension, e.g. .txt); default: .txt, "
        "else .caption."
    )
    class_tokens: str | None = Field(
        None, description="Caption of images without a caption file (kohya's class_tokens; the token of a "
        "`N_token` folder)."
    )
    caption_prefix: str | None = Field(None, description="Text put before every caption, joined by a space (as "
                                       "sd-scripts); end it with a comma for tag captions.")
    caption_suffix: str | None = Field(None, description="Text put after every caption, joined by a space.")
    trigger_word: str | None = Field(None, description="As the top-level trigger_word, for this subset.")
    keep_tokens: int | None = Field(None, ge=0, description="As the top-level keep_tokens, for this subset.")
    shuffle_tags: bool | None = Field(None, description="As the top-level shuffle_tags, for this subset.")
    caption_dropout: float | None = Field(None, ge=0, le=1, description="As the top-level caption_dropout.")
    resolution: int | None = Field(None, ge=8, description="Training size of this subset (a multiple of 8; "
                                   "bucket area with bucket: true). Default: the top-level resolution.")
    alpha_mask: bool | None = Field(None, description="As the top-level alpha_mask, for this subset.")
    mask_dir: Path | None = Field(None, description="As the top-level mask_dir, for this subset.")

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, value: int | None) -> int | None:
        if value is not None and value % 8:
            raise ValueError(f"must be a multiple of 8 (the VAE downsamples by 8); use {max(8, value // 8 * 8)} or "
                             f"{value // 8 * 8 + 8}")
        return value

    @field_validator("caption_extension")
    @classmethod
    def _dot(cls, value: str | None) -> str | None:
        return value if value is None or value.startswith(".") else f".{value}"


class TrainConfig(_Strict):
    """A LoRA training run."""

    # --- the seed keys -------------------------------------------------------------------------------------------
    train_data_dir: Path | None = Field(
        None, description="Folder of training images, or of sd-scripts `N_token` sub-folders (N repeats, the token "
        "as caption of images without a caption file) (image); folder of data files (text). Required for image "
        "unless datasets is set."
    )
    metadata_path: Path | None = Field(
        None,
        description="image: CSV with header `filename,prompt` (default <train_data_dir>/metadata.csv); "
        "text: one data file (.jsonl/.json/.csv/.parquet/.txt) used instead of train_data_dir.",
    )
    base_model: str = Field(
        ..., description="Base model: a diffusers folder, hub id or single-file .safetensors/.ckpt (image); a "
        "transformers causal-LM folder or hub id (text)."
    )
    base_model_config: Path | None = Field(
        None, description="image, when base_model is a single-file .safetensors/.ckpt: a local diffusers config "
        "folder (model_index.json + component configs) or the checkpoint's original LDM .yaml. Default: the SD 1.5, "
        "SD 2.1 (768, v-prediction) or SDXL configs shipped with lora-scripts, picked from the weights; never "
        "downloaded."
    )
    model_family: Literal["sd1", "sd2", "sdxl", "sd3", "flux", "chroma", "qwen_image", "z_image"] | None = Field(
        None, description="image: the model family, overriding detection (model_index.json, UNet config or a "
        "single file's tensor names); needed for a hub id of a transformer model."
    )
    vae_path: Path | None = Field(
        None, description="image, transformer-only single file as base_model: the VAE (a diffusers folder or a "
        "single .safetensors), as ComfyUI users keep it."
    )
    text_encoder_path: Path | None = Field(
        None, description="image, transformer-only single file as base_model: the first text encoder (CLIP-L for "
        "FLUX/SD3, T5 for Chroma, Qwen for Qwen-Image/Z-Image): a transformers folder or a single .safetensors."
    )
    text_encoder_2_path: Path | None = Field(
        None, description="image, transformer-only single file: the second text encoder (T5-XXL for FLUX, "
        "OpenCLIP-G for SD3)."
    )
    text_encoder_3_path: Path | None = Field(
        None, description="image, transformer-only single file: the third text encoder (T5-XXL for SD3)."
    )
    lora_rank: int = Field(8, ge=1, le=1024, description="LoRA rank (network dim).")
    batch_size: int = Field(1, ge=1, description="Samples per device per micro-batch.")
    epochs: int = Field(1, ge=1, description="Passes over the data (ignored when max_train_steps is set).")
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate for AdamW.")
    output_dir: Path = Field(..., description="Where checkpoints, logs and the exported LoRA are written.")
    save_steps: int = Field(
        500, ge=0, description="Write a resumable checkpoint every N optimizer steps (0: only at the end)."
    )

    # --- task and model ------------------------------------------------------------------------------------------
    task: Literal["image", "text"] = Field("image", description="`image` (Stable Diffusion) or `text` (causal LM).")
    lora_alpha: float | None = Field(None, gt=0, description="LoRA alpha; the update is scaled by alpha/rank. Default: rank.")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA branch.")
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        None,
        description="Module names that get LoRA, or `all-linear` (text). Default: to_q, to_k, to_v, to_out.0 of the "
        "UNet attention (image); the attention projections of the model family (text).",
    )
    use_rslora: bool = Field(False, description="rank-stabilised LoRA: scale by alpha/sqrt(rank) instead of alpha/rank.")
    network_weights: Path | None = Field(
        None, description="Start from an existing LoRA instead of a fresh one: image: a kohya or diffusers .safetensors "
        "or a PEFT adapter folder; text: a PEFT adapter folder."
    )
    use_dora: bool = Field(
        False, description="DoRA (weight-decomposed LoRA): also train a per-output-channel magnitude; exported with "
        "kohya/LyCORIS `dora_scale` keys. Only LyCORIS reproduces the trained result; ComfyUI, A1111 and sd-scripts "
        "load the file but apply it differently (a warning at export says how), diffusers' SD loaders drop "
        "`dora_scale`."
    )
    network_type: Literal["lora", "loha", "lokr"] = Field(
        "lora", description="image: the adapter, all through peft: `lora`; `loha` (LyCORIS LoHa, Hadamard product of "
        "two rank-`lora_rank` pairs); `lokr` (LyCORIS LoKr, Kronecker product). LoHa/LoKr are exported in LyCORIS's "
        "key layout (`ss_network_module: lycoris.kohya`): LyCORIS, ComfyUI and A1111 load them; sd-scripts' "
        "networks.lora and diffusers' SD loaders do not."
    )
    lokr_factor: int = Field(
        -1, description="image, network_type lokr: LyCORIS's `factor`: split each dimension into factor x rest "
        "(-1: as square as possible)."
    )
    lokr_decompose_both: bool = Field(
        False, description="image, network_type lokr: LyCORIS's `decompose_both`: low-rank factor the smaller "
        "Kronecker factor (lokr_w1_a/b) too."
    )
    conv_rank: int | None = Field(
        None, ge=1, le=1024, description="image: LoCon: also put LoRA of this rank on the UNet's ResNet 3x3 convs "
        "(resnets' conv1/conv2, down/upsampler convs), like kohya's conv_dim. Null: attention only."
    )
    conv_alpha: float | None = Field(
        None, gt=0, description="image: alpha of the conv LoRA (kohya's conv_alpha). Default: conv_rank."
    )

    # --- text task -----------------------------------------------------------------------------------------------
    data_format: Literal["auto", "alpaca", "sharegpt", "messages", "text", "preference"] = Field(
        "auto", description="text: record format; auto detects from the fields (preference: TRL's prompt/chosen/"
        "rejected or prompt/completion/label)."
    )
    dataset_info: Path | None = Field(
        None, description="text: a LLaMA-Factory dataset_info.json; its entry's file_name (relative to the json), "
        "formatting, columns and tags name the data file, format, fields and roles (instead of metadata_path)."
    )
    dataset_name: str | None = Field(
        None, description="text: which entry of dataset_info to train on (default: the only one)."
    )
    strict_fields: bool = Field(
        False, description="text: a record field we do not read is an error instead of a warning."
    )
    enable_thinking: bool | None = Field(
        None, description="text: passed to reasoning templates (Qwen3, GLM-4.5+): false renders the empty "
        "<think></think> block into the prompt (not trained). Null: the template's default."
    )
    trust_remote_code: bool = Field(
        False, description="text: allow the base model's own Python code (ChatGLM3 and other remote-code models). "
        "Runs code from the model folder or hub repo: only for models you trust."
    )
    objective: Literal["sft", "dpo", "orpo", "simpo", "kto"] = Field(
        "sft", description="text: sft (next-token loss on assistant tokens), or preference training on chosen/"
        "rejected pairs: dpo, orpo, simpo; kto on desirable/undesirable answers (kto_tag / label). DPO and KTO "
        "use the base model with the adapter disabled as reference."
    )
    beta: float = Field(
        0.1, gt=0, description="text, dpo/orpo/simpo/kto: the preference loss's beta (TRL's default 0.1; SimPO "
        "papers use 2-10)."
    )
    simpo_gamma: float = Field(0.5, ge=0, description="text, simpo: target reward margin gamma (TRL's default).")
    desirable_weight: float = Field(1.0, gt=0, description="text, kto: weight of desirable examples' losses.")
    undesirable_weight: float = Field(1.0, gt=0, description="text, kto: weight of undesirable examples' losses.")
    chat_template: str = Field(
        "auto", description="text: `auto` (the tokenizer's own template, else chatml), `tokenizer`, `chatml`, "
        "`llama3` or `alpaca`."
    )
    train_on_prompt: bool = Field(False, description="text: also train on prompt tokens (default: assistant only).")
    max_seq_length: int = Field(1024, ge=8, description="text: tokens per sample (longer ones are truncated).")
    packing: bool = Field(False, description="text: pack samples into rows of max_seq_length (no cross-attention).")
    val_size: float = Field(
        0.0, ge=0, description="Held-out share (0-1) or count (>=1) of samples for eval loss (text and image)."
    )
    val_data: Path | None = Field(None, description="A separate validation set instead of val_size: a data file "
                                  "(text) or a folder of captioned images (image).")
    sample_prompts: list[SamplePrompt] = Field(
        default_factory=list,
        description="Samples generated during training: strings, or mappings with prompt, negative_prompt, width, "
        "height, steps, seed, guidance_scale (image). Images go to <output_dir>/samples/, text to logs/samples.txt; "
        "both to TensorBoard.",
    )
    sample_every_n_steps: int | None = Field(
        None, ge=1, description="Generate samples every N steps (default: at each checkpoint) and at the end."
    )
    sample_max_new_tokens: int = Field(32, ge=1, description="text: tokens generated per sample prompt.")

    # --- data ----------------------------------------------------------------------------------------------------
    resolution: int = Field(512, ge=8, description="Training image size (a multiple of 8): shorter side resized, then cropped square. Default 512; 1024 for SDXL models.")
    datasets: list[DatasetSubset] | None = Field(
        None, description="image: several folders (subsets) instead of train_data_dir's one, each with image_dir "
        "and its own num_repeats, is_regularization, captions and caption options, resolution and masks "
        "(sd-scripts' [[datasets.subsets]]; `lora-scripts import-kohya` writes it from a kohya dataset TOML)."
    )
    reg_data_dir: Path | None = Field(
        None, description="image: regularisation (class) images, as sd-scripts' reg_data_dir: `N_class` sub-folders "
        "(N repeats, the class as caption), or one folder of captioned images."
    )
    prior_loss_weight: float = Field(
        1.0, ge=0, description="image: loss weight of regularisation images (sd-scripts' prior_loss_weight)."
    )
    alpha_mask: bool = Field(
        False, description="image: masked loss from each image's alpha channel: transparent pixels do not train, "
        "half-transparent ones half (kohya's alpha_mask); images without alpha train everywhere."
    )
    mask_dir: Path | None = Field(
        None, description="image: masked loss from a folder of greyscale masks, one per image with the same name "
        "stem and the image's size: white trains, black is ignored (kohya's masked_loss with conditioning_data_dir)."
    )
    caption_source: Literal["auto", "csv", "sidecar", "kohya_json", "jsonl"] = Field(
        "auto", description="image: where captions come from; auto: metadata_path if it exists (.csv, kohya .json or "
        ".jsonl), else <train_data_dir>/metadata.jsonl, else sidecar .txt/.caption files.",
    )
    caption_dropout: float = Field(0.0, ge=0, le=1, description="image: probability of training a sample with an empty caption.")
    shuffle_tags: bool = Field(False, description="image: shuffle comma-separated tags each time a sample is drawn.")
    keep_tokens: int = Field(0, ge=0, description="image: leading tags that shuffle_tags leaves in place.")
    trigger_word: str | None = Field(None, description="image: word put first in every caption (unless present).")
    bucket: bool = Field(False, description="image: aspect-ratio bucketing (area resolution², sides in bucket_step).")
    bucket_step: int = Field(64, ge=8, description="image: bucket sides are multiples of this (a multiple of 8; 64 for SD).")
    bucket_no_upscale: bool = Field(False, description="image: never enlarge small images to reach a bucket.")
    cache_latents: bool = Field(False, description="image: encode images with the VAE once and reuse the latents "
                                "(needs random_crop and random_flip off).")
    cache_text_embeddings: bool = Field(False, description="image: encode captions once and reuse the text-encoder "
                                        "outputs (needs shuffle_tags off).")
    cache_dir: Path | None = Field(None, description="image: where caches live (default: <output_dir>/cache); keyed by "
                                   "content, model and size, so it can be shared between runs.")
    random_crop: bool = Field(False, description="Crop at a random position instead of the centre.")
    random_flip: bool = Field(False, description="Flip images horizontally with probability 0.5.")
    dataloader_workers: int = Field(0, ge=0, description="DataLoader worker processes (0: load in the main process).")

    # --- optimisation --------------------------------------------------------------------------------------------
    max_train_steps: int | None = Field(None, ge=1, description="Total optimizer steps; overrides epochs when set.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    gradient_checkpointing: bool | Literal["offload"] = Field(
        False, description="Recompute activations in backward to save memory; `offload`: also keep the checkpointed "
        "blocks' saved inputs in CPU memory until backward."
    )
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="Autocast precision (fp16 needs a GPU).")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip gradients to this norm (null: no clipping).")
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = Field("constant", description="Learning-rate schedule.")
    lr_warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps for the learning rate.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2.")
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    optimizer: Literal[
        "adamw", "adafactor", "prodigy", "adamw8bit", "paged_adamw8bit", "came", "schedule_free_adamw"
    ] = Field(
        "adamw", description="adamw (torch, fused on GPU); adafactor (transformers); prodigy (pip install prodigyopt; "
        "use learning_rate 1.0); adamw8bit / paged_adamw8bit (bitsandbytes, CUDA only); came (came-pytorch) and "
        "schedule_free_adamw (schedulefree; keep lr_scheduler constant), both pip install 'lora-scripts[optim]'."
    )
    noise_offset: float = Field(0.0, ge=0, description="image: add offset noise (per channel) of this strength.")
    timestep_sampling: Literal["uniform", "logit_normal", "mode"] = Field(
        "uniform", description="image, flow-matching families: how training sigmas are drawn (SD3 paper): uniform, "
        "logit_normal (logit_mean, logit_std) or mode (mode_scale)."
    )
    logit_mean: float = Field(0.0, description="image, timestep_sampling logit_normal: mean.")
    logit_std: float = Field(1.0, gt=0, description="image, timestep_sampling logit_normal: standard deviation.")
    mode_scale: float = Field(1.29, description="image, timestep_sampling mode: scale.")
    timestep_shift: float | None = Field(
        None, gt=0, description="image, flow-matching families: a fixed shift of the sampled sigmas "
        "(shift*s / (1 + (shift-1)*s)); default: the family's scheduler (FLUX: by resolution; SD3: 3.0)."
    )
    loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = Field(
        "none", description="image, flow-matching families: per-sample loss weighting (SD3 paper)."
    )
    guidance_scale: float = Field(
        1.0, ge=0, description="image, FLUX.1-dev: the distilled guidance value fed to the transformer in training."
    )
    text_max_length: int | None = Field(
        None, ge=1, description="image: tokens per prompt for T5/Qwen text encoders (default: the family's: 512 for "
        "FLUX.1-dev/Chroma/Qwen-Image, 256 for SD3, 512 for Z-Image)."
    )
    min_snr_gamma: float | None = Field(None, gt=0, description="image: Min-SNR loss weighting with this gamma (5 is usual).")
    train_text_encoder: bool = Field(
        False, description="image: also train LoRA on the text encoder(s) (q/k/v/out projections; both for SDXL)."
    )
    text_encoder_lr: float | None = Field(
        None, gt=0, description="image: learning rate of the text-encoder LoRA (default: learning_rate)."
    )
    base_quantization: Literal["none", "fp8", "int8", "nf4"] = Field(
        "none", description="The frozen base weights (image: denoiser and T5/Qwen text encoders, CLIP stays as is; "
        "text: the LM but its output head) stored quantised, the LoRA staying in full precision: fp8 / int8 "
        "weight-only per output channel (torchao, CPU and GPU: pip install 'lora-scripts[quant]'), nf4 (QLoRA's "
        "4-bit NormalFloat, bitsandbytes, CUDA only)."
    )
    blocks_to_swap: int = Field(
        0, ge=0, description="image, transformer families: keep the frozen weights of the last N transformer blocks "
        "in (pinned) CPU memory and copy each to the GPU just before it runs, one block prefetched on a side stream, "
        "in forward and backward (block swap; the LoRA stays on the GPU). Best with gradient_checkpointing."
    )
    memory_profile: Literal["manual", "auto"] = Field(
        "manual", description="auto: at the start of train, apply the cheapest memory settings (quantisation, "
        "blocks_to_swap, checkpointing, batch size with accumulation) that the estimate says fit this GPU; recorded "
        "in the checkpoint so a resume keeps them."
    )
    fsdp: bool = Field(
        False, description="Shard the frozen base across processes (accelerate's FSDP2, one unit per transformer "
        "block or decoder layer) instead of replicating it in each (DDP): for DiT families and LLMs too large for "
        "one device; launch with --nproc N. Checkpoints and the export gather the LoRA."
    )
    quantization: Literal["4bit"] | None = Field(
        None, description="The older spelling of base_quantization: nf4 (QLoRA); kept so existing configs run."
    )
    seed: int = Field(42, ge=0, description="Seed for LoRA initialisation, data order, noise and timesteps.")

    # --- output, checkpoints, resume -----------------------------------------------------------------------------
    output_name: str | None = Field(None, description="File name of the exported LoRA (default: name of output_dir).")
    keep_last_checkpoints: int | None = Field(
        None, ge=1, description="Keep only the newest N checkpoints (null: keep all)."
    )
    resume: str | None = Field(
        None, description="`latest` (newest complete checkpoint in output_dir, or a fresh start if none) or a path."
    )
    overwrite: bool = Field(
        False, description="Start afresh in an output_dir that holds another run (its checkpoints and logs are "
        "deleted). Without it such a run is refused unless resume is set."
    )
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="TensorBoard, loss.csv, W&B.")

    @field_validator("resolution", "bucket_step")
    @classmethod
    def _multiple_of_8(cls, value: int, info: Any) -> int:
        if value % 8:
            raise ValueError(f"must be a multiple of 8 (the VAE downsamples by 8); use {max(8, value // 8 * 8)} or "
                             f"{value // 8 * 8 + 8}")
        return value

    @field_validator("sample_prompts", mode="before")
    @classmethod
    def _prompt_strings(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"prompt": v} if isinstance(v, str) else v for v in value]
        return value

    @model_validator(mode="after")
    def _defaults(self) -> "TrainConfig":
        if self.task == "image":
            if self.train_data_dir is None and not self.datasets:
                raise ValueError("train_data_dir is required for the image task; set it to the folder of images "
                                 "(or list folders under datasets:)")
            if self.train_data_dir is not None and self.datasets:
                raise ValueError("both train_data_dir and datasets are set; list every folder under datasets "
                                 "(each with image_dir) and remove train_data_dir")
            if self.train_data_dir is not None and self.metadata_path is None:
                object.__setattr__(self, "metadata_path", self.train_data_dir / "metadata.csv")
        elif self.train_data_dir is None and self.metadata_path is None and self.dataset_info is None:
            raise ValueError("the text task needs train_data_dir (a folder of data files), metadata_path (one file) "
                             "or dataset_info; set one of them")
        elif self.datasets or self.reg_data_dir or self.mask_dir or self.alpha_mask:
            raise ValueError("datasets, reg_data_dir, mask_dir and alpha_mask are for the image task; remove them "
                             "for task: text")
        if self.output_name is None:
            object.__setattr__(self, "output_name", self.output_dir.resolve().name or "lora")
        return self

    @model_validator(mode="after")
    def _network_variant(self) -> "TrainConfig":
        if self.conv_alpha is not None and self.conv_rank is None:
            raise ValueError("conv_alpha is set but conv_rank is not; set conv_rank (the rank of the conv LoRA) too, "
                             "or remove conv_alpha")
        if self.fsdp and self.blocks_to_swap:
            raise ValueError("fsdp and blocks_to_swap both move the frozen base off the device; use one of them "
                             "(fsdp across several GPUs, blocks_to_swap on one)")
        if self.conv_rank is not None and self.task != "image":
            raise ValueError("conv_rank (LoCon) is for the image task's UNet convs; remove it for task: text")
        if self.network_type != "lora":
            kind = self.network_type
            if self.task != "image":
                raise ValueError(f"network_type: {kind} is for the image task; use lora for task: text")
            for key, bad in (("use_dora", self.use_dora), ("use_rslora", self.use_rslora),
                             ("lora_dropout", self.lora_dropout > 0)):
                if bad:
                    raise ValueError(f"{key}: peft's {'LoKr' if kind == 'lokr' else 'LoHa'} has no {key}; "
                                     f"remove it or use network_type: lora")
        # a value other than the default: a dumped config (model_dump, the saved config.yaml) holds every field
        if self.network_type != "lokr" and any(
                key in self.model_fields_set and getattr(self, key) != type(self).model_fields[key].default
                for key in ("lokr_factor", "lokr_decompose_both")):
            raise ValueError("lokr_factor / lokr_decompose_both are LoKr options; set network_type: lokr or remove them")
        if self.lokr_factor == 0 or self.lokr_factor < -1:
            raise ValueError(f"lokr_factor: {self.lokr_factor} is not a factor; use -1 or a positive integer")
        return self

    @model_validator(mode="after")
    def _older_quantization_spelling(self) -> "TrainConfig":
        if self.quantization == "4bit":
            if self.base_quantization not in ("none", "nf4"):
                raise ValueError(f"quantization: 4bit (nf4) and base_quantization: {self.base_quantization} "
                                 "disagree; keep base_quantization only")
            object.__setattr__(self, "base_quantization", "nf4")
        return self

    @property
    def alpha(self) -> float:
        """The effective LoRA alpha (defaults to the rank)."""
        return float(self.lora_alpha if self.lora_alpha is not None else self.lora_rank)

    def to_yaml_dict(self) -> dict[str, Any]:
        """The resolved config as plain YAML-able data (paths as strings)."""
        return self.model_dump(mode="json")


# ---------------------------------------------------------------------------------------------------------------
# Loading


def _key_lines(text: str, source: str = "config") -> dict[tuple[str, ...], int]:
    """Map each key path in a YAML document (list items by index) to its 1-based line, for error messages; refuse a
    key given twice in one mapping (YAML would silently keep the last)."""
    lines: dict[tuple[str, ...], int] = {}
    visited: set[int] = set()

    def walk(node: yaml.Node, prefix: tuple[str, ...]) -> None:
        if id(node) in visited:  # aliases can make the node graph cyclic
            return
        visited.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, prefix + (str(i),))
        elif isinstance(node, yaml.MappingNode):
            first: dict[str, int] = {}
            for key_node, value_node in node.value:
                key, line = str(key_node.value), key_node.start_mark.line + 1
                if isinstance(key_node, yaml.ScalarNode) and key in first:
                    raise ConfigError(f"{source}:{line}: key '{key}' appears twice (first on line {first[key]}); "
                                      "keep one")
                first.setdefault(key, line)
                lines.setdefault(prefix + (key,), line)
                walk(value_node, prefix + (key,))

    try:
        root = yaml.compose(text)
        if root is not None:
            walk(root, ())
    except (yaml.YAMLError, ValueError, RecursionError):  # line numbers are a nicety; the loader reports errors
        pass
    return lines


def _field_names(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _describe_validation_error(err: ValidationError, source: str, key_lines: dict[tuple[str, ...], int]) -> str:
    """Turn pydantic's first error into one line: where, which key, what is wrong, how to fix it."""
    first = err.errors()[0]
    loc = tuple(str(p) for p in first["loc"])
    key = ".".join(loc) if loc else "(top level)"
    line = key_lines.get(loc[:-1] if first["type"] == "missing" else loc)  # a missing key: where its section is
    where = f"{source}:{line}" if line else source
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        model = _section_model(loc[:-1])
        return f"{where}: unknown key '{key}'{_suggest(loc[-1], _field_names(model))}"
    if first["type"] == "missing":
        model = _section_model(loc[:-1])
        field = model.model_fields.get(loc[-1]) if loc else None
        desc = f" ({field.description})" if field is not None and field.description else ""
        return f"{where}: missing required key '{key}'{desc}; add it to the config"
    if not loc:
        return f"{where}: {msg}"
    got, shown = first.get("input"), repr(first.get("input"))
    shown = f" (got {shown[:77] + '...' if len(shown) > 80 else shown})" if not isinstance(got, (dict, type(None))) else ""
    return f"{where}: {key}: {msg}{shown}"


def _section_model(loc: tuple[str, ...]) -> type[BaseModel]:
    """The schema model of the section at ``loc`` (list indices skipped), e.g. SamplePrompt for sample_prompts.0."""
    model: type[BaseModel] = TrainConfig
    for part in loc:
        field = model.model_fields.get(part)
        if field is None:
            continue
        candidates = [field.annotation, *typing.get_args(field.annotation)]
        candidates += [a for c in list(candidates) for a in typing.get_args(c)]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), model)
    return model


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse one ``--set key=value`` (``key`` may be dotted, ``value`` is read as YAML)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set lora_rank=16")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {item!r}: the key is empty; write key=value, e.g. --set lora_rank=16")
    parts = [part.strip() for part in key.split(".")]
    if not all(parts):
        raise ConfigError(f"--set {item!r}: empty part in the dotted key; write e.g. --set logging.wandb=true")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except (yaml.YAMLError, ValueError, TypeError, RecursionError):  # e.g. 2024-13-01 fails as a date: keep the text
        value = raw
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set key=value`` overrides to raw config data (before validation)."""
    for item in overrides:
        path, value = parse_override(item)
        target = data
        for part in path[:-1]:
            nested = target.get(part)
            if nested is None:
                nested = target[part] = {}
            if not isinstance(nested, dict):
                raise ConfigError(f"--set {item!r}: '{part}' is not a section (it holds {type(nested).__name__}); "
                                  f"set {part}=VALUE instead")
            target = nested
        target[path[-1]] = value
    return data


def read_yaml_mapping(path: Path) -> tuple[dict[str, Any], str]:
    """Read a YAML file that must hold a mapping; return it and its text. Errors name the file and line."""
    if not path.exists():
        raise ConfigError(f"config file not found: {path} (check the --config path)")
    if path.is_dir():
        raise ConfigError(f"config path is a directory, not a YAML file: {path} (pass the .yaml file inside it)")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config ({exc.strerror or exc}); check its permissions") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        fix = "; check the indentation, colons and quotes there"
        if mark is not None:
            raise ConfigError(f"{path}:{mark.line + 1}:{mark.column + 1}: YAML syntax error: {problem}{fix}") from None
        raise ConfigError(f"{path}: YAML syntax error: {problem}{fix}") from None
    except (ValueError, TypeError, RecursionError) as exc:  # a value YAML cannot construct, e.g. the date 2024-13-01
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"{path}: YAML value cannot be read ({reason}); quote values that look like dates or "
                          "numbers") from None
    if data is None:
        raise ConfigError(f"{path}: the config file is empty; write key: value lines (at least base_model, "
                          "output_dir and train_data_dir; see configs/my_lora_config.yaml)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of key: value lines, got {type(data).__name__} "
                          "(remove the leading '-' or brackets)")
    return data, text


def build_config(data: dict[str, Any], source: str = "config", key_lines: dict | None = None) -> TrainConfig:
    """Validate raw config data into a :class:`TrainConfig`; raise :class:`ConfigError` with one clear line."""
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe_validation_error(err, source, key_lines or {})) from None


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> TrainConfig:
    """Load and validate a YAML config file, applying ``--set key=value`` overrides."""
    path = Path(path)
    data, text = read_yaml_mapping(path)
    key_lines = _key_lines(text, str(path))
    return build_config(apply_overrides(data, overrides or []), str(path), key_lines)


def check_environment(cfg: TrainConfig) -> None:
    """Cheap checks of what a run needs from the machine: the precision and a writable output_dir. Run by the
    tasks' ``check_base_model``, so ``check`` and ``train`` see them before any model is loaded."""
    if cfg.mixed_precision == "fp16":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("mixed_precision: fp16 needs a CUDA GPU; use bf16 or no on CPU")
    out = cfg.output_dir.absolute()
    for folder in (out, *out.parents):
        if not folder.exists():
            continue
        if not folder.is_dir():
            what = "is a file" if folder == out else f"cannot be created: '{folder}' is a file"
            raise ConfigError(f"output_dir: '{cfg.output_dir}' {what}, not a folder; choose another output_dir "
                              "or move the file")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError(f"output_dir: '{folder}' is not writable; choose another output_dir or fix its "
                              "permissions")
        return


def dump_config(cfg: TrainConfig, path: Path) -> None:
    """Write the resolved config as YAML."""
    path.write_text(yaml.safe_dump(cfg.to_yaml_dict(), sort_keys=False), encoding="utf-8")


def describe_fields() -> str:
    """Human-readable list of every config key with its default and help text."""
    out = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, f"{prefix}{name}.")
                continue
            default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
            out.append(f"  {prefix}{name:<28} {field.description}  [{default}]")

    walk(TrainConfig, "")
    return "\n".join(out)

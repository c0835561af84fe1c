"""THE training loop: one for every task, built on accelerate.

Features and the config keys that control them:

- mixed precision ............ ``mixed_precision: no | fp16 | bf16`` (accelerate autocast + grad scaler)
- gradient accumulation ...... ``gradient_accumulation_steps`` (loss normalised over the whole accumulated batch)
- gradient checkpointing ..... ``gradient_checkpointing``
- gradient clipping .......... ``max_grad_norm``
- optimizer / schedule ....... ``optimizer`` (AdamW by default: ``learning_rate``, ``weight_decay``, ``adam_*``),
  ``lr_scheduler``, ``lr_warmup_steps``; schedule-free optimizers are switched to their evaluation weights for
  evaluation, samples, checkpoints and export, and back before each step
- quantised frozen base ....... ``base_quantization`` (done by the task when it loads the model; recorded here)
- length ..................... ``epochs`` or ``max_train_steps``
- checkpoints / resume ....... ``save_steps``, ``keep_last_checkpoints``, ``resume: latest | PATH``
- logging .................... ``logging.*``: TensorBoard, ``loss.csv``, W&B; a progress bar with loss, it/s, ETA
- multi-process .............. ``torchrun --nproc_per_node N train.py ...`` (DDP; gloo on CPU)
- sharding ................... ``fsdp: true``: the frozen base sharded across the processes (accelerate's FSDP2);
  checkpoints and the export gather the LoRA
- memory settings ............ ``memory_profile: auto``: the estimate's cheapest fitting settings applied first,
  printed, recorded in each checkpoint and kept on resume

Set-up order matters: the data check and checkpoint lookup run first because they are cheap and catch user errors
before minutes of model loading; the seed is set before the model so LoRA initialisation is reproducible; the
optimizer is built from the unwrapped module's trainable parameters before accelerate wraps it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..config import TrainConfig, dump_config
from ..errors import ConfigError, OutOfMemory
from ..tasks.base import RunInfo, Task, make_task
from .batches import BatchPlan, sample_seed
from .checkpoint import (
    checkpoint_dir,
    finalize_checkpoint,
    latest_checkpoint,
    prune_checkpoints,
    read_state,
    remove_stale_temporaries,
    temp_checkpoint_dir,
)
from .logs import TrainingLogger, peak_memory_mb
from .optim import has_eval_mode, make_optimizer
from .sharding import fsdp_in_effect, fsdp_plugin, full_optimizer_state, set_full_optimizer_state, shard_like
from .signals import StopRequest


@dataclass
class TrainResult:
    """What a run produced and how fast it went."""

    output_dir: Path
    files: list[Path]
    steps: int
    final_loss: float | None
    seconds_per_step: float | None
    peak_memory_mb: float
    last_checkpoint: Path | None
    resumed_from: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _resolve_resume(cfg: TrainConfig, root: Path) -> Path | None:
    if not cfg.resume:
        return None
    if cfg.resume == "latest":
        return latest_checkpoint(root)
    path = Path(cfg.resume)
    if not (path / "state.json").is_file():
        raise ConfigError(f"resume: '{cfg.resume}' is not a complete checkpoint folder (no state.json); point it at "
                          f"a <output_dir>/checkpoints/step-N folder or use resume: latest")
    return path


def _rng_states() -> dict[str, Any]:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded (FSDP2 DTensor) tensor gathered whole (a collective: every process calls it); others as they are."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors on the CPU in fp32; under fsdp every process must call it (the shards are gathered)."""
    return {n: _full(p.detach()).to("cpu", torch.float32).contiguous()
            for n, p in model.named_parameters() if p.requires_grad}


def _gather_trainable(model: torch.nn.Module) -> None:
    """Replace each sharded trainable parameter by its gathered whole (after training, before the export reads the
    LoRA through peft); the frozen base stays sharded. Every process calls it."""
    from torch.distributed.tensor import DTensor

    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.requires_grad and isinstance(param, DTensor):
                module._parameters[name] = torch.nn.Parameter(param.detach().full_tensor())


def _make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    from transformers import get_scheduler

    name = cfg.lr_scheduler
    if name == "constant" and cfg.lr_warmup_steps:
        name = "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=total_steps)


class Trainer:
    """Runs one config to completion: set-up, the step loop, checkpoints, export."""

    def __init__(self, cfg: TrainConfig, show_progress: bool = True) -> None:
        self.cfg = cfg
        self.show_progress = show_progress
        self.checkpoint_root = cfg.output_dir / "checkpoints"

    # --- set-up, in order ----------------------------------------------------------------------------------------
    def _setup_memory_profile(self) -> None:
        """``memory_profile: auto``: apply the settings the estimate chooses for this device (or, resuming, the ones
        the checkpoint recorded, so optimizer states and block layout match). First, since they change the config
        everything else reads."""
        self.memory_settings: dict[str, Any] | None = None
        cfg = self.cfg
        if cfg.memory_profile != "auto":
            return
        from ..preflight import auto_settings, set_line

        resume = _resolve_resume(cfg, self.checkpoint_root)
        recorded = read_state(resume).get("memory_profile") if resume is not None else None
        if recorded is not None:
            applied, why = dict(recorded), f"kept from {resume}"
        else:
            applied, why = auto_settings(cfg), "chosen by the memory estimate for this device"
        if applied:
            data = {**cfg.model_dump(), **applied}
            self.cfg = TrainConfig.model_validate(data)
        self.memory_settings = applied
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"memory_profile: auto: {set_line(applied) if applied else 'fits as configured'} ({why})")

    def _setup_checks(self) -> None:
        """Everything a user can get wrong that is cheap to see: before accelerate, before any model."""
        self._setup_memory_profile()
        cfg = self.cfg
        self.task: Task = make_task(cfg)
        self.task.check_base_model()
        if cfg.optimizer in ("adamw8bit", "paged_adamw8bit", "prodigy", "came", "schedule_free_adamw"):
            make_optimizer(cfg, [torch.nn.Parameter(torch.zeros(1))])  # refuses at once if it cannot run here
        self.data = self.task.check_data()
        self.resume_from = _resolve_resume(cfg, self.checkpoint_root)
        self._check_output_dir()

    def _check_output_dir(self) -> None:
        """Never silently overwrite another run: refuse unless resuming or told to overwrite."""
        cfg = self.cfg
        if cfg.output_dir.exists() and not cfg.output_dir.is_dir():
            raise ConfigError(f"output_dir: '{cfg.output_dir}' is a file, not a folder")
        previous = [p for p in (self.checkpoint_root, cfg.output_dir / "training_summary.json") if p.exists()]
        if not previous or cfg.resume:
            return
        if not cfg.overwrite:
            raise ConfigError(
                f"output_dir: '{cfg.output_dir}' already holds a run ({previous[0].name}); set resume: latest to "
                "continue it, --overwrite to start afresh there, or choose another output_dir"
            )
        if int(os.environ.get("RANK", "0")) == 0:
            for name in ("checkpoints", "logs", "samples"):
                shutil.rmtree(cfg.output_dir / name, ignore_errors=True)

    def _setup_accelerator(self) -> None:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, GradientState

        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            # accelerate keeps its settings in process-wide singletons; a second run in the same process (tests,
            # notebooks, the Python API) with another mixed_precision would otherwise be refused. accelerate
            # offers no public reset, so we use its internal one, and only outside multi-process launches.
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()

        # cpu=True is what makes 2-process CPU DDP work under torchrun (gloo); on a GPU machine it stays False.
        # fsdp with one process: nothing to shard (and no plugin, whose environment flag would outlive the run)
        plugin = fsdp_plugin() if self.cfg.fsdp and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
        self.accelerator = Accelerator(mixed_precision=self.cfg.mixed_precision, cpu=not torch.cuda.is_available(),
                                       fsdp_plugin=plugin)
        self.sharded = plugin is not None and fsdp_in_effect(self.accelerator, plugin)
        self.is_main = self.accelerator.is_main_process
        half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.cfg.mixed_precision)
        # Frozen weights are stored in half precision only on a GPU; CPU autocast keeps fp32 masters.
        self.weight_dtype = half if (half is not None and self.accelerator.device.type == "cuda") else torch.float32

    def _setup_model_and_optimizer(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        model = self.task.load_model(self.accelerator.device, self.weight_dtype)
        if cfg.gradient_checkpointing:
            self.task.enable_gradient_checkpointing(model)
        self.params = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(cfg, self.task.param_groups(model) or self.params)
        self.plan = BatchPlan(
            num_samples=self.data.num_samples,
            batch_size=cfg.batch_size,
            world_size=self.accelerator.num_processes,
            accumulation=cfg.gradient_accumulation_steps,
            seed=cfg.seed,
            order_fn=self.task.epoch_order,
        )
        self.total_steps = cfg.max_train_steps or cfg.epochs * self.plan.steps_per_epoch
        # Not passed through accelerator.prepare: its scheduler wrapper steps once per process, which would make
        # N processes see a different schedule than one.
        self.lr_scheduler = _make_scheduler(cfg, optimizer, self.total_steps)
        if self.sharded:  # the units FSDP shards one by one (each all-gathered just before it runs)
            classes = self.task.shard_classes(model)
            self.accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap = classes
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        if self.sharded and self.is_main:
            from torch.distributed.fsdp import FSDPModule

            units = sum(isinstance(m, FSDPModule) for m in self.model.modules()) - 1
            print(f"fsdp: {units} blocks ({', '.join(classes)}) and the rest of the model sharded across "
                  f"{self.accelerator.num_processes} processes")
        # FSDP replaces parameters by sharded ones (and points the optimizer at them); clip what it steps
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # schedule-free optimizers start with their evaluation weights in place (== the initial weights)
        self._weights = "eval" if has_eval_mode(self.optimizer) else "train"
        self.dataset = self.task.dataset(self.data)
        self.val_dataset = self.task.validation_dataset()

    def _setup_resume(self) -> int:
        self.started_at = time.time()
        if self.resume_from is None:
            if self.cfg.resume == "latest" and self.is_main:
                print(f"resume: latest: no checkpoint in {self.checkpoint_root} yet, starting from step 0")
            return 0
        path = self.resume_from
        state = read_state(path)
        self._load_checkpoint(path)
        self.started_at = state.get("started_at", self.started_at)
        if self.is_main:
            if state.get("samples_per_step") != self.plan.samples_per_step or state.get("num_samples") != self.plan.num_samples:
                print(
                    "warning: resuming with a different number of samples per step or dataset size; "
                    "the data order differs from an uninterrupted run"
                )
            print(f"resumed from {path} at step {state['step']}")
        return int(state["step"])

    def _load_checkpoint(self, path: Path) -> None:
        from safetensors.torch import load_file

        model = self.accelerator.unwrap_model(self.model)
        saved = load_file(str(path / "adapter.safetensors"))
        current = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
        if set(saved) != set(current):
            raise ConfigError(
                f"resume: checkpoint {path} holds different LoRA layers than this config makes "
                "(changed target_modules or base_model?)"
            )
        for name, tensor in saved.items():
            if tensor.shape != current[name].shape:
                raise ConfigError(
                    f"resume: checkpoint {path} has {name} of shape {tuple(tensor.shape)}, this config makes "
                    f"{tuple(current[name].shape)} (changed lora_rank?)"
                )
        if bool(read_state(path).get("fsdp", False)) != self.sharded:
            raise ConfigError(f"resume: checkpoint {path} was written with fsdp: {not self.sharded}; resume it with "
                              f"the same fsdp setting (and process count)")
        with torch.no_grad():
            for name, tensor in saved.items():
                current[name].copy_(shard_like(tensor, current[name]))
        optimizer_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
        if self.sharded:
            set_full_optimizer_state(self.model, self.optimizer.optimizer, optimizer_state)
        else:
            self.optimizer.load_state_dict(optimizer_state)
        sched = torch.load(path / "scheduler.pt", map_location="cpu", weights_only=False)
        self.lr_scheduler.load_state_dict(sched["scheduler"])
        if sched.get("scaler") is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(sched["scaler"])
        rank_file = path / f"rng_state_{self.accelerator.process_index}.pt"
        if not rank_file.exists():
            rank_file = path / "rng_state_0.pt"
        _set_rng_states(torch.load(rank_file, map_location="cpu", weights_only=False))

    # --- the optimizer's two sets of weights (schedule-free) ------------------------------------------------------
    def _use_weights(self, mode: str) -> None:
        """Put the optimizer's ``train`` or ``eval`` weights into the model (a no-op for optimizers with one set).

        Steps need the train weights; evaluation, samples, checkpoints and the export the eval weights. Switching
        only when the mode changes keeps the float round trips the same in a resumed run as in an uninterrupted
        one: a checkpoint holds the eval weights, the optimizer in eval mode, and both runs switch to train from
        there."""
        if self._weights != mode:
            self.optimizer.train() if mode == "train" else self.optimizer.eval()
            self._weights = mode

    # --- checkpoints ---------------------------------------------------------------------------------------------
    def save_checkpoint(self, step: int) -> Path:
        """Write a complete checkpoint for ``step`` atomically (all processes call this)."""
        from safetensors.torch import save_file

        acc, root = self.accelerator, self.checkpoint_root
        tmp, final = temp_checkpoint_dir(root, step), checkpoint_dir(root, step)
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        torch.save(_rng_states(), tmp / f"rng_state_{acc.process_index}.pt")
        # every process: under fsdp these gather the shards
        adapter = _trainable_state(acc.unwrap_model(self.model))
        optimizer_state = (full_optimizer_state(self.model, self.optimizer.optimizer) if self.sharded
                           else self.optimizer.state_dict() if self.is_main else None)
        acc.wait_for_everyone()
        if self.is_main:
            save_file(adapter, str(tmp / "adapter.safetensors"))
            # Test hook: widen the window in which a checkpoint is half-written, so kill -9 tests can hit it.
            time.sleep(float(os.environ.get("LORA_SCRIPTS_TEST_CHECKPOINT_DELAY", "0")))
            torch.save(optimizer_state, tmp / "optimizer.pt")
            scaler = acc.scaler.state_dict() if acc.scaler is not None else None
            torch.save({"scheduler": self.lr_scheduler.state_dict(), "scaler": scaler}, tmp / "scheduler.pt")
            dump_config(self.cfg, tmp / "config.yaml")
            epoch, step_in_epoch = divmod(step, self.plan.steps_per_epoch)
            state = {
                "step": step,
                "epoch": epoch,
                "step_in_epoch": step_in_epoch,
                "total_steps": self.total_steps,
                "samples_per_step": self.plan.samples_per_step,
                "num_samples": self.plan.num_samples,
                "world_size": acc.num_processes,
                "fsdp": self.sharded,
                "seed": self.cfg.seed,
                "started_at": self.started_at,
                "dataset_hash": self.data.dataset_hash,
                "lora_scripts_version": __version__,
            }
            if self.memory_settings is not None:
                state["memory_profile"] = self.memory_settings
            finalize_checkpoint(tmp, final, state)
            prune_checkpoints(root, self.cfg.keep_last_checkpoints)
        acc.wait_for_everyone()
        return final

    # --- evaluation and samples ----------------------------------------------------------------------------------
    def _evaluate(self) -> float | None:
        """Mean loss over the validation set (main process, unwrapped model, fixed per-sample seeds; under fsdp every
        process runs it, as each forward gathers the shards)."""
        if self.val_dataset is None:
            return None
        result = None
        if self.is_main or self.sharded:
            model = self.accelerator.unwrap_model(self.model)
            model.eval()
            keys = [(i, sample_seed(self.cfg.seed, 2**31 - 1, i)) for i in range(len(self.val_dataset))]
            total, count = 0.0, 0
            for start in range(0, len(keys), self.cfg.batch_size):
                batch = self.task.collate([self.val_dataset[k] for k in keys[start : start + self.cfg.batch_size]])
                with torch.no_grad(), self.accelerator.autocast():
                    total += self.task.loss(model, batch).float().item()
                count += self.task.loss_count(batch)
            model.train()
            result = total / max(count, 1) if self.is_main else None
        self.accelerator.wait_for_everyone()
        return result

    def _log_samples(self, logger: TrainingLogger | None, step: int) -> None:
        if self.cfg.sample_prompts and (self.is_main or self.sharded):  # fsdp: every process takes part
            model = self.accelerator.unwrap_model(self.model)
            model.eval()
            rng = _rng_states()  # sampling must not shift the training's random stream (exact resume)
            with torch.no_grad():
                samples = self.task.generate_samples(model)
            _set_rng_states(rng)
            model.train()
            if logger is not None and samples:
                logger.log_samples(step, samples)
        self.accelerator.wait_for_everyone()

    # --- the loop ------------------------------------------------------------------------------------------------
    def _train_step(self, micro_batches: list[dict[str, Any]], stop_here: bool = False) -> tuple[float, bool]:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches.

        Returns the global mean loss and whether any process was asked to stop (SIGTERM/SIGINT); both travel in one
        collective, so stopping costs no extra synchronisation per step."""
        acc, task, model = self.accelerator, self.task, self.model
        device = acc.device
        count = torch.tensor([float(sum(task.loss_count(b) for b in micro_batches))], device=device)
        total = acc.reduce(count, reduction="sum").item()
        # DDP averages gradients over processes; scale by world size so the result is sum / global count.
        scale = acc.num_processes / max(total, 1.0)
        running = torch.zeros((), device=device)
        for i, batch in enumerate(micro_batches):
            sync = i == len(micro_batches) - 1
            with nullcontext() if sync else acc.no_sync(model):
                with acc.autocast():
                    loss_sum = task.loss(model, batch)
                acc.backward(loss_sum * scale)
            running += loss_sum.detach().float()
        if self.cfg.max_grad_norm:
            acc.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        summed = acc.reduce(torch.stack([running, torch.tensor(float(stop_here), device=device)]), reduction="sum")
        loss_sum, stops = summed.tolist()
        return loss_sum / max(total, 1.0), stops > 0

    def run(self) -> TrainResult:
        from torch.utils.data import DataLoader
        from tqdm.auto import tqdm

        self._setup_checks()
        cfg = self.cfg  # after memory_profile: auto has applied its settings
        self._setup_accelerator()
        self._setup_model_and_optimizer()
        start_step = self._setup_resume()
        acc = self.accelerator

        if self.is_main:
            cfg.output_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.checkpoint_root)
            dump_config(cfg, cfg.output_dir / "config.yaml")
            print(
                f"training {cfg.task} LoRA (rank {cfg.lora_rank}, alpha {cfg.alpha:g}) on {self.data.description}; "
                f"{self.total_steps} steps of {self.plan.samples_per_step} samples, "
                f"{acc.num_processes} process(es) on {acc.device}"
            )
        logger = (
            TrainingLogger(cfg.output_dir / "logs", cfg.logging, cfg.to_yaml_dict(), start_step if self.resume_from else None)
            if self.is_main
            else None
        )
        progress = tqdm(
            total=self.total_steps, initial=start_step, unit="step", desc="train",
            disable=not (self.is_main and self.show_progress), dynamic_ncols=True,
        )
        step, loss, last_checkpoint = start_step, None, self.resume_from
        step_times: list[float] = []
        # (wall, CPU) clocks at the end of each step: benchmarks take steady-state rates from them
        step_ends: list[tuple[float, float]] = []
        first_step_at: tuple[float, float] | None = None  # (unix time, CPU seconds of this process) after step 1
        loader_iter, loader_epoch = None, None
        self.model.train()
        interrupted: str | None = None
        stop = StopRequest()
        loop_started = (time.perf_counter(), time.process_time())
        try:
            stop.__enter__()
            while step < self.total_steps:
                epoch, step_in_epoch = divmod(step, self.plan.steps_per_epoch)
                if loader_epoch != epoch:
                    batches = self.plan.micro_batches(epoch, acc.process_index, start_step=step_in_epoch)
                    # An own generator: otherwise creating the iterator draws from the global RNG, and a resumed
                    # run (which creates one mid-epoch) would see different dropout masks than an uninterrupted one.
                    loader = DataLoader(
                        self.dataset, batch_sampler=batches, collate_fn=self.task.collate,
                        num_workers=cfg.dataloader_workers, generator=torch.Generator().manual_seed(cfg.seed + epoch),
                    )
                    loader_iter, loader_epoch = iter(loader), epoch
                t0 = time.perf_counter()
                self._use_weights("train")
                micro = [next(loader_iter) for _ in range(cfg.gradient_accumulation_steps)]
                try:
                    loss, stop_agreed = self._train_step(micro, stop_here=stop.signal_name is not None)
                except torch.OutOfMemoryError:
                    raise self._out_of_memory(step + 1, last_checkpoint) from None
                step += 1
                step_times.append(time.perf_counter() - t0)
                if first_step_at is None:
                    first_step_at = (time.time(), time.process_time())
                lr = self.lr_scheduler.get_last_lr()[0]
                metrics = self.task.step_metrics()
                progress.update(1)
                progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", epoch=epoch + 1, refresh=False)
                is_save = bool(cfg.save_steps) and step % cfg.save_steps == 0 and step < self.total_steps
                is_last = step == self.total_steps
                every = cfg.sample_every_n_steps
                is_sample = bool(cfg.sample_prompts) and (is_last or (step % every == 0 if every else is_save))
                if is_save or is_last or is_sample or stop_agreed:
                    self._use_weights("eval")
                eval_loss = self._evaluate() if (is_save or is_last) else None
                if logger is not None and (
                    step % cfg.logging.log_every_n_steps == 0 or is_last or eval_loss is not None
                ):
                    logger.log_step(step, epoch + 1, loss, lr, time.time() - self.started_at, eval_loss, metrics)
                if eval_loss is not None:
                    progress.write(f"step {step}: eval loss {eval_loss:.4f}")
                if is_save:
                    last_checkpoint = self.save_checkpoint(step)
                if is_sample:
                    self._log_samples(logger, step)
                step_ends.append((time.perf_counter(), time.process_time()))
                if not is_last and stop_agreed:
                    interrupted = stop.signal_name or "a signal on another process"
                    if not is_save:
                        last_checkpoint = self.save_checkpoint(step)
                    break
            progress.close()
            if interrupted:
                files = []
                if self.is_main:
                    print(f"stopped by {interrupted} after step {step}; checkpoint {last_checkpoint} is complete. "
                          "Run the same command with --resume latest to continue.")
            else:
                self._use_weights("eval")
                if step > start_step or last_checkpoint is None:
                    last_checkpoint = self.save_checkpoint(step)
                files = self._export(step)
        finally:
            stop.__exit__()
            progress.close()
            if logger is not None:
                logger.close()
        if logger is not None:
            files.extend(logger.files)
        timed = step_times[1:] or step_times  # the first step pays one-off costs (allocations, lazy init)
        result = TrainResult(
            output_dir=cfg.output_dir,
            files=files,
            steps=step,
            final_loss=loss,
            seconds_per_step=statistics.median(timed) if timed else None,
            peak_memory_mb=peak_memory_mb(),
            last_checkpoint=last_checkpoint,
            resumed_from=self.resume_from,
            extra={"train_seconds": sum(step_times), "interrupted": interrupted, "first_step_at": first_step_at,
                   "loop_started": loop_started, "step_ends": step_ends},
        )
        if self.is_main:
            self._write_summary(result)
        acc.wait_for_everyone()
        acc.end_training()
        return result

    def _out_of_memory(self, step: int, last_checkpoint: Path | None) -> OutOfMemory:
        """A one-line OOM message with what to change; the last complete checkpoint is untouched."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        cfg = self.cfg
        advice = []
        if cfg.batch_size > 1:
            half = cfg.batch_size // 2
            advice.append(f"batch_size: {half} with gradient_accumulation_steps: "
                          f"{cfg.gradient_accumulation_steps * cfg.batch_size // half} (same effective batch)")
        if not cfg.gradient_checkpointing:
            advice.append("gradient_checkpointing: true")
        if cfg.mixed_precision == "no":
            advice.append("mixed_precision: bf16 (or fp16)")
        if not advice:
            advice.append(f"a smaller {'resolution' if cfg.task == 'image' else 'max_seq_length'}")
        where = f"; last complete checkpoint: {last_checkpoint}" if last_checkpoint else ""
        return OutOfMemory(f"out of memory at step {step}{where}. Try " + ", or ".join(advice)
                           + " (lora-scripts estimate --config ... shows the memory breakdown)")

    def _export(self, step: int) -> list[Path]:
        acc = self.accelerator
        files: list[Path] = []
        if self.sharded:
            _gather_trainable(acc.unwrap_model(self.model))
        if self.is_main:
            run = RunInfo(
                started_at=self.started_at,
                finished_at=time.time(),
                steps=step,
                epoch=-(-step // self.plan.steps_per_epoch),
                num_samples=self.data.num_samples,
                dataset_hash=self.data.dataset_hash,
                config_json=json.dumps(self.cfg.to_yaml_dict(), sort_keys=True),
                version=__version__,
            )
            files = self.task.export(acc.unwrap_model(self.model), self.cfg.output_dir, run)
        acc.wait_for_everyone()
        return files

    def _write_summary(self, result: TrainResult) -> None:
        summary = {
            "steps": result.steps,
            "final_loss": result.final_loss,
            "seconds_per_step": result.seconds_per_step,
            "peak_memory_mb": round(result.peak_memory_mb, 1),
            # when the first step of this process finished (unix time) and the CPU seconds the process had used by
            # then: benchmarks/startup_speed.py measures `lora-scripts demo` start-up from them
            "first_step_finished_at": (result.extra.get("first_step_at") or (None, None))[0],
            "first_step_cpu_s": (result.extra.get("first_step_at") or (None, None))[1],
            "last_checkpoint": str(result.last_checkpoint) if result.last_checkpoint else None,
            "resumed_from": str(result.resumed_from) if result.resumed_from else None,
            "dataset_hash": self.data.dataset_hash,
            "lora_scripts_version": __version__,
            # how the frozen base was stored while training (the LoRA itself is always full precision)
            "base_quantization": self.cfg.base_quantization,
            "optimizer": self.cfg.optimizer,
            "files": [str(f) for f in result.files],
            "warnings": self.task.export_warnings(),
        }
        (self.cfg.output_dir / "training_summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")


def train(cfg: TrainConfig, show_progress: bool = True) -> TrainResult:
    """Train a LoRA as ``cfg`` says; the Python API behind ``lora-scripts train``."""
    return Trainer(cfg, show_progress=show_progress).run()

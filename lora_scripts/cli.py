"""The ``lora-scripts`` command: train, check, demo. Imports torch only inside the commands that need it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .errors import UserError


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", required=True, help="YAML config file")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key (repeatable; dotted keys for sections, e.g. logging.wandb=true)",
    )


def _load(args: argparse.Namespace):
    from .config import load_config

    overrides = list(args.overrides)
    if getattr(args, "resume", None):
        overrides.append(f"resume={args.resume}")
    if getattr(args, "overwrite", False):
        overrides.append("overwrite=true")
    return load_config(args.config, overrides)


def quiet_libraries() -> None:
    """Keep the terminal for our progress bar: silence the libraries' own loading bars and advisory warnings."""
    import os
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    for lib in (dlog, tlog):
        lib.set_verbosity_error()
        lib.disable_progress_bar()


def _launch_processes(args: argparse.Namespace) -> int:
    """``train --nproc N``: re-run this command under torchrun, N processes on this machine (one per GPU; gloo on
    CPU). torchrun replaces this process, so a SIGTERM sent to our pid reaches every worker (they checkpoint)."""
    import os

    from .errors import ConfigError

    if args.nproc < 1:
        raise ConfigError(f"--nproc: {args.nproc} must be at least 1")
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus and args.nproc > gpus:
        raise ConfigError(f"--nproc: {args.nproc} processes but only {gpus} GPU(s) visible; one process per GPU")
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
            "-m", "lora_scripts.cli", "train", "--config", str(args.config)]
    for override in args.overrides:
        argv += ["--set", override]
    for flag, value in (("--resume", args.resume), ("--overwrite", args.overwrite), ("--force", args.force),
                        ("--no-progress", args.no_progress)):
        if value:
            argv += [flag] if value is True else [flag, value]
    sys.stdout.flush()
    os.execv(sys.executable, argv)
    return 0  # not reached


def cmd_train(args: argparse.Namespace) -> int:
    import os

    cfg = _load(args)  # a bad config fails here, once, before any process is started
    if args.nproc is not None and args.nproc != 1 and "LOCAL_RANK" not in os.environ:
        return _launch_processes(args)
    quiet_libraries()
    from .preflight import check_fits

    if cfg.memory_profile != "auto":  # auto chooses (and refuses) at the start of train itself
        check_fits(cfg, force=args.force)  # on a GPU: refuse a run that clearly will not fit
    from .train.loop import train

    result = train(cfg, show_progress=not args.no_progress)
    if result.extra.get("interrupted"):
        # 0 by default (a checkpoint was written); a Kubernetes Job sets 143 so that a drained or preempted pod
        # counts as failed (and is retried, resuming) instead of completing the Job
        return int(os.environ.get("LORA_SCRIPTS_INTERRUPTED_EXIT_CODE", "0"))
    if result.files:
        print("\nfinished: %d steps, final loss %s" % (result.steps, f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a"))
        if result.seconds_per_step is not None:
            print(f"speed: {result.seconds_per_step:.3f} s/step (median), peak memory {result.peak_memory_mb:.0f} MB")
        print("files written:")
        for path in result.files:
            print(f"  {path}")
        if result.last_checkpoint:
            print(f"  {result.last_checkpoint}  (resumable checkpoint)")
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    cfg = _load(args)
    quiet_libraries()
    from .preflight import estimate_memory, parse_size

    capacity = parse_size(args.vram) if args.vram else None
    ram = parse_size(args.ram, "--ram") if args.ram else None
    estimate = estimate_memory(cfg, capacity=capacity, ram=ram, full=args.full)
    print(estimate.render())
    if estimate.capacity is None and estimate.ram is None:
        print("(no GPU found and no --vram given: this is a CPU run; pass --vram 24GB to plan for a GPU)")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from .tasks.base import make_task

    task = make_task(cfg)
    task.check_base_model()
    if hasattr(task, "data_report"):  # the image task reports every finding at once
        report = task.data_report()
        print(report.to_json() if args.json else report.render())
        return 2 if report.errors else 0
    summary = task.check_data()
    if args.show_tokens:
        if not hasattr(task, "token_report"):
            raise UserError("--show-tokens is for the text task (task: text)")
        samples = task.token_report(args.show_tokens)
        if args.json:
            import json

            print(json.dumps({"ok": True, "description": summary.description, "samples": samples}))
            return 0
        for i, sample in enumerate(samples):
            print(f"--- sample {i} ({len(sample['input_ids'])} tokens, {sample['trained']} trained; trained spans "
                  f"between \u27e6 \u27e7) ---\n{sample['marked']}")
    print(f"ok: {summary.description} (dataset hash {summary.dataset_hash[:12]})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    quiet_libraries()
    import os

    import torch

    from .demo import run_demo

    if "OMP_NUM_THREADS" not in os.environ:
        # the demo's models are tiny: one intra-op thread is the fastest (measured: 56 CPU-s for the image demo,
        # against 463 CPU-s with torch's default of one thread per core on a 2-core machine), and the same result
        torch.set_num_threads(1)
    if args.task == "text":
        from .demo import run_text_demo

        run_text_demo(Path(args.output_dir), steps=args.steps or 500)
    elif args.family and args.family not in ("sd1", "sd15"):
        from .demo import run_family_demo
        from .errors import ConfigError
        from .tiny_models import tiny_family_module

        try:
            tiny_family_module(args.family)
        except ImportError:
            raise ConfigError(f"demo --family: no tiny model for '{args.family}' (see lora_scripts/tiny_models)") from None
        run_family_demo(Path(args.output_dir), args.family, steps=args.steps or 60)
    else:
        run_demo(Path(args.output_dir), steps=args.steps)
    return 0


def cmd_label(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .data.label import LabelOptions, label_folder

    if args.backend in ("caption", "tagger"):
        quiet_libraries()
    input_dir = Path(args.input)
    output = Path(args.output) if args.output else input_dir / "metadata.csv"
    options = LabelOptions(
        backend=args.backend, model=args.model, trigger=args.trigger, prefix=args.prefix, existing=args.existing,
        recursive=args.recursive, batch_size=args.batch_size, general_threshold=args.general_threshold,
        character_threshold=args.character_threshold,
        exclude_tags=tuple(t.strip() for t in (args.exclude_tags or "").split(",") if t.strip()),
    )
    bars = []

    def make_progress(total: int):
        bars.append(tqdm(total=total, unit="img", desc=f"label ({args.backend})"))
        return bars[-1].update

    try:
        result = label_folder(input_dir, output, options, make_progress)
    finally:
        for bar in bars:
            bar.close()
    print(f"wrote {output}: {len(result.rows)} rows ({result.labelled} labelled, {result.kept} kept)")
    if result.missing_sidecars:
        shown = ", ".join(result.missing_sidecars[:5])
        print(f"warning: {len(result.missing_sidecars)} images have no .txt/.caption file and got no row: {shown}")
    return 0


def add_label_args(p: argparse.ArgumentParser) -> None:
    """Options of `lora-scripts label` and `tools/auto_label.py`."""
    p.add_argument("--input", required=True, help="folder of images")
    p.add_argument("--output", help="CSV to write (default: <input>/metadata.csv)")
    p.add_argument("--backend", choices=["caption", "tagger", "sidecar", "filename"], default="caption",
                   help="caption: a captioning model (BLIP); tagger: a WD14 ONNX tagger; sidecar: .txt/.caption "
                   "files; filename: the file name")
    p.add_argument("--model", help="caption: model folder or hub id (default Salesforce/blip-image-captioning-base); "
                   "tagger: folder with model.onnx and selected_tags.csv")
    p.add_argument("--general-threshold", type=float, default=0.35, help="tagger: minimum probability of general tags")
    p.add_argument("--character-threshold", type=float, default=0.85, help="tagger: minimum probability of character tags")
    p.add_argument("--exclude-tags", help="tagger: comma-separated tags to leave out")
    p.add_argument("--trigger", help="trigger word put first in every caption")
    p.add_argument("--prefix", help="text put before every caption (after the trigger word)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--skip-existing", dest="existing", action="store_const", const="skip",
                      help="keep rows already in the output, label only new images (default)")
    mode.add_argument("--overwrite", dest="existing", action="store_const", const="overwrite",
                      help="label every image again")
    mode.add_argument("--append", dest="existing", action="store_const", const="append",
                      help="add the new caption after the existing one")
    p.set_defaults(existing="skip")
    p.add_argument("--recursive", action="store_true", help="include images in sub-folders")
    p.add_argument("--batch-size", type=int, default=8, help="images per captioning batch")
    p.set_defaults(func=cmd_label)


def cmd_export(args: argparse.Namespace) -> int:
    if not args.merge:
        raise UserError("export: only --merge is available so far (training already writes the LoRA files)")
    quiet_libraries()
    from .export.merge import merge_text_adapter

    out = merge_text_adapter(Path(args.adapter), Path(args.output), args.base_model)
    print(f"merged model written to {out} (load with AutoModelForCausalLM.from_pretrained)")
    return 0


def cmd_import_kohya(args: argparse.Namespace) -> int:
    from .kohya_import import run_import

    output = Path(args.output)
    if output.exists() and not args.force:
        raise UserError(f"--output: {output} exists; choose another file or pass --force to replace it")
    run_import(Path(args.dataset_config) if args.dataset_config else None,
               Path(args.training_config) if args.training_config else None, output)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-scripts", description="Config-driven LoRA training.")
    parser.add_argument("--version", action="version", version=f"lora-scripts {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a LoRA from a YAML config",
                       epilog="Config keys: run `lora-scripts config-keys`.")
    _add_config_args(p)
    p.add_argument("--resume", metavar="latest|PATH", help="resume from the newest checkpoint (latest) or a folder")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an output_dir that holds another run (deletes its checkpoints and logs)")
    p.add_argument("--force", action="store_true", help="train even if the memory estimate exceeds free GPU memory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="processes on this machine, one per GPU (runs torchrun; gloo on CPU). Multi-node: see "
                        "docs/deploy.md")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("check", help="check the config, base model path and data without training")
    _add_config_args(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON (for CI)")
    p.add_argument("--show-tokens", type=int, default=0, metavar="N",
                   help="text: print the first N tokenized samples with the trained spans marked (with --json: "
                   "input_ids and labels per sample), to verify masking before training")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("estimate", help="GPU and system memory of a run and the cheapest settings that fit (no weights loaded)")
    _add_config_args(p)
    p.add_argument("--vram", help="GPU memory to plan for, e.g. 24GB (default: free memory of the GPU present)")
    p.add_argument("--ram", help="system memory to plan for, e.g. 64GB (block swap and offload live there)")
    p.add_argument("--full", action="store_true", help="run every block of the fake step instead of extrapolating "
                   "from a few (slow: the reference the fast estimate is checked against)")
    p.set_defaults(func=cmd_estimate)

    p = sub.add_parser("config-keys", help="list every config key with its default and meaning")
    p.set_defaults(func=lambda a: print(__import__("lora_scripts.config", fromlist=["x"]).describe_fields()) or 0)

    p = sub.add_parser("label", help="write filename,prompt rows for a folder of images (auto-labelling)")
    add_label_args(p)

    p = sub.add_parser("export", help="merge a text LoRA adapter into its base model")
    p.add_argument("--adapter", required=True, help="PEFT adapter folder, e.g. <output_dir>/adapter")
    p.add_argument("--merge", action="store_true", help="merge the LoRA into the base weights")
    p.add_argument("--output", required=True, help="folder for the merged model")
    p.add_argument("--base-model", help="base model (default: the adapter's base_model_name_or_path)")
    p.set_defaults(func=cmd_export)

    from .lora_tools.cli import add_lora_parser

    add_lora_parser(sub)

    p = sub.add_parser("import-kohya", help="write a config from sd-scripts' dataset / training TOML files",
                       epilog="Every key is mapped or listed as not mapped; see docs/kohya.md.")
    p.add_argument("--dataset-config", metavar="TOML", help="sd-scripts dataset config ([general], [[datasets]], "
                   "[[datasets.subsets]])")
    p.add_argument("--training-config", metavar="TOML", help="sd-scripts training config (--config_file)")
    p.add_argument("--output", required=True, metavar="YAML", help="the lora-scripts config to write")
    p.add_argument("--force", action="store_true", help="replace --output if it exists")
    p.set_defaults(func=cmd_import_kohya)

    p = sub.add_parser("demo", help="train a tiny built-in model on built-in data (no downloads)")
    p.add_argument("--output-dir", default="demo_output")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: 400 image, 500 text, 60 --family)")
    p.add_argument("--task", choices=["image", "text"], default="image")
    p.add_argument("--family", help="image: a transformer family's tiny model instead of SD 1.x (flux, sd3, "
                   "qwen_image, z_image, chroma: those with a module in lora_scripts/tiny_models)")
    p.set_defaults(func=cmd_demo)

    # the training service: FastAPI and SQLAlchemy are imported only when it runs (lora_scripts/service/)
    p = sub.add_parser("serve", help="web console and REST API to submit and watch training jobs")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (every API read and write needs the token)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="a Host name clients use to reach the server (e.g. lora.example.com or *.example.com), "
                   "besides localhost and the bound address; repeat for more (default from LORA_SCRIPTS_ALLOWED_HOSTS, "
                   "comma-separated)")
    p.add_argument("--model-root", action="append", default=[], metavar="FOLDER",
                   help="a folder jobs may read base models, weights and data from, besides <home>/models and "
                   "<home>/datasets; repeat for more (default from LORA_SCRIPTS_MODEL_ROOTS, separated by ':')")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--home", default="lora_home", help="folder for the database, datasets and jobs (default lora_home)")
    p.add_argument("--db", help="database URL (default: SQLite in the home; or postgresql://user@host/db)")
    p.add_argument("--token", help="access token (default: LORA_SCRIPTS_TOKEN, else generated into <home>/token)")
    p.add_argument("--slots", type=int, help="jobs run at once (default: one per GPU, one on CPU)")
    p.add_argument("--no-runner", action="store_true", help="API only; another server on the same database runs jobs")
    p.add_argument("--max-upload-mb", type=float, default=20, help="largest accepted upload file (default 20)")
    p.add_argument("--mirror", metavar="S3_URL", help="copy finished jobs' outputs to s3://bucket/prefix (s3fs)")
    p.add_argument("--lease", type=float, default=60.0, metavar="SECONDS",
                   help="servers sharing one database and storage: a server whose heartbeat stops this long is "
                        "presumed lost and its running jobs resume on another (default 60)")
    p.add_argument("--demo", action="store_true", help="add a tiny model and dataset to the home (offline)")
    p.add_argument("--allow-remote-code", action="store_true",
                   help="accept jobs with trust_remote_code: true, which run a model folder's own Python code with "
                   "this service's permissions (default: refused with 422; also LORA_SCRIPTS_ALLOW_REMOTE_CODE=1)")
    p.add_argument("--runner", choices=["local", "kubernetes"], default=None,
                   help="local: trainers as subprocesses here (default); kubernetes: one batch/v1 Job per job "
                   "(default from LORA_SCRIPTS_RUNNER)")
    p.add_argument("--k8s-namespace", help="kubernetes runner: namespace of the Jobs (default: "
                   "LORA_SCRIPTS_K8S_NAMESPACE, else the service pod's own)")
    p.add_argument("--k8s-image", help="kubernetes runner: trainer image (default: LORA_SCRIPTS_K8S_IMAGE, else the "
                   "service pod's own image)")
    p.add_argument("--k8s-kubeconfig", help="kubernetes runner: kubeconfig file (default: LORA_SCRIPTS_K8S_KUBECONFIG, "
                   "else the in-cluster service account)")
    p.set_defaults(func=lambda a: __import__("lora_scripts.service", fromlist=["x"]).serve_command(a))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        # one line, always: a line break inside a message (a file name, a quoted value) is shown escaped
        print("error: " + str(exc).strip().replace("\r", "\\r").replace("\n", "\\n"), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

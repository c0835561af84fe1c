"""``lora-scripts serve``: the API, the console and the runner under uvicorn; ``--demo`` adds a tiny model and a
dataset. The options are declared in :mod:`lora_scripts.cli`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from sqlalchemy.exc import OperationalError

from ..errors import ConfigError
from .app import ServiceSettings, create_app
from .security import UploadLimits, is_loopback


def settings_from_args(args: argparse.Namespace) -> ServiceSettings:
    """Translate the command line (and the test hook LORA_SCRIPTS_TRAIN_COMMAND, a JSON list) into settings."""
    if args.slots is not None and args.slots < 1:
        raise ConfigError("--slots: must be at least 1")
    if not args.lease > 0:
        raise ConfigError(f"--lease: {args.lease:g} must be a positive number of seconds")
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port: {args.port} is not a port number (1-65535)")
    if args.db and not args.db.startswith(("sqlite:", "postgresql:", "postgresql+psycopg:")):
        raise ConfigError(f"--db: {args.db!r} is not a sqlite:/// or postgresql:// URL")
    runner = getattr(args, "runner", None) or os.environ.get("LORA_SCRIPTS_RUNNER") or "local"
    if runner not in ("local", "kubernetes"):
        raise ConfigError(f"LORA_SCRIPTS_RUNNER: {runner!r} is not 'local' or 'kubernetes'")
    k8s_options = {key: getattr(args, f"k8s_{key}", None) for key in ("namespace", "image", "kubeconfig")}
    model_roots = list(getattr(args, "model_root", None) or []) + \
        [p for p in os.environ.get("LORA_SCRIPTS_MODEL_ROOTS", "").split(os.pathsep) if p]
    for root in model_roots:
        if not Path(root).expanduser().is_dir():
            raise ConfigError(f"--model-root: {root} is not a folder; give an existing folder of models or data")
    command = os.environ.get("LORA_SCRIPTS_TRAIN_COMMAND")
    limit = int(args.max_upload_mb * 2**20)
    mirror_options = {}
    if os.environ.get("LORA_SCRIPTS_S3_ENDPOINT"):
        mirror_options["endpoint_url"] = os.environ["LORA_SCRIPTS_S3_ENDPOINT"]
    return ServiceSettings(
        home=Path(args.home), db_url=args.db, token=args.token, host=args.host, port=args.port, slots=args.slots,
        run_jobs=not args.no_runner, train_command=json.loads(command) if command else None,
        limits=UploadLimits(max_file_bytes=limit, max_total_bytes=max(limit * 10, 200 * 2**20)),
        mirror_url=args.mirror, mirror_options=mirror_options,
        poll_seconds=float(os.environ.get("LORA_SCRIPTS_RUNNER_POLL", "1.0")),  # how often idle runners look
        lease_seconds=args.lease,
        runner=runner, k8s_options={k: v for k, v in k8s_options.items() if v},
        allowed_hosts=list(getattr(args, "allowed_host", None) or [])
        + [h for h in os.environ.get("LORA_SCRIPTS_ALLOWED_HOSTS", "").split(",") if h.strip()],
        model_roots=[Path(p) for p in model_roots],
        allow_remote_code=bool(getattr(args, "allow_remote_code", False))
        or _env_flag("LORA_SCRIPTS_ALLOW_REMOTE_CODE"),
    )


def _env_flag(name: str) -> bool:
    """A yes/no environment variable (1/true/yes or 0/false/no/empty); anything else is a one-line error."""
    value = os.environ.get(name, "").strip().lower()
    if value not in ("", "0", "false", "no", "1", "true", "yes"):
        raise ConfigError(f"{name}: {value!r} is not 1/true/yes or 0/false/no")
    return value in ("1", "true", "yes")


def prepare_demo(settings: ServiceSettings) -> None:
    """Put the tiny SD model in <home>/models/tiny-sd and a captioned 'shapes' dataset in the store, and for the
    text task a tiny LLaMA-shaped model in <home>/models/tiny-llama and an instruction set in
    <home>/datasets/demo-text (once each); pre-fill the job form for both tasks."""
    from ..testing import make_captioned_images, make_instruction_data, make_tiny_causal_lm, make_tiny_sd_model
    from .store import JobStore

    settings.resolved()
    model = settings.home / "models" / "tiny-sd"
    if not (model / "model_index.json").exists():
        print(f"demo: building a tiny Stable Diffusion model in {model}")
        make_tiny_sd_model(model)
    text_model = settings.home / "models" / "tiny-llama"
    if not (text_model / "config.json").exists():
        print(f"demo: building a tiny LLaMA-shaped text model in {text_model}")
        make_tiny_causal_lm(text_model, "llama")
    text_data = settings.home / "datasets" / "demo-text" / "instructions.jsonl"
    if not text_data.exists():
        make_instruction_data(text_data, "alpaca", repeat=4)
        print(f"demo: instruction set for the text task in {text_data}")
    store = JobStore(settings.db_url)
    store.migrate()
    dataset_id = "demo-shapes"
    if store.get_dataset(dataset_id) is None:
        make_captioned_images(settings.home / "datasets" / dataset_id, count=12)
        store.create_dataset(dataset_id, "shapes (demo)")
        print(f"demo: dataset 'shapes (demo)' with 12 captioned images in {settings.home / 'datasets' / dataset_id}")
    store.dispose()
    settings.form_defaults = {
        "name": "demo shapes LoRA", "dataset_id": dataset_id, "base_model": "models/tiny-sd", "resolution": 32,
        "lora_rank": 4, "batch_size": 4, "max_train_steps": 60, "learning_rate": "2e-3", "save_steps": 10,
        "sample_prompts": "a red circle in the style of lora",
        "config_yaml": "sample_every_n_steps: 20\nlogging:\n  tensorboard: false\n",
        # what the form switches to when the task selector says text
        "text": {"name": "demo text LoRA", "base_model": "models/tiny-llama", "metadata_path":
                 "datasets/demo-text/instructions.jsonl", "max_seq_length": 128, "lora_rank": 8, "batch_size": 4,
                 "max_train_steps": 30, "learning_rate": "5e-3", "save_steps": 10, "sample_prompts": "Name a colour.",
                 "config_yaml": "packing: true\nsample_max_new_tokens: 12\nlogging:\n  tensorboard: false\n"},
    }


def token_line(token: str, path: Path, created: bool, given: bool, terminal: bool) -> str:
    """What the server says about its token. The token itself only on a terminal: container logs (``docker logs``,
    ``kubectl logs``) and CI logs are read by more people than the service's users."""
    if given:
        return "access token: the one given (--token / LORA_SCRIPTS_TOKEN)"
    if terminal:
        return f"access token ({'new, ' if created else ''}saved in {path}): {token}"
    return f"access token: {'generated and ' if created else ''}saved in {path} (not printed: stdout is not a terminal)"


def run_server(args: argparse.Namespace) -> int:
    """Run until Ctrl-C / SIGTERM; running trainers are stopped with a checkpoint and requeued on the way out."""
    import uvicorn

    settings = settings_from_args(args)
    if args.demo:
        prepare_demo(settings)
    try:
        app = create_app(settings)
    except OperationalError as exc:
        reason = (str(exc.orig).strip().splitlines() or ["no answer"])[0]
        raise ConfigError(f"--db: cannot use the database ({reason}); check the URL, that the server runs and "
                          "that the user may connect") from None
    svc = app.state.service
    shown = "localhost" if is_loopback(settings.host) else settings.host
    print(f"lora-scripts service: home {svc.home}, database {svc.store.engine.url.render_as_string(hide_password=True)}")
    print(token_line(svc.token, svc.home / "token", svc.token_created,
                     given=bool(args.token or os.environ.get("LORA_SCRIPTS_TOKEN")), terminal=sys.stdout.isatty()))
    print(f"console: http://{shown}:{settings.port}/login   API docs: http://{shown}:{settings.port}/docs", flush=True)
    # streams still open at shutdown (a followed log) are cut after a few seconds instead of holding SIGTERM up
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning", timeout_graceful_shutdown=5)
    return 0

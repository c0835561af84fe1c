"""The training service behind ``lora-scripts serve``: a REST API, a web console, a job store and a runner.

It drives the same ``lora-scripts train`` CLI as a subprocess and never reaches inside the trainer. Nothing in the
core package imports this one (FastAPI and SQLAlchemy are only needed for ``serve``).

Modules: :mod:`.store` (SQLAlchemy tables, atomic job claim), :mod:`.runner` (subprocesses, cancel, recovery),
:mod:`.security` (token, safe uploads), :mod:`.jobs` (config validation), :mod:`.metrics` (Prometheus),
:mod:`.app` (the FastAPI app and console pages), :mod:`.mirror` (optional S3 mirror).
"""


def serve_command(args) -> int:
    """``lora-scripts serve``: a one-line error if the service extras are missing, else run the server."""
    from ..errors import UserError

    try:
        from .serve import run_server
    except ImportError as exc:
        raise UserError(f"serve needs the service extras ({exc.name} is not installed): "
                        "pip install 'lora-scripts[service]'") from None
    return run_server(args)

"""The training service behind ``lora-scripts serve``: a REST API, a web console, a job store and a runner.

It drives the same ``lora-scripts train`` CLI as a subprocess and never reaches inside the trainer. Nothing in the
core package imports this one (FastAPI and SQLAlchemy are only needed for ``serve``).

Modules: :mod:`.store` (SQLAlchemy tables, atomic job claim), :mod:`.runner` (subprocesses, cancel, recovery),
:mod:`.security` (token, safe uploads), :mod:`.jobs` (config validation), :mod:`.metrics` (Prometheus),
:mod:`.app` (the FastAPI app and console pages), :mod:`.mirror` (optional S3 mirror).
"""

"""Optional mirror of finished jobs' outputs to S3-compatible storage (fsspec + s3fs).

``lora-scripts serve --mirror s3://bucket/prefix`` copies each succeeded job's output folder (the LoRA files, logs,
samples, summary and its final checkpoint; not the cache) to ``s3://bucket/prefix/<job id>/``. The home stays the
source of truth; the mirror is for sharing and backup. Credentials come from the usual AWS environment variables
or files; ``LORA_SCRIPTS_S3_ENDPOINT`` points at non-AWS storage (MinIO, Ceph, moto).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ConfigError


class Mirror:
    """Copies a job's output folder to ``url`` (``s3://bucket/prefix``)."""

    def __init__(self, url: str, options: dict[str, Any] | None = None) -> None:
        if not url.startswith("s3://") or len(url) <= len("s3://"):
            raise ConfigError(f"--mirror: {url!r} is not an s3://bucket/prefix URL")
        try:
            import fsspec
        except ImportError:
            raise ConfigError("--mirror needs fsspec and s3fs: pip install 'lora-scripts[service]'") from None
        self.url = url.rstrip("/")
        storage = dict(options or {})
        endpoint = storage.pop("endpoint_url", None)
        if endpoint:
            storage.setdefault("client_kwargs", {})["endpoint_url"] = endpoint
        self.fs = fsspec.filesystem("s3", **storage)

    def remote(self, job_id: str) -> str:
        """Where a job's outputs go."""
        return f"{self.url}/{job_id}"

    def upload_job(self, job_id: str, output_dir: Path | None) -> list[str]:
        """Copy the job's outputs; return the remote paths written."""
        if output_dir is None or not output_dir.is_dir():
            return []
        written = []
        for path in sorted(output_dir.rglob("*")):
            rel = path.relative_to(output_dir).as_posix()
            if not path.is_file() or path.is_symlink() or rel.startswith("cache/"):
                continue
            target = f"{self.remote(job_id)}/{rel}"
            self.fs.put_file(str(path), target)
            written.append(target)
        return written

"""The image's HEALTHCHECK: GET /healthz of ``lora-scripts serve`` (the image has no curl).

One image runs both the service and the trainer: when the container's main process is not ``serve`` (a training
container), there is no server to ask and the check passes. The port is read from that process's ``--port``.
"""

from __future__ import annotations

import sys
import urllib.request
from pathlib import Path


def serve_port(argv: list[str]) -> int | None:
    """The port ``lora-scripts ... serve`` listens on, from its arguments; None if it is not ``serve``."""
    if "serve" not in argv:
        return None
    port = 7860  # the CLI's default
    for i, arg in enumerate(argv):
        if arg == "--port" and i + 1 < len(argv):
            port = int(argv[i + 1])
        elif arg.startswith("--port="):
            port = int(arg.split("=", 1)[1])
    return port


def main() -> int:
    argv = [a.decode(errors="replace") for a in Path("/proc/1/cmdline").read_bytes().split(b"\0") if a]
    port = serve_port(argv)
    if port is None:
        return 0
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=4) as response:
            return 0 if response.status == 200 else 1
    except OSError as exc:
        print(f"healthz: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

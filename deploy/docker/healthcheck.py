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
    # PID 1 is the console script (python /opt/venv/bin/lora-scripts serve ...), or an init (docker run --init) in
    # front of it: the command is the first word after the program's name
    program = next((i for i, a in enumerate(argv) if a.rsplit("/", 1)[-1] in ("lora-scripts", "lora_scripts.cli")),
                   None)
    if program is None or next((a for a in argv[program + 1:] if not a.startswith("-")), None) != "serve":
        return None
    port = 7860  # the CLI's default
    for i, arg in enumerate(argv):
        if arg == "--port" and i + 1 < len(argv):
            port = int(argv[i + 1])
        elif arg.startswith("--port="):
            port = int(arg.split("=", 1)[1])
    return port


def main(cmdline: Path = Path("/proc/1/cmdline")) -> int:
    argv = [a.decode(errors="replace") for a in cmdline.read_bytes().split(b"\0") if a]
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

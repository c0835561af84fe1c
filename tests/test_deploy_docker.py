"""deploy/docker: hadolint and checkov on the Dockerfile, the hash lock against pyproject.toml's pins, the image's
runtime contract (user, volumes, entrypoint, healthcheck) and its healthcheck script. No image is built here."""

from __future__ import annotations

import http.server
import importlib.util
import json
import re
import threading
import tomllib

import pytest

from .deploy_tools import ROOT, run_tool

DOCKER = ROOT / "deploy" / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
LOCK = DOCKER / "requirements.lock"


def dockerfile() -> str:
    return DOCKERFILE.read_text(encoding="utf-8")


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") and not pending:
            continue
        pending += line.rstrip("\\").strip() + " " if line.rstrip().endswith("\\") else line.strip()
        if not line.rstrip().endswith("\\"):
            if pending.strip():
                word, _, rest = pending.strip().partition(" ")
                out.append((word.upper(), rest.strip()))
            pending = ""
    return out


def locked() -> dict[str, str]:
    """name -> version of every requirement in the lock (each must carry hashes)."""
    text = LOCK.read_text(encoding="utf-8")
    pins = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        match = re.match(r"([A-Za-z0-9_.-]+)==(\S+)", block)
        if match:
            assert "--hash=sha256:" in block, f"{match.group(1)} has no hash in the lock"
            pins[match.group(1).lower().replace("_", "-")] = match.group(2)
    return pins


def pyproject_pins() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    pins = {}
    extras = project["optional-dependencies"]
    for req in project["dependencies"] + extras["service"] + extras["kubernetes"]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]+\])?==(\S+)", req)
        if match:
            pins[match.group(1).lower().replace("_", "-")] = match.group(3)
    return pins


# --- linters -----------------------------------------------------------------------------------------------------

def test_hadolint():
    proc = run_tool("hadolint", "--failure-threshold", "style", str(DOCKERFILE))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_ignores_are_justified():
    lines = dockerfile().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            assert i > 0 and lines[i - 1].startswith("#") and "hadolint" not in lines[i - 1], \
                f"line {i + 1}: a hadolint ignore needs a comment above it saying why"


def test_checkov():
    proc = run_tool("checkov", "-f", str(DOCKERFILE), "--framework", "dockerfile", "--skip-download", "--quiet",
                    "--compact", "-o", "json")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = json.loads(proc.stdout)["summary"]
    assert summary["failed"] == 0 and summary["passed"] > 50, summary
    assert summary["skipped"] == 0, "no checkov skips in the Dockerfile"


def test_builds_without_a_registry_for_the_frontend():
    """A `# syntax=` directive makes BuildKit pull its frontend image from Docker Hub: the build then fails where no
    registry is reachable. Nothing in the file needs a newer frontend than the built-in one."""
    assert not re.search(r"^#\s*syntax\s*=", dockerfile(), re.M | re.I)


# --- dependencies ------------------------------------------------------------------------------------------------

def test_dependencies_come_from_the_hash_lock():
    steps = instructions(dockerfile())
    runs = [args for word, args in steps if word == "RUN"]
    assert any("pip install --require-hashes --no-deps -r /tmp/requirements.lock" in r for r in runs), runs
    assert ("COPY", "deploy/docker/requirements.lock /tmp/requirements.lock") in steps
    # the project itself: without dependencies and with the locked setuptools (no unpinned build requirements)
    project = [r for r in runs if re.search(r"pip install .*/src\b", r)]
    assert project and all("--no-deps" in r and "--no-build-isolation" in r for r in project), project
    # every other pip install in the image is hash-checked too
    for run in runs:
        if "pip install" in run and run not in project:
            assert "--require-hashes" in run, run


def test_lock_pins_match_pyproject():
    pins, wanted = locked(), pyproject_pins()
    assert pins.get("torch") == "2.13.0"
    for name in ("diffusers", "transformers", "peft", "accelerate"):
        assert pins.get(name) == wanted[name], f"{name}: lock {pins.get(name)} != pyproject {wanted[name]}"
    for name, version in wanted.items():  # the service and kubernetes extras' pins as well
        assert pins.get(name) == version, f"{name}: lock {pins.get(name)} != pyproject {version}; run `make lock`"
    assert "setuptools" in pins  # the build backend, used with --no-build-isolation
    assert "#   -r deploy/docker/requirements.in" in LOCK.read_text(encoding="utf-8")  # torch, from there


def test_base_image_is_pinned_by_tag_and_digest_and_matches_torchs_cuda():
    froms = [args for word, args in instructions(dockerfile()) if word == "FROM"]
    external = [f for f in froms if "/" in f.split()[0]]
    assert len(external) == 1, froms
    image = external[0].split()[0]
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-cudnn-runtime-ubuntu\d\d\.\d\d@sha256:[0-9a-f]{64}", image)
    assert match, image
    alias = external[0].split()[-1]
    assert all(f.split()[0] in (image, alias) for f in froms), "every stage starts from the pinned base"
    # torch's CUDA libraries (PyPI wheels) and the base image's CUDA: same major version
    runtime = next(v for n, v in locked().items() if n.startswith("nvidia-cuda-runtime"))
    assert runtime.split(".")[0] == match.group(1), (runtime, image)


def test_make_lock_target():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    target = makefile[makefile.index("\nlock:"):]
    assert "pip-compile" in target and "--generate-hashes" in target
    assert "--extra service --extra kubernetes" in target and "--output-file deploy/docker/requirements.lock" in target
    assert "deploy/docker/requirements.in" in target and "mktemp -d" in target  # throwaway venv


# --- runtime contract --------------------------------------------------------------------------------------------

def test_runtime_user_entrypoint_and_writable_paths():
    steps = instructions(dockerfile())
    final = steps[max(i for i, (w, _) in enumerate(steps) if w == "FROM"):]
    assert ("USER", "10001:10001") in final
    assert ("ENTRYPOINT", '["lora-scripts"]') in final
    cmd = json.loads(next(a for w, a in final if w == "CMD"))
    assert cmd[0] == "serve" and cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert cmd[cmd.index("--port") + 1] == "7860" and ("EXPOSE", "7860") in final
    assert cmd[cmd.index("--home") + 1].startswith("/data/")
    assert ("VOLUME", '["/data"]') in final and ("WORKDIR", "/data") in final
    env = " ".join(a for w, a in final if w == "ENV")
    for var in ("HOME", "XDG_CACHE_HOME", "HF_HOME", "MPLCONFIGDIR", "TRITON_CACHE_DIR", "TMPDIR"):
        match = re.search(rf"\b{var}=(\S+)", env)
        assert match and match.group(1).startswith(("/data/", "/tmp")), f"{var} must point at a volume"
    healthcheck = next(a for w, a in final if w == "HEALTHCHECK")
    assert '"/opt/lora-scripts/healthcheck.py"' in healthcheck and "curl" not in healthcheck


def test_dockerignore_keeps_what_the_build_copies():
    allowed = [line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")]
    assert "*" in (ROOT / ".dockerignore").read_text().splitlines()  # everything else stays out of the context
    for word, args in instructions(dockerfile()):
        if word == "COPY" and not args.startswith("--from"):
            for source in args.split()[:-1]:
                assert source in allowed, f"COPY {source}: excluded by .dockerignore"


# --- healthcheck script ------------------------------------------------------------------------------------------

def healthcheck_module():
    spec = importlib.util.spec_from_file_location("healthcheck", DOCKER / "healthcheck.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv, port", [
    (["/opt/venv/bin/python", "/opt/venv/bin/lora-scripts", "serve", "--host", "0.0.0.0", "--port", "7860"], 7860),
    (["/opt/venv/bin/python", "/opt/venv/bin/lora-scripts", "serve", "--port=9000"], 9000),
    (["/sbin/docker-init", "--", "lora-scripts", "serve"], 7860),
    (["/opt/venv/bin/python", "/opt/venv/bin/lora-scripts", "train", "--config", "serve"], None),
    (["/opt/venv/bin/python", "/opt/venv/bin/lora-scripts", "demo"], None),
])
def test_healthcheck_finds_the_service_port(argv, port):
    assert healthcheck_module().serve_port(argv) == port


def test_healthcheck_asks_healthz(tmp_path):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server API
            self.send_response(200 if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    module, cmdline = healthcheck_module(), tmp_path / "cmdline"
    cmdline.write_bytes(b"\0".join([b"python3", b"/opt/venv/bin/lora-scripts", b"serve", b"--port", str(port).encode()]))
    try:
        assert module.main(cmdline) == 0
    finally:
        server.shutdown()
        server.server_close()
    assert module.main(cmdline) == 1  # nothing listens any more
    cmdline.write_bytes(b"\0".join([b"python3", b"/opt/venv/bin/lora-scripts", b"train", b"--config", b"x.yaml"]))
    assert module.main(cmdline) == 0  # a training container: nothing to ask

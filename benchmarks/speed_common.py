"""Shared machinery of the speed benchmarks (image_speed.py, text_speed.py, startup_speed.py).

Each contender runs in its own process (this avoids one contender's allocator state, threads or imports colouring
another's numbers), contenders alternate within every repeat so machine noise hits them alike, and every figure is a
median over repeats. Ratios are taken per repeat (side by side) and then the median of those is reported. A child's
peak resident memory comes from ``os.wait4`` (the kernel's ru_maxrss for that process); on CUDA the child reports
``torch.cuda.max_memory_allocated``.

A worker prints one line ``RESULT <json>`` as its last output; everything else it prints is kept for errors.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "BENCHMARKS.md"


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def run_worker(argv: list[str], timeout: float = 3600) -> dict[str, Any]:
    """Run ``python argv...`` in a fresh process; return its RESULT json plus ``peak_rss_mb`` and ``wall_s``."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=child_env(), cwd=str(ROOT))
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker {' '.join(argv)} failed (exit {proc.returncode}):\n{out[-4000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    result.setdefault("peak_rss_mb", usage.ru_maxrss / 1024)  # KiB on Linux
    result["wall_s"] = wall
    return result


def emit(result: dict[str, Any]) -> None:
    """What a worker calls last."""
    print("RESULT " + json.dumps(result), flush=True)


def clock() -> tuple[float, float]:
    """(wall, CPU time of this process): with one thread per contender, CPU time does not count the time another
    job on a shared machine holds the core, so rates per CPU-second are far steadier than per wall-second."""
    return time.perf_counter(), time.process_time()


def rates(units_per_step: list[float], ends: list[tuple[float, float]], start: tuple[float, float], first: int,
          extra_s: tuple[float, float] = (0.0, 0.0)) -> tuple[float, float]:
    """(units per wall second, units per CPU second) over steps ``first..`` (``ends[i]``: clocks when step i
    finished; ``start``: clocks before step 0; ``extra_s``: seconds added to the span, e.g. a cache build)."""
    if len(ends) <= first:
        raise ValueError(f"need more than {first} steps")
    begin = ends[first - 1] if first else start
    units = sum(units_per_step[first:])
    return tuple(units / (ends[-1][k] - begin[k] + extra_s[k]) for k in (0, 1))


def alternate(contenders: list[str], repeats: int, run: Callable[[str, int], dict[str, Any]],
              log: Callable[[str], None] = print) -> dict[str, list[dict[str, Any]]]:
    """Run every contender once per repeat, rotating the order each repeat; results per contender, repeat order."""
    results: dict[str, list[dict[str, Any]]] = {c: [] for c in contenders}
    for rep in range(repeats):
        order = contenders[rep % len(contenders):] + contenders[: rep % len(contenders)]
        for name in order:
            res = run(name, rep)
            results[name].append(res)
            log(f"  repeat {rep + 1}/{repeats} {name}: " + ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()
                if not isinstance(v, (list, dict))))
    return results


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float], fmt: str = "{:.1f}") -> str:
    """``median (min-max)``."""
    return f"{fmt.format(median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def paired_ratio(results: dict[str, list[dict[str, Any]]], num: str, den: str, key: str) -> list[float]:
    """Per-repeat ratios ``num[key] / den[key]`` (the side-by-side measurement)."""
    return [a[key] / b[key] for a, b in zip(results[num], results[den])]


def machine_info(device: str = "cpu") -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = "load average %.2f %.2f %.2f at start" % os.getloadavg()
    except OSError:
        load = ""
    mem = ""
    try:
        kb = int(next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")).split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    gpu = ""
    if device == "cuda" and torch.cuda.is_available():
        gpu = f", GPU {torch.cuda.get_device_name(0)}"
    return (f"{cpu}, {os.cpu_count()} logical CPUs{mem}{gpu}; torch {torch.__version__} ({torch.get_num_threads()} "
            f"threads), Python {platform.python_version()}, {platform.system()} {platform.release()}; {load}")


def command_line() -> str:
    return "PYTHONPATH=. python " + " ".join(shlex.quote(a) for a in sys.argv)


def write_section(name: str, text: str, doc: Path = DOC) -> None:
    """Replace the ``<!-- bench:name -->`` ... ``<!-- /bench:name -->`` block of docs/BENCHMARKS.md (or append it)."""
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    current = doc.read_text(encoding="utf-8") if doc.exists() else "# Benchmarks\n"
    if begin in current and end in current:
        head, rest = current.split(begin, 1)
        current = head + block + rest.split(end, 1)[1]
    else:
        current = current.rstrip() + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(current, encoding="utf-8")

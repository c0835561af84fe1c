"""Shared machinery of the speed benchmarks (image_speed.py, text_speed.py, startup_speed.py).

Each contender runs in its own process (this avoids one contender's allocator state, threads or imports colouring
another's numbers), contenders alternate within every repeat so machine noise hits them alike, and every figure is a
median over repeats. Ratios are taken per repeat (side by side) and then the median of those is reported. A child's
peak resident memory comes from ``os.wait4`` (the kernel's ru_maxrss for that process); on CUDA the child reports
``torch.cuda.max_memory_allocated``.

A worker prints one line ``RESULT <json>`` as its last output; everything else it prints is kept for errors.
"""

from __future__ import annotations

import argparse
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


# --- the drivers' shared parts (image_speed.py, text_speed.py) ------------------------------------------------------
def add_driver_args(parser: argparse.ArgumentParser, contenders: list[str], batch: int) -> None:
    """The options every speed driver takes, plus the hidden ones a contender's worker process gets."""
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads in every contender (0: torch's default); 1 is steadier on a shared machine")
    parser.add_argument("--contenders", default=",".join(contenders))
    parser.add_argument("--ours-set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config keys for our contender (e.g. channels_last=true)")
    parser.add_argument("--no-doc", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)


def prepare_driver(args: argparse.Namespace) -> dict[str, Any]:
    """Pin torch's threads (inherited by every contender through OMP_NUM_THREADS) and parse ``--ours-set``."""
    import torch
    import yaml

    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    extra = {}
    for item in args.ours_set:
        key, value = item.split("=", 1)
        extra[key] = yaml.safe_load(value)
    return extra


def run_contenders(script: str, spec: dict[str, Any], tmp: Path, contenders: list[str],
                   repeats: int) -> dict[str, list[dict[str, Any]]]:
    """Every contender ``repeats`` times, alternating, each in a fresh ``python script --worker NAME`` process."""
    def run(name: str, rep: int) -> dict[str, Any]:
        return run_worker([script, "--worker", name, "--spec", json.dumps({**spec, "out": str(tmp / f"{name}-{rep}")})])

    print(f"running {contenders} x {repeats}", flush=True)
    return alternate(contenders, repeats, run)


def rate_table(results: dict[str, list[dict[str, Any]]], contenders: list[str], unit: str, prefix: str,
               fmt: str) -> list[str]:
    """The markdown table of steady / end-to-end rates per CPU-second, wall-clock rate and peak memory; ``prefix``
    picks the result keys (``steady_<prefix>_cpu_s``, ``e2e_<prefix>_cpu_s``, ``steady_<prefix>_s``)."""
    rows = [f"| contender | steady {unit}/CPU-s | end-to-end {unit}/CPU-s | steady {unit}/s (wall) | "
            "peak memory MB | runs |", "|---|---:|---:|---:|---:|---:|"]
    for name in contenders:
        r = results[name]
        rows.append(f"| {name} | {spread([x[f'steady_{prefix}_cpu_s'] for x in r], fmt)} | "
                    f"{spread([x[f'e2e_{prefix}_cpu_s'] for x in r], fmt)} | "
                    f"{spread([x[f'steady_{prefix}_s'] for x in r], fmt)} | "
                    f"{median([x['peak_rss_mb'] for x in r]):.0f} | {len(r)} |")
    return rows


def bare_overhead_lines(results: dict[str, list[dict[str, Any]]], prefix: str, unit: str) -> list[str]:
    """Ours against the bare loop, as time per ``unit`` (target ≤ 1.05×), when both ran."""
    if "ours" not in results or "bare" not in results:
        return []
    return [f"- ours / bare loop, time per {unit} ({label}): "
            f"**{spread(paired_ratio(results, 'bare', 'ours', key), '{:.3f}')}×** (target ≤ 1.05×)"
            for key, label in ((f"steady_{prefix}_cpu_s", "steady, CPU time"), (f"steady_{prefix}_s", "steady, wall clock"))]


def memory_label(device: str) -> str:
    """What the table's memory column measures on ``device``."""
    return "GPU memory (torch.cuda.max_memory_allocated)" if device == "cuda" else "peak RSS of the process"


def publish(section: str, header: list[str], rows: list[str], ratios: list[str], print_only: bool) -> None:
    """Print a driver's report (header lines, the table, the ratio lines) and, unless ``print_only``, write it into
    docs/BENCHMARKS.md as ``section``."""
    text = "\n".join([*header, "", *rows, "", *ratios])
    print("\n" + text)
    if not print_only:
        write_section(section, text)

"""The runner: claims queued jobs and runs each as a ``lora-scripts train`` subprocess.

- One job per slot: a slot is a GPU (``CUDA_VISIBLE_DEVICES`` set to it) or, without GPUs, one CPU slot; ``--slots``
  changes the number.
- Every trainer runs in its own session (process group), from a list of arguments (never a shell), with its output
  appended to ``<home>/jobs/<id>/train.log``. Its pid and /proc start time are recorded in the store.
- Cancel sends SIGTERM to the group: the trainer finishes its step, writes a checkpoint and exits.
- Every run passes ``--resume latest``: a fresh job starts at step 0, a resumed or recovered one continues from its
  newest complete checkpoint, and the trainer's resume is exact.
- If the server dies, the kernel sends its trainers SIGTERM (``PR_SET_PDEATHSIG``, Linux): they checkpoint and stop.
- Start-up recovery: jobs this worker left ``running`` (the server died) are stopped if their trainer is still alive
  (it is not our child any more, so it is found by pid + start time, which rules out a reused pid) and put back in
  the queue, where they are claimed first (oldest) and resume. Queued jobs simply stay queued.
- Host failure: a heartbeat thread bumps this worker's beat count in the store every ``lease / 6`` seconds. Every
  runner watches the others' counts; one that stands still for a whole ``lease`` belongs to a dead host, and its
  running jobs are requeued (:meth:`JobStore.take_over`) and resume here or on any other live host from the latest
  checkpoint on the shared storage. A worker that was only cut off and comes back finds its jobs gone and kills their
  trainers (SIGKILL: the new owner writes the checkpoints now) instead of finishing them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .store import JobStore

DEFAULT_COMMAND = [sys.executable, "-m", "lora_scripts.cli", "train", "--config", "{config}", "--resume", "latest",
                   "--no-progress"]


# Run before the trainer (same process, via exec): ask the kernel to SIGTERM it when the runner dies, so a crashed
# server's trainers checkpoint and stop instead of running on unsupervised (a restarted server resumes them).
_PDEATHSIG = (
    "import ctypes,os,signal,sys\n"
    "try: ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
    "except (OSError, AttributeError): pass\n"
    "if os.getppid() != int(sys.argv[1]): sys.exit('the server stopped before the job started')\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def job_dir(home: Path, job_id: str) -> Path:
    """The folder of one job: config.yaml, train.log and output/."""
    return home / "jobs" / job_id


def process_start_time(pid: int) -> str | None:
    """The start time of ``pid`` from /proc (clock ticks since boot), or None if it is gone or is a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    if fields[0] == "Z":
        return None
    return fields[19]


def detect_gpus() -> list[str]:
    """Indexes of the NVIDIA GPUs present (``nvidia-smi -L``), empty without any."""
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(l for l in out.splitlines() if l.startswith("GPU "))]


class PollingLoop:
    """The background thread of a runner: ``tick()``, then sleep until ``wake()`` or the next poll. A failing round
    (the database or an API server hiccups) is printed and retried; it never ends the thread."""

    poll_seconds: float
    thread_name = "lora-runner"

    def _init_loop(self) -> None:
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def tick(self) -> None:  # pragma: no cover - each runner has its own
        raise NotImplementedError

    @property
    def alive(self) -> bool:
        """True while the background thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def wake(self) -> None:
        """Look at the queue now instead of at the next poll (called when this server queues a job)."""
        self._wake.set()

    def _start_loop(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
        self._thread.start()

    def _stop_loop(self) -> None:
        """Ask the thread to stop after its current round and wait for it."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    def _next_wait(self) -> float:
        return self.poll_seconds

    def _tick_failed(self, exc: Exception) -> None:
        print(f"{self.thread_name}: {type(exc).__name__}: {exc}", file=sys.stderr)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as exc:  # noqa: BLE001 - logged; the next round retries
                self._tick_failed(exc)
            self._wake.wait(self._next_wait())
            self._wake.clear()


@dataclass
class _Running:
    job_id: str
    proc: subprocess.Popen
    slot: int
    log: Any
    terminated: bool = False
    started: float = field(default_factory=time.monotonic)
    result: tuple[str, int, str | None] | None = None  # (state, exit code, error) once it exited, until stored


class Runner(PollingLoop):
    """Runs queued jobs of ``store`` as subprocesses, at most one per slot."""

    def __init__(
        self, store: JobStore, home: Path, worker: str, slots: int | None = None,
        command: list[str] | None = None, poll_seconds: float = 0.5,
        on_finish: Callable[[dict[str, Any]], None] | None = None, lease_seconds: float = 60.0,
    ) -> None:
        self.store, self.home, self.worker = store, home, worker
        gpus = detect_gpus()
        count = slots if slots is not None else max(1, len(gpus))
        # a slot is a GPU index when there are GPUs, else just a number with no device attached
        self.slots: list[str | None] = [gpus[i % len(gpus)] if gpus else None for i in range(count)]
        self.command = command or DEFAULT_COMMAND
        self.poll_seconds = poll_seconds
        self.on_finish = on_finish
        self.running: dict[str, _Running] = {}
        # the last failed write of a job result / of a heartbeat, until one succeeds (readiness reports them)
        self._result_error: str | None = None
        self._beat_error: str | None = None
        self._init_loop()
        self.started_jobs = 0
        # host failure: our beats, and what we saw of the others' (worker -> (beats, monotonic time it last changed))
        self.lease_seconds = lease_seconds
        self.beat_seconds = max(0.1, lease_seconds / 6)
        self._beating = threading.Event()
        self._beat_thread: threading.Thread | None = None
        self._seen: dict[str, tuple[int, float]] = {}
        self._last_watch = 0.0

    @property
    def store_error(self) -> str | None:
        """Why the store does not take this runner's writes now (a job result or a heartbeat failed), else None."""
        if self._result_error:
            return f"a job result could not be stored ({self._result_error}); retrying"
        if self._beat_error:
            return f"heartbeat failed ({self._beat_error})"
        return None

    # --- life cycle ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start beating, recover what a dead server left behind, then run jobs in a background thread."""
        self.store.heartbeat(self.worker)
        self._beat_thread = threading.Thread(target=self._beat_loop, name="lora-heartbeat", daemon=True)
        self._beat_thread.start()
        self.recover()
        self._start_loop()

    def stop(self, grace_seconds: float = 120.0) -> None:
        """Stop claiming; SIGTERM running trainers (they checkpoint) and put their jobs back in the queue."""
        self._stop_loop()
        for run in list(self.running.values()):
            self._signal(run, signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds
        for run in list(self.running.values()):
            try:
                run.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._signal(run, signal.SIGKILL)
                run.proc.wait()
            run.log.close()
            if run.result is not None:  # it had finished; its result was not stored yet
                self.store.finish(run.job_id, self.worker, *run.result)
            elif self.store.get_job(run.job_id)["cancel_requested"]:
                self.store.finish(run.job_id, self.worker, "cancelled", run.proc.returncode)
            else:
                self.store.requeue(run.job_id, self.worker)
        self.running.clear()
        self._beating.set()  # only now: beats go on while trainers checkpoint, so nobody takes their jobs early
        if self._beat_thread is not None:
            self._beat_thread.join()

    def recover(self, grace_seconds: float = 120.0) -> list[str]:
        """Requeue this worker's jobs that a dead server left running, stopping a leftover trainer first."""
        recovered = []
        for job in self.store.running_jobs(self.worker):
            pid, started = job["pid"], job["proc_start"]
            if pid and started and process_start_time(pid) == started:
                # SIGTERM lets it write a checkpoint; the group covers torchrun's workers too
                _killpg(pid, signal.SIGTERM)
                deadline = time.monotonic() + grace_seconds
                while process_start_time(pid) == started and time.monotonic() < deadline:
                    time.sleep(0.2)
                if process_start_time(pid) == started:
                    _killpg(pid, signal.SIGKILL)
                    while process_start_time(pid) == started:
                        time.sleep(0.1)
            if self.store.requeue(job["id"], self.worker):
                self._append_log(job["id"], "[service] the server stopped while this job ran; requeued to resume "
                                 "from its latest checkpoint")
                recovered.append(job["id"])
        return recovered

    # --- the loop -----------------------------------------------------------------------------------------------
    def _next_wait(self) -> float:
        # a short wait while trainers run (to reap them promptly), the full poll when idle; wake() cuts it short
        return self.poll_seconds if not self.running else min(self.poll_seconds, 0.1)

    def _tick_failed(self, exc: Exception) -> None:
        super()._tick_failed(exc)
        self._seen.clear()  # we could not watch: judge nobody dead on time we did not see

    def tick(self) -> None:
        """One round: reap finished trainers, drop jobs taken from us, take over dead workers' jobs, forward cancels,
        start queued jobs on free slots."""
        self._reap()
        if time.monotonic() - self._last_watch >= self.beat_seconds:
            self._drop_lost_jobs()
            self._watch_workers()
        for job_id in self.store.cancel_requested(self.worker):
            run = self.running.get(job_id)
            if run is not None and not run.terminated:
                self._append_log(job_id, "[service] cancel requested: sending SIGTERM (the trainer checkpoints)")
                self._signal(run, signal.SIGTERM)
        while not self._stop.is_set():
            free = [s for s in range(len(self.slots)) if s not in {r.slot for r in self.running.values()}]
            if not free:
                return
            job = self.store.claim_next(self.worker)
            if job is None:
                return
            self._launch(job, free[0])

    def _launch(self, job: dict[str, Any], slot: int) -> None:
        folder = job_dir(self.home, job["id"])
        config = folder / "config.yaml"
        values = {"config": str(config), "job_id": job["id"], "job_dir": str(folder), "home": str(self.home)}
        argv = [part.format(**values) for part in self.command]
        env = dict(os.environ, PYTHONUNBUFFERED="1", LORA_SCRIPTS_JOB_ID=job["id"])
        device = self.slots[slot]
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        folder.mkdir(parents=True, exist_ok=True)
        log = open(folder / "train.log", "ab")
        log.write(f"[service] attempt {job['attempts']} on {self.worker}: {' '.join(argv)}\n".encode())
        log.flush()
        if sys.platform.startswith("linux"):
            argv = [sys.executable, "-S", "-c", _PDEATHSIG, str(os.getpid()), shutil.which(argv[0]) or argv[0], *argv[1:]]
        try:
            # a list of arguments, no shell; own session so SIGTERM reaches the whole group and a server crash
            # does not take the trainer down mid-write (its checkpoint stays consistent, recovery resumes it)
            proc = subprocess.Popen(argv, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            log.close()
            self.store.finish(job["id"], self.worker, "failed", None, f"could not start the trainer: {exc}")
            return
        self.store.set_process(job["id"], proc.pid, process_start_time(proc.pid))
        self.running[job["id"]] = _Running(job["id"], proc, slot, log)
        self.started_jobs += 1

    def _reap(self) -> None:
        """Record the end of every trainer that exited. A job stays ours (and its slot taken) until its result is
        in the store: a failed write (a full disk, the database away) is retried on the next round, so a finished
        job is never left ``running``."""
        for job_id, run in list(self.running.items()):
            if run.result is None:
                code = run.proc.poll()
                if code is None:
                    continue
                run.log.close()
                if run.terminated:
                    run.result = ("cancelled", code, None)
                elif code == 0:
                    run.result = ("succeeded", code, None)
                else:
                    run.result = ("failed", code, self._last_error(job_id, code))
            state, code, error = run.result
            try:
                stored = self.store.finish(job_id, self.worker, state, code, error)
            except Exception as exc:  # noqa: BLE001 - kept, retried next round
                self._result_error = f"{type(exc).__name__}"
                print(f"{self.thread_name}: could not store the result of job {job_id} ({type(exc).__name__}: "
                      f"{exc}); retrying", file=sys.stderr)
                continue
            self._result_error = None
            del self.running[job_id]
            if stored and self.on_finish is not None:
                try:
                    self.on_finish(self.store.get_job(job_id))
                except Exception as exc:  # e.g. the S3 mirror is down: the job itself is done
                    self._append_log(job_id, f"[service] after-job hook failed: {type(exc).__name__}: {exc}")

    # --- host failure -------------------------------------------------------------------------------------------
    def _beat_loop(self) -> None:
        while not self._beating.wait(self.beat_seconds):
            try:
                self.store.heartbeat(self.worker)
                self._beat_error = None
            except Exception as exc:  # the database is away: keep trying; others may take our jobs meanwhile
                self._beat_error = type(exc).__name__
                print(f"runner heartbeat: {type(exc).__name__}: {exc}", file=sys.stderr)

    def _watch_workers(self) -> None:
        """Take over the jobs of every worker whose beat count stood still for a whole lease."""
        now = time.monotonic()
        if now - self._last_watch > 3 * self.beat_seconds:
            self._seen.clear()  # we were away (stalled, or the database was): start every clock afresh
        self._last_watch = now
        for worker, beats in self.store.worker_beats().items():
            if worker == self.worker:
                continue
            seen = self._seen.get(worker)
            if seen is None or seen[0] != beats:
                self._seen[worker] = (beats, now)
            elif now - seen[1] >= self.lease_seconds:
                for job_id in self.store.take_over(worker, beats):
                    self._append_log(job_id, f"[service] worker {worker} sent no heartbeat for "
                                     f"{self.lease_seconds:g} s (its host is presumed lost); requeued by {self.worker} "
                                     "to resume from its latest checkpoint")
                del self._seen[worker]
                self._wake.set()

    def _drop_lost_jobs(self) -> None:
        """Kill the trainers of jobs another worker took over while we were cut off from the store."""
        lost = set(self.running) - self.store.still_ours(self.worker, list(self.running))
        for job_id in lost:
            run = self.running.pop(job_id)
            _killpg(run.proc.pid, signal.SIGKILL)  # not SIGTERM: its checkpoint would race the new owner's
            run.proc.wait()
            run.log.close()
            self._append_log(job_id, f"[service] {self.worker} lost this job to another worker (its heartbeats "
                             "lapsed); its trainer here was stopped")

    # --- helpers ------------------------------------------------------------------------------------------------
    def _signal(self, run: _Running, sig: int) -> None:
        run.terminated = run.terminated or sig == signal.SIGTERM
        _killpg(run.proc.pid, sig)

    def _append_log(self, job_id: str, line: str) -> None:
        folder = job_dir(self.home, job_id)
        if folder.is_dir():
            with open(folder / "train.log", "a", encoding="utf-8") as fh:
                fh.write(line + "\n")

    def _last_error(self, job_id: str, code: int) -> str:
        """The trainer's one-line ``error: ...`` if it printed one (sanitised: it may quote a data file), a full
        disk said so, else the exit code."""
        return trainer_error(job_dir(self.home, job_id) / "train.log", code)


def trainer_error(log: Path, code: int | None) -> str:
    """The reason a trainer failed, in one short line, from the tail of its log."""
    try:
        with open(log, "rb") as fh:
            fh.seek(max(0, os.fstat(fh.fileno()).st_size - 64_000))
            lines = fh.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        lines = []
    tail = lines[-50:]
    if any("No space left on device" in line or "ENOSPC" in line for line in tail):
        return "the disk is full (No space left on device); free space, then resume the job"
    for line in reversed(tail):
        if line.startswith("error: "):
            return sanitise_error(line[len("error: "):])
    return f"the trainer exited with code {code}; see the log"


def sanitise_error(text: str, max_quote: int = 40, max_len: int = 300) -> str:
    """A trainer's error line fit to show anyone who can read the job: printable characters only, each quoted
    excerpt (of a data file, a caption) cut to ``max_quote`` characters, the whole to ``max_len``."""
    import re

    text = "".join(c if c.isprintable() else " " for c in text)

    def cut(match: re.Match) -> str:
        quote, body = match.group(1), match.group(2)
        return f"{quote}{body[:max_quote]}…{quote}" if len(body) > max_quote else match.group(0)

    text = re.sub(r"(['\"])(.*?)\1", cut, text)
    return text if len(text) <= max_len else text[:max_len - 1] + "…"


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass

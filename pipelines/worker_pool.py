"""Beam's worker pool on this machine: run a pipeline on the portable runner with workers in other processes.

    pool = worker_pool.start()
    try:
        featurize.run(cfg, pool.args)   # --runner=PortableRunner --job_endpoint=embed --environment_type=EXTERNAL ...
    finally:
        pool.stop()

`python -m apache_beam.runners.worker.worker_pool_main` starts one SDK worker process per worker the job asks for;
they share no memory with the driver, so this is the path Flink, Spark and Dataflow take (job graph -> runner ->
separate SDK harnesses), on one machine. Tests and benchmarks use it to prove a pipeline does not depend on
the driver's memory. The pool starts workers with `python` from PATH, so this interpreter's folder leads PATH,
and the folder holding `pipelines` leads PYTHONPATH so the workers import this checkout.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_TIMEOUT_S = 60.0


def portable_args(port: int) -> list[str]:
    """Pipeline options that run a job on the embedded job server, its workers from the pool at `port`."""
    return ["--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=EXTERNAL",
            f"--environment_config=localhost:{port}"]


class WorkerPool:
    """A started pool: `args` are the pipeline options that use it; `stop()` ends it and every worker it started."""

    def __init__(self, proc: subprocess.Popen, port: int, log_path: str):
        self.proc, self.port, self.log_path = proc, port, log_path
        self.args = portable_args(port)

    def log_tail(self, chars: int = 4000) -> str:
        with open(self.log_path, errors="replace") as fh:
            return fh.read()[-chars:]

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc.poll() is None or _group_alive(self.proc.pid):
            # The workers are the pool's children in its own process group: one signal reaches them all.
            _signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
            _signal_group(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start(port: int | None = None, log_path: str | None = None, timeout_s: float = START_TIMEOUT_S) -> WorkerPool:
    """Start the pool on `port` (a free one when None) and wait until it accepts connections. Its log and its
    workers' go to `log_path` (a temporary file when None). Raises RuntimeError, with the log's tail, when it
    does not come up."""
    if log_path is None:
        fd, log_path = tempfile.mkstemp(prefix="beam-worker-pool-", suffix=".log")
        os.close(fd)
    attempts = 1 if port is not None else 3  # a free port found here may be taken before the pool binds it
    for attempt in range(attempts):
        chosen = port if port is not None else _free_port()
        pool = _launch(chosen, log_path)
        try:
            _wait_listening(pool, timeout_s)
            return pool
        except RuntimeError:
            pool.stop()
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def _launch(port: int, log_path: str) -> WorkerPool:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main", f"--service_port={port}"],
            env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return WorkerPool(proc, port, log_path)


def _wait_listening(pool: WorkerPool, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pool.proc.poll() is not None:
            raise RuntimeError(f"Beam's worker pool exited with code {pool.proc.returncode} before listening on port "
                               f"{pool.port}; its log ({pool.log_path}) ends:\n{pool.log_tail()}")
        try:
            with socket.create_connection(("localhost", pool.port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"Beam's worker pool did not listen on port {pool.port} within {timeout_s:.0f} s; its log "
                       f"({pool.log_path}) ends:\n{pool.log_tail()}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _group_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True

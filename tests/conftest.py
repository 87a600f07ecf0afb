"""Fixtures shared by the model, training, scoring and portable-runner tests, and what the run does when a test
hangs (pytest.ini's timeout)."""
import faulthandler
import os
import sys
import threading

import pytest

from tests.fake_features import make_tiny_backbone


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory):
    """A random 2-layer, 64-wide BERT folder with the packaged vocab: fast enough to train in tests."""
    return make_tiny_backbone(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def portable_pipeline_args(tmp_path_factory):
    """Pipeline options that run a job on Beam's portable runner, its workers separate processes started by Beam's
    worker pool (`pipelines.worker_pool`): started once per session, stopped with its workers at the end. A pool that
    cannot start fails the test: CI must prove the portable path, not skip it."""
    from pipelines import worker_pool

    log = tmp_path_factory.mktemp("worker-pool") / "pool.log"
    try:
        pool = worker_pool.start(log_path=str(log))
    except RuntimeError as exc:
        pytest.fail(f"Beam's worker pool did not start, so the portable-runner tests cannot run: {exc}")
    try:
        yield list(pool.args)
    finally:
        pool.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """The run's last guard: a test (setup, body, its retry, teardown) that outlasts twice pytest.ini's timeout
    plus five minutes ends the run with every thread's stack, where a hung fixture would wait out CI's limit.
    A test's own `pytest.mark.timeout` sets its timeout (the opt-in quality measurements). Off with the timeout
    (-o timeout=0)."""
    timeout = float(item.config.getini("timeout") or 0)
    if timeout <= 0:
        return (yield)
    marker = item.get_closest_marker("timeout")
    if marker is not None and marker.args:
        timeout = float(marker.args[0])
    limit = 2 * timeout + 300
    timer = threading.Timer(limit, _end_the_run, (item.config, item.nodeid, limit))
    timer.daemon = True
    timer.start()
    # A hung thread that holds the GIL keeps the timer from running: faulthandler's own thread ends the run a
    # minute later (its stacks then go where pytest captured stderr).
    faulthandler.dump_traceback_later(limit + 60, exit=True)
    try:
        return (yield)
    finally:
        timer.cancel()
        faulthandler.cancel_dump_traceback_later()


def _end_the_run(config, nodeid: str, limit: float) -> None:
    capture = config.pluginmanager.getplugin("capturemanager")
    if capture is not None:  # pytest holds stderr while a test runs: give it back to the terminal
        capture.suspend_global_capture(in_=True)
    sys.stderr.write(f"\n{nodeid} has run {limit:.0f} s (setup, body, retry, teardown): ending the run; the stacks of "
                     f"every thread follow\n")
    sys.stderr.flush()
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    sys.stderr.flush()
    os._exit(1)


_TIMED_OUT: list[str] = []
_EXIT_STATUS: dict[str, int] = {}


def pytest_runtest_logreport(report):
    """A test that timed out (pytest-timeout fails it, pytest-rerunfailures tries it once more): every thread's
    stack, written past pytest's capture, because the hung test's failure is not shown when its retry passes."""
    if report.outcome in ("rerun", "failed") and "from pytest-timeout" in report.longreprtext:
        _TIMED_OUT.append(report.nodeid)
        sys.stderr.write(f"\n{report.nodeid} timed out; the stacks of every thread follow\n")
        sys.stderr.flush()
        faulthandler.dump_traceback(file=sys.__stderr__, all_threads=True)


def pytest_sessionfinish(session, exitstatus):
    _EXIT_STATUS["code"] = int(exitstatus)


def pytest_unconfigure(config):
    """Threads a hung test left blocked would keep the interpreter from exiting (it joins every non-daemon thread),
    so CI would wait out its limit after the summary: after a timeout, exit without joining them."""
    stuck = [t.name for t in threading.enumerate()
             if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if _TIMED_OUT and stuck:
        sys.stderr.write(f"a test timed out ({', '.join(_TIMED_OUT)}); exiting past {len(stuck)} blocked threads\n")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS.get("code", 1))

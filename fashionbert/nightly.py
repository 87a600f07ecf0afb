"""Scheduled (nightly) and from-scratch (backfill) runs over one work folder.

    WORKDIR/
      runs/<run-id>/      features/, model/ (when trained), summary.json  - one folder per run
      latest -> runs/<run-id>   the last successful run; moved atomically, only on success
      last-run.json       the newest run's summary, failed or not (for monitoring)
      .lock               held for the whole run: a second run on the same folder exits at once

A run featurizes incrementally against `latest` (nightly) or from nothing (backfill), then runs the
later stages. Any failure exits non-zero naming the stage and leaves `latest` where it was.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import sys
import time
import traceback

from . import publish
from .errors import UserError


class StageFailed(Exception):
    def __init__(self, stage: str, cause: BaseException):
        super().__init__(f"stage '{stage}' failed: {cause}")
        self.stage, self.cause = stage, cause


@contextlib.contextmanager
def workdir_lock(workdir: str):
    """An flock on WORKDIR/.lock: released by the kernel even when the holder is killed, so a crashed
    run never blocks the next night's."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, ".lock")
    fh = open(path, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise UserError(f"--workdir {workdir} is locked by {holder}; wait for that run to finish (two runs must "
                        f"not interleave on one work folder)") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}")
    fh.flush()
    try:
        yield
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def latest_run(workdir: str) -> str | None:
    link = os.path.join(workdir, "latest")
    return os.path.realpath(link) if os.path.isdir(link) else None


def point_latest(workdir: str, run_dir: str) -> None:
    """Swap the `latest` symlink in one rename: readers see the old run or the new one."""
    tmp = os.path.join(workdir, f".latest-{os.getpid()}")
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.symlink(os.path.relpath(run_dir, workdir), tmp)
    os.replace(tmp, os.path.join(workdir, "latest"))


def _write_json(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2, default=str)
    os.replace(tmp, path)


def _featurize_stage(ctx: dict) -> dict:
    from pipelines.config import config_from_args
    from pipelines.featurize import run as featurize

    previous = None
    if not ctx["from_scratch"] and ctx["latest"]:
        candidate = os.path.join(ctx["latest"], "features")
        previous = candidate if publish.is_complete(candidate) else None
    cfg = config_from_args(ctx["args"], catalog=ctx["args"].catalog, out=os.path.join(ctx["run_dir"], "features"),
                           previous=previous, overwrite=False)
    summary = featurize(cfg, ctx["beam_args"])
    ctx["features"] = cfg.out
    return {"previous": previous, "counts": summary["counts"], "elapsed_s": summary["elapsed_s"]}


STAGES = [("featurize", _featurize_stage)]


def run(args: argparse.Namespace, beam_args: list[str], from_scratch: bool) -> dict:
    workdir = os.path.abspath(args.workdir)
    with workdir_lock(workdir):
        run_id = publish.new_run_id()
        run_dir = os.path.join(workdir, "runs", run_id)
        os.makedirs(run_dir)
        ctx = {"args": args, "beam_args": beam_args, "run_dir": run_dir, "latest": latest_run(workdir),
               "from_scratch": from_scratch}
        summary = {"run_id": run_id, "kind": "backfill" if from_scratch else "nightly", "catalog": args.catalog,
                   "status": "running", "stages": {}, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        t_run = time.time()
        try:
            for name, stage in STAGES:
                t0 = time.time()
                try:
                    result = stage(ctx)
                except (Exception, KeyboardInterrupt) as exc:
                    summary["stages"][name] = {"status": "failed", "error": str(exc),
                                               "traceback": traceback.format_exc(limit=5)}
                    raise StageFailed(name, exc) from exc
                summary["stages"][name] = {"status": "ok", "seconds": round(time.time() - t0, 2), **result}
            summary["status"] = "ok"
        except StageFailed as err:
            summary["status"] = "failed"
            summary["failed_stage"] = err.stage
            raise
        finally:
            summary["seconds"] = round(time.time() - t_run, 2)
            _write_json(os.path.join(run_dir, "summary.json"), summary)
            _write_json(os.path.join(workdir, "last-run.json"), summary)
        point_latest(workdir, run_dir)
        return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pipelines.config import CATALOG_HELP
    from pipelines.config import add_arguments as featurize_arguments

    parser.add_argument("--catalog", required=True, help=CATALOG_HELP)
    parser.add_argument("--workdir", required=True, help="work folder holding runs/, latest and the lock")
    featurize_arguments(parser, with_outputs=False)


def main(argv: list[str] | None = None, from_scratch: bool = False) -> int:
    name = "backfill" if from_scratch else "nightly"
    parser = argparse.ArgumentParser(prog=f"fashionbert {name}", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args, beam_args = parser.parse_known_args(argv)
    try:
        summary = run(args, beam_args, from_scratch)
    except StageFailed as err:
        print(f"fashionbert {name}: {err}; latest left unchanged", file=sys.stderr)
        return 1
    except UserError as err:
        print(f"fashionbert {name}: error: {err}", file=sys.stderr)
        return 2
    print(f"{name} run {summary['run_id']} ok in {summary['seconds']} s -> {os.path.join(args.workdir, 'latest')}")
    return 0

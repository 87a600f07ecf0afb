"""Atomic publication of output folders: readers see the old output or the new one, never half of one.

Everything is written into a staging folder beside the target; `_SUCCESS` goes in last; one rename
swaps it in. A killed run leaves only a `*.staging-*` folder that no reader looks at (and that the next
run's `clean_stale_staging` removes).
"""
from __future__ import annotations

import datetime
import glob
import os
import secrets
import shutil

from fashionbert.errors import UserError

SUCCESS = "_SUCCESS"


def new_run_id() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def staging_path(out: str, run_id: str) -> str:
    return f"{os.path.abspath(out).rstrip(os.sep)}.staging-{run_id}"


def check_target(out: str, overwrite: bool) -> None:
    if os.path.exists(out) and os.listdir(out) and not overwrite:
        raise UserError(f"--out {out} already exists and is not empty; pass --overwrite to replace it "
                        f"atomically, or choose a new folder")


def is_complete(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, SUCCESS))


def clean_stale_staging(out: str) -> None:
    for path in glob.glob(f"{os.path.abspath(out).rstrip(os.sep)}.staging-*"):
        shutil.rmtree(path, ignore_errors=True)


def publish(staging: str, out: str) -> None:
    """Mark `staging` complete and move it to `out`, replacing an earlier output there."""
    with open(os.path.join(staging, SUCCESS), "w"):
        pass
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    if os.path.exists(out):
        old = f"{out}.replaced-{os.path.basename(staging).rsplit('-', 1)[-1]}"
        os.rename(out, old)
        os.rename(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, out)

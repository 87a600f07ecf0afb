"""Nightly and backfill runs over a work folder: incremental, atomic `latest`, lock, failures."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fashionbert import nightly, synth
from tests.featurize_helpers import read_manifest, synthetic_row, write_manifest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT}


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "fashionbert.cli", *args, "--no-progress"], capture_output=True,
                          text=True, env=ENV, **kw)


def _edit_catalog(manifest):
    """One product's text changed, one removed, one added."""
    rows = read_manifest(manifest)
    rows[1]["title"] += " (new season)"
    removed = rows.pop(0)["image_id"]
    extra = synthetic_row(manifest, 0, 50)
    write_manifest(manifest, rows + [extra])
    return removed, extra["image_id"]


def test_nightly_twice_recomputes_only_changes_and_moves_latest(tmp_path):
    manifest = synth.write_catalog(tmp_path / "cat", 6)
    work = tmp_path / "work"
    first = _cli("nightly", "--catalog", manifest, "--workdir", str(work))
    assert first.returncode == 0, first.stderr
    run1 = os.path.realpath(work / "latest")
    removed, added = _edit_catalog(manifest)
    second = _cli("nightly", "--catalog", manifest, "--workdir", str(work))
    assert second.returncode == 0, second.stderr
    run2 = os.path.realpath(work / "latest")
    assert run2 != run1 and os.path.dirname(run2) == str(work / "runs")
    summary = json.loads((work / "last-run.json").read_text())
    feat = summary["stages"]["featurize"]
    assert summary["status"] == "ok" and feat["previous"] == os.path.join(run1, "features")
    assert feat["counts"]["images"] == {"new": 1, "changed": 0, "carried": 5, "deleted": 1, "computed": 1}
    assert feat["counts"]["text_rows"] == {"computed": 2, "carried": 4, "deleted": 2}
    assert json.loads(open(os.path.join(run2, "summary.json")).read())["run_id"] == summary["run_id"]
    backfill = _cli("backfill", "--catalog", manifest, "--workdir", str(work))
    assert backfill.returncode == 0, backfill.stderr
    counts = json.loads((work / "last-run.json").read_text())["stages"]["featurize"]["counts"]
    assert counts["images"]["computed"] == 6 and counts["images"]["carried"] == 0


def test_failure_names_the_stage_and_leaves_latest(tmp_path):
    manifest = synth.write_catalog(tmp_path / "cat", 3)
    work = tmp_path / "work"
    assert _cli("nightly", "--catalog", manifest, "--workdir", str(work)).returncode == 0
    before = os.path.realpath(work / "latest")
    bad = _cli("nightly", "--catalog", manifest, "--workdir", str(work), "--id-column", "sku")
    assert bad.returncode == 1
    assert "stage 'featurize' failed" in bad.stderr and "latest left unchanged" in bad.stderr
    assert os.path.realpath(work / "latest") == before
    status = json.loads((work / "last-run.json").read_text())
    assert status["status"] == "failed" and status["failed_stage"] == "featurize"


def test_killed_run_leaves_latest_and_releases_the_lock(tmp_path):
    manifest = synth.write_catalog(tmp_path / "cat", 3)
    work = tmp_path / "work"
    assert _cli("nightly", "--catalog", manifest, "--workdir", str(work)).returncode == 0
    before = os.path.realpath(work / "latest")
    proc = subprocess.Popen([sys.executable, "-m", "fashionbert.cli", "nightly", "--catalog", "synthetic:400",
                             "--workdir", str(work), "--no-progress"], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and len(os.listdir(work / "runs")) < 2:
        time.sleep(0.2)
    time.sleep(3)  # inside featurize now
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.path.realpath(work / "latest") == before
    killed = [r for r in os.listdir(work / "runs") if str(work / "runs" / r) != before]
    assert killed and not (work / "runs" / killed[0] / "features" / "_SUCCESS").exists()
    again = _cli("nightly", "--catalog", manifest, "--workdir", str(work))  # lock died with the process
    assert again.returncode == 0, again.stderr


def test_second_run_on_a_locked_workdir_exits_with_a_clear_message(tmp_path):
    work = tmp_path / "work"
    with nightly.workdir_lock(str(work)):
        proc = _cli("nightly", "--catalog", "synthetic:2", "--workdir", str(work))
    assert proc.returncode == 2
    assert "is locked by pid" in proc.stderr and "interleave" in proc.stderr
    assert not (work / "latest").exists()


def test_lock_is_exclusive_in_process(tmp_path):
    with nightly.workdir_lock(str(tmp_path)):
        with pytest.raises(Exception, match="locked"):
            with nightly.workdir_lock(str(tmp_path)):
                pass

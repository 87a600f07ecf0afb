"""Nightly and backfill runs over a work folder: featurize incrementally, train or reuse a model, retrieval tables,
evaluate; atomic `latest`, lock, failures named by stage, summary.json for monitoring.

One module fixture runs the first nightly (with --train, on a tiny random BERT so training takes seconds); tests
that need a previous successful run work on their own copy of its work folder and catalog.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fashionbert.commands import nightly
from fashionbert.data import synth
from schemas import RETRIEVAL, read_table
from tests.featurize_helpers import read_manifest, synthetic_row, write_manifest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT}
N_PRODUCTS, TOP_K = 6, 3
# fp32 so that a night's tables, with scores reused from the night before, equal a backfill's exactly (bf16 margins
# move by ~1e-3 with the batch they are computed in).
RETRIEVE = ["--top-k", str(TOP_K), "--recall-k", "5", "--retrieve-args=--precision fp32"]
# The evaluate defaults assume a real catalog; 6 products need all of them as queries, 5 candidates each. fp32 as
# retrieve, so that evaluate reads the pairs retrieve scored that night on every CPU (with --precision auto it would
# run bf16 where the CPU has it natively, and a bf16 stage cannot use an fp32 stage's scores).
EVAL = ["--eval-args", "--split all --queries 6 --candidates 5 --recall-k 5 --precision fp32"]


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "fashionbert.commands.cli", *map(str, args), "--no-progress"],
                          capture_output=True, text=True, env=ENV, **kw)


def _summary(path) -> dict:
    return json.loads(Path(path).read_text())


def _table(run_dir, name):
    return read_table(os.path.join(run_dir, "retrieval", name), "retrieval").to_pydict()


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_backbone):
    """A work folder after one successful `nightly --train` on a 6-product catalog."""
    tmp = tmp_path_factory.mktemp("first-run")
    manifest = synth.write_catalog(tmp / "cat", N_PRODUCTS)
    train_args = f"--backbone {tiny_backbone} --steps 4 --batch-size 4 --val-fraction 0 --checkpoint-every 0 --prefetch 0"
    proc = _cli("nightly", "--catalog", manifest, "--workdir", tmp / "work", "--train", "--train-args", train_args,
                *RETRIEVE, *EVAL)
    assert proc.returncode == 0, proc.stderr
    return {"catalog": tmp / "cat", "work": tmp / "work", "run": os.path.realpath(tmp / "work" / "latest")}


def _copy(first_run, tmp_path) -> tuple[str, Path]:
    """This test's own catalog and work folder (`latest` is a relative link, so it follows the copy)."""
    shutil.copytree(first_run["catalog"], tmp_path / "cat")
    shutil.copytree(first_run["work"], tmp_path / "work", symlinks=True)
    return str(tmp_path / "cat" / "manifest.csv"), tmp_path / "work"


def _edit_catalog(manifest):
    """One product's text changed, one removed, one added."""
    rows = read_manifest(manifest)
    rows[1]["title"] += " (new season)"
    removed = rows.pop(0)
    extra = synthetic_row(manifest, 0, 50)
    write_manifest(manifest, rows + [extra])
    return removed, extra


def test_first_run_trains_scores_evaluates_and_summarises(first_run):
    run, work = first_run["run"], first_run["work"]
    summary = _summary(work / "last-run.json")
    assert summary == _summary(os.path.join(run, "summary.json")) and summary["status"] == "ok"
    model = os.path.join(run, "train", "model")
    assert summary["model"]["source"] == "--train" and summary["model"]["path"] == model
    assert {k: v["status"] for k, v in summary["stages"].items()} == {
        "featurize": "ok", "train": "ok", "retrieve": "ok", "evaluate": "ok"}
    assert summary["stages"]["train"]["final_step"] == 4
    assert len(os.listdir(os.path.join(run, "train", "checkpoints"))) == 1  # nightly keeps one by default
    c = summary["counts"]
    assert (c["catalog_rows"], c["images"], c["texts"], c["rejects"]) == (N_PRODUCTS, N_PRODUCTS, N_PRODUCTS, 0)
    assert (c["text_queries"], c["image_queries"]) == (N_PRODUCTS, N_PRODUCTS)
    assert c["text_to_image_rows"] == c["image_to_text_rows"] == TOP_K * N_PRODUCTS
    assert set(summary["timings_s"]) == {"featurize", "train", "retrieve", "evaluate"}
    metrics = summary["metrics"]
    assert metrics["sample100_queries"] == N_PRODUCTS
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("sample100_t2i_rank1", "sample100_i2t_rank5", "tia_auc",
                                                  "gallery_t2i_rank1"))
    assert _summary(os.path.join(run, "metrics.json"))["sample100"]["queries"] == N_PRODUCTS
    t2i = _table(run, "text_to_image.parquet")
    assert set(t2i["run_id"]) == {summary["run_id"]} and set(t2i["model_version"]) == {summary["model"]["version"]}


def test_nightly_twice_recomputes_only_changes_and_updates_tables(first_run, tmp_path):
    manifest, work = _copy(first_run, tmp_path)
    run1 = os.path.realpath(work / "latest")
    removed, added = _edit_catalog(manifest)
    # reuses latest's model. Without the gate: a 4-step random model ranks its 6 queries at chance, and the edited
    # catalog moves a 6-query Rank@1 by 16.7 points a query (the gate has tests of its own, below).
    second = _cli("nightly", "--catalog", manifest, "--workdir", work, *RETRIEVE, *EVAL, "--max-regression", "100")
    assert second.returncode == 0, second.stderr
    run2 = os.path.realpath(work / "latest")
    assert run2 != run1 and os.path.dirname(run2) == str(work / "runs")
    summary = _summary(work / "last-run.json")
    feat = summary["stages"]["featurize"]
    assert summary["status"] == "ok" and feat["previous"] == os.path.join(run1, "features")
    assert feat["counts"]["images"] == {"new": 1, "changed": 0, "carried": 5, "deleted": 1, "computed": 1, "linked": 5}
    # the carried rows stay in run 1's image file, hard-linked into run 2's features (not copied)
    inodes = {os.stat(f).st_ino for f in glob.glob(os.path.join(run1, "features", "images-*.parquet"))}
    assert inodes & {os.stat(f).st_ino for f in glob.glob(os.path.join(run2, "features", "images-*.parquet"))}
    assert feat["counts"]["text_rows"] == {"computed": 2, "carried": 4, "deleted": 2}
    assert _summary(os.path.join(run2, "summary.json"))["run_id"] == summary["run_id"]
    first = _summary(os.path.join(run1, "summary.json"))
    assert summary["model"]["path"] == first["model"]["path"]
    assert summary["model"]["source"] == f"latest run {os.path.basename(run1)}"
    assert summary["stages"]["train"] == {"status": "skipped"}

    products = {r["product_id"] for r in read_manifest(manifest)}
    images = {r["image_id"] for r in read_manifest(manifest)}
    for name, queries, candidates in (("text_to_image.parquet", products, images),
                                      ("image_to_text.parquet", images, products)):
        table = read_table(os.path.join(run2, "retrieval", name), "retrieval")
        assert table.schema.remove_metadata().equals(RETRIEVAL.remove_metadata())
        d = table.to_pydict()
        assert set(d["query_id"]) == queries and set(d["candidate_id"]) <= candidates
        assert all(d["query_id"].count(q) == TOP_K for q in queries)
        assert set(d["run_id"]) == {summary["run_id"]}
        assert set(d["model_version"]) == {first["model"]["version"]}
        removed_ids = {removed["product_id"], removed["image_id"]}
        assert not removed_ids & (set(d["query_id"]) | set(d["candidate_id"]))
    assert added["product_id"] in _table(run2, "text_to_image.parquet")["query_id"]
    assert added["image_id"] in _table(run2, "image_to_text.parquet")["query_id"]
    assert removed["image_id"] in _table(run1, "image_to_text.parquet")["query_id"]  # yesterday's run is untouched

    # Night 2 ran the cross-encoder only on pairs with the changed or added text or image (the score cache).
    retrieve = summary["stages"]["retrieve"]["counts"]
    assert retrieve["pairs_scored"] + retrieve["pairs_reused"] == retrieve["cross_encoder_pairs"]
    assert 0 < retrieve["pairs_scored"] < retrieve["cross_encoder_pairs"]
    assert retrieve["embeddings_computed"] == 3  # two new texts (one edited, one added) and the added image
    # evaluate draws by product id, so yesterday's queries and candidates mostly come back, scored already
    evaluated = summary["stages"]["evaluate"]["counts"]
    assert evaluated["pairs_reused"] > evaluated["pairs_scored"]
    assert summary["counts"]["pairs_reused"] == retrieve["pairs_reused"] + evaluated["pairs_reused"]
    # Night 1 had no night before it: retrieve reused nothing, evaluate only the pairs retrieve had just scored.
    first_retrieve, first_evaluate = first["stages"]["retrieve"]["counts"], first["stages"]["evaluate"]["counts"]
    assert first_retrieve["pairs_reused"] == 0 and first_retrieve["embeddings_reused"] == 0
    assert first_evaluate["pairs_reused"] > 0
    assert summary["stages"]["retrieve"]["score_cache"]["inputs"]
    assert os.path.isfile(os.path.join(run2, "score_cache", "retrieve.parquet"))

    backfill = _cli("backfill", "--catalog", manifest, "--workdir", work, "--model", summary["model"]["path"],
                    *RETRIEVE, "--skip-evaluate")
    assert backfill.returncode == 0, backfill.stderr
    last = _summary(work / "last-run.json")
    assert last["kind"] == "backfill" and last["stages"]["evaluate"] == {"status": "skipped"} and not last["metrics"]
    assert last["counts"]["images_computed"] == N_PRODUCTS and last["counts"]["images_carried"] == 0
    assert os.path.basename(os.path.realpath(work / "latest")) == last["run_id"]
    # A backfill reuses nothing, and its tables equal night 2's, which reused most of its scores.
    assert last["counts"]["pairs_reused"] == 0 and last["counts"]["embeddings_reused"] == 0
    backfill_dir = os.path.realpath(work / "latest")
    for name in ("text_to_image.parquet", "image_to_text.parquet"):
        night, scratch = _table(run2, name), _table(backfill_dir, name)
        assert [night[k] for k in ("query_id", "rank", "candidate_id")] == \
            [scratch[k] for k in ("query_id", "rank", "candidate_id")]
        assert max(abs(a - b) for a, b in zip(night["score"], scratch["score"])) < 1e-5


def test_failure_in_featurize_names_the_stage_and_leaves_latest(first_run, tmp_path):
    manifest, work = _copy(first_run, tmp_path)
    before = os.path.realpath(work / "latest")
    bad = _cli("nightly", "--catalog", manifest, "--workdir", work, "--id-column", "sku")
    assert bad.returncode == 1
    assert "stage 'featurize' failed" in bad.stderr and "latest left unchanged" in bad.stderr
    assert os.path.realpath(work / "latest") == before
    status = _summary(work / "last-run.json")
    assert status["status"] == "failed" and status["failed_stage"] == "featurize"


def test_failure_in_a_later_stage_names_it_and_leaves_latest(first_run, tmp_path):
    manifest, work = _copy(first_run, tmp_path)
    before = os.path.realpath(work / "latest")
    damaged = tmp_path / "model"
    shutil.copytree(os.path.join(before, "train", "model"), damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # config.json is fine: the damage shows when retrieve loads it
    bad = _cli("nightly", "--catalog", manifest, "--workdir", work, "--model", damaged, *RETRIEVE, *EVAL)
    assert bad.returncode == 1
    message = bad.stderr.strip().splitlines()[-1]
    assert message.startswith("fashionbert nightly: stage 'retrieve' failed: --model")
    assert "cannot read model.safetensors" in message and message.endswith("latest left unchanged")
    assert "Traceback" not in bad.stderr
    assert os.path.realpath(work / "latest") == before
    status = _summary(work / "last-run.json")
    assert status["status"] == "failed" and status["failed_stage"] == "retrieve"
    assert status["stages"]["featurize"]["status"] == "ok" and status["stages"]["retrieve"]["status"] == "failed"
    assert "evaluate" not in status["stages"]
    assert _summary(work / "runs" / status["run_id"] / "summary.json") == status


def test_killed_run_leaves_latest_and_releases_the_lock(first_run, tmp_path):
    manifest, work = _copy(first_run, tmp_path)
    before = os.path.realpath(work / "latest")
    proc = subprocess.Popen([sys.executable, "-m", "fashionbert.commands.cli", "nightly", "--catalog", "synthetic:400",
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
    assert _summary(work / "last-run.json")["status"] == "running"  # what monitoring sees of a killed run
    again = _cli("nightly", "--catalog", manifest, "--workdir", work, *RETRIEVE, "--skip-evaluate")  # lock died too
    assert again.returncode == 0, again.stderr
    assert _summary(work / "last-run.json")["status"] == "ok"


def test_second_run_on_a_locked_workdir_exits_with_a_clear_message(tmp_path):
    work = tmp_path / "work"
    with nightly.workdir_lock(str(work)):
        proc = _cli("nightly", "--catalog", "synthetic:2", "--workdir", str(work))
    assert proc.returncode == 75
    assert "is locked by pid" in proc.stderr and "interleave" in proc.stderr
    assert not (work / "latest").exists()


def test_lock_is_exclusive_in_process(tmp_path):
    with nightly.workdir_lock(str(tmp_path)):
        with pytest.raises(Exception, match="locked"):
            with nightly.workdir_lock(str(tmp_path)):
                pass


# ============================================================================================ errors up front
def _error(capsys, *argv) -> str:
    """Runs nightly in-process; these mistakes must stop it before any work, with one line on stderr."""
    assert nightly.main(list(map(str, argv))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("extra, says", [
    ([], "has no successful run that used one; pass --model DIR or --train"),
    (["--model", "nowhere"], "--model nowhere: no config.json there"),
    (["--train", "--train-args=--stepz 4"],
     "--train-args: unrecognized arguments: --stepz 4; `fashionbert train --help`"),
    (["--train", "--train-args=--steps"], "--train-args: argument --steps: expected one argument"),
    # a lone option as the value (`--train-args --stepz`) reaches train's parser, not nightly's
    (["--train", "--train-args", "--stepz"], "--train-args: unrecognized arguments: --stepz;"),
    (["--train", "--train-args=--out elsewhere"], "--train-args: --out is set by the nightly run itself"),
    (["--train-args=--steps 4", "--model", "m"], "--train-args given without --train"),
    (["--train", "--retrieve-args=--top-k 5"],
     "--retrieve-args: --top-k is set by the nightly run itself; pass --top-k to nightly"),
    (["--train", "--retrieve-args=--index nope"], "--retrieve-args: argument --index: invalid choice: 'nope'"),
    (["--train", "--eval-args=--hubness-temperature -1"],
     "--eval-args: argument --hubness-temperature: '-1': must be a number >= 0"),
    (["--train", "--eval-args=--score-cache x"], "--eval-args: --score-cache is set by the nightly run itself; each run "
                                                 "reuses latest's scores"),
    (["--train", "--max-regression", "-1"], "--max-regression -1.0: must be >= 0"),
    (["--train", "--keep-runs", "0"], "--keep-runs 0: must be >= 1"),
    (["--train", "--eval-args=--queries 'ten"], "--eval-args \"--queries 'ten\": No closing quotation"),
    (["--train", "--eval-args=--draws 2", "--skip-evaluate"], "--eval-args given with --skip-evaluate"),
    (["--train", "--top-k", "10", "--recall-k", "5"], "--recall-k 5 is below --top-k 10"),
])
def test_option_mistakes_stop_before_any_work(tmp_path, capsys, extra, says):
    work = tmp_path / "work"
    err = _error(capsys, "--catalog", "synthetic:2", "--workdir", work, *extra)
    assert says in err
    assert not (work / "runs").exists()


def test_model_of_latest_that_is_gone_is_an_error_before_any_work(first_run, tmp_path, capsys):
    _, work = _copy(first_run, tmp_path)
    latest = os.path.realpath(work / "latest")
    summary = _summary(os.path.join(latest, "summary.json"))
    summary["model"]["path"] = str(tmp_path / "deleted-model")
    Path(latest, "summary.json").write_text(json.dumps(summary))
    err = _error(capsys, "--catalog", "synthetic:2", "--workdir", work)
    assert f"the model the latest run used, {tmp_path / 'deleted-model'}, is gone" in err and "--train" in err
    assert os.listdir(work / "runs") == [os.path.basename(latest)]


def test_model_and_train_are_mutually_exclusive(capsys):
    with pytest.raises(SystemExit) as exc:
        nightly.main(["--catalog", "synthetic:2", "--workdir", "w", "--model", "m", "--train"])
    assert exc.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_refusals_before_any_work_are_in_last_run_json(first_run, tmp_path, capsys):
    _, work = _copy(first_run, tmp_path)
    before = _summary(work / "last-run.json")
    assert before["status"] == "ok"
    _error(capsys, "--catalog", "synthetic:2", "--workdir", work, "--model", tmp_path / "nowhere")
    refused = _summary(work / "last-run.json")
    assert refused["status"] == "refused" and "no config.json there" in refused["error"] and refused["run_id"] is None
    _error(capsys, "--catalog", "synthetic:2", "--workdir", work, "--top-k", "10", "--recall-k", "5")
    assert "--recall-k 5 is below --top-k 10" in _summary(work / "last-run.json")["error"]
    assert os.path.realpath(work / "latest") == first_run["run"].replace(str(first_run["work"]), str(work))


def test_a_locked_workdir_leaves_the_holders_last_run_json(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "last-run.json").write_text('{"status": "running"}')
    with nightly.workdir_lock(str(work)):
        assert nightly.main(["--catalog", "synthetic:2", "--workdir", str(work), "--model", "m"]) == 75
    assert _summary(work / "last-run.json") == {"status": "running"}


# ============================================================================================ quality gate
def _gate_summary(t2i, i2t, split_seed=0, argv=("--queries", "100")):
    return {"stages": {"evaluate": {"status": "ok", "argv": list(argv),
                                    "split": {"kind": "validation", "val_fraction": 0.2, "split_seed": split_seed,
                                              "from": "somewhere"},
                                    "headline": {"sample100_t2i_rank1": t2i, "sample100_i2t_rank1": i2t}}}}


def test_quality_gate_compares_like_for_like(tmp_path):
    latest = tmp_path / "run1"
    latest.mkdir()
    (latest / "summary.json").write_text(json.dumps(_gate_summary(0.40, 0.38)))
    gate = nightly.quality_gate(_gate_summary(0.36, 0.37), str(latest), 5.0)
    assert gate["passed"] and gate["compared"] and gate["figures"]["sample100_t2i_rank1"]["drop_points"] == 4.0
    held = nightly.quality_gate(_gate_summary(0.40, 0.30), str(latest), 5.0)
    assert not held["passed"] and "sample100_i2t_rank1 fell 8.0 points (38.0 -> 30.0)" in held["why"]
    assert nightly.quality_gate(_gate_summary(0.40, 0.30), str(latest), 10.0)["passed"]
    assert nightly.quality_gate(_gate_summary(0.50, 0.50), str(latest), 0.0)["passed"]  # a rise always passes
    for other in (_gate_summary(0.1, 0.1, split_seed=1), _gate_summary(0.1, 0.1, argv=("--queries", "50"))):
        gate = nightly.quality_gate(other, str(latest), 5.0)
        assert gate["passed"] and not gate["compared"] and "another split or with other options" in gate["why"]
    assert not nightly.quality_gate(_gate_summary(0.1, 0.1), None, 5.0)["compared"]
    assert not nightly.quality_gate({"stages": {"evaluate": {"status": "skipped"}}}, str(latest), 5.0)["compared"]


def test_gate_holds_latest_on_a_regression_and_moves_it_otherwise(first_run, tmp_path):
    manifest, work = _copy(first_run, tmp_path)
    run1 = os.path.realpath(work / "latest")
    # Pretend yesterday's model ranked perfectly: today's real metrics are then a regression of > 5 points.
    summary = _summary(os.path.join(run1, "summary.json"))
    real = dict(summary["stages"]["evaluate"]["headline"])
    assert real["sample100_t2i_rank1"] < 0.9 or real["sample100_i2t_rank1"] < 0.9
    summary["stages"]["evaluate"]["headline"].update(sample100_t2i_rank1=1.0, sample100_i2t_rank1=1.0)
    Path(run1, "summary.json").write_text(json.dumps(summary))
    held = _cli("nightly", "--catalog", manifest, "--workdir", work, *RETRIEVE, *EVAL)
    assert held.returncode == 3, held.stderr
    assert "quality gate" in held.stderr and "latest left unchanged" in held.stderr
    assert os.path.realpath(work / "latest") == run1
    last = _summary(work / "last-run.json")
    assert last["status"] == "held" and not last["gate"]["passed"] and "more than --max-regression 5.0" in last["gate"]["why"]
    assert last["stages"]["retrieve"]["status"] == "ok" and os.path.isdir(work / "runs" / last["run_id"] / "retrieval")

    moved = _cli("nightly", "--catalog", manifest, "--workdir", work, *RETRIEVE, *EVAL, "--max-regression", "100")
    assert moved.returncode == 0, moved.stderr
    last = _summary(work / "last-run.json")
    assert last["status"] == "ok" and last["gate"]["passed"] and last["gate"]["compared"]
    assert os.path.basename(os.path.realpath(work / "latest")) == last["run_id"]


# ============================================================================================ pruning
def test_keep_runs_prunes_the_oldest_but_never_latest_this_run_or_a_model_in_use(tmp_path):
    work = tmp_path / "work"
    names = [f"2026120{d}T000000Z-abcdef" for d in range(1, 8)]
    for name in names:
        (work / "runs" / name).mkdir(parents=True)
    (work / "runs" / names[0] / "train" / "model").mkdir(parents=True)
    nightly.point_latest(str(work), str(work / "runs" / names[1]))
    protect = {str(work / "runs" / names[0] / "train" / "model"), str(work / "runs" / names[6])}
    removed = nightly.prune_runs(str(work), 2, protect)
    assert removed == [names[4], names[3], names[2]]
    assert sorted(os.listdir(work / "runs")) == [names[0], names[1], names[5], names[6]]
    assert nightly.prune_runs(str(work), None, set()) == []


def test_keep_runs_in_a_nightly_run(first_run, tmp_path):
    manifest, work = _copy(first_run, tmp_path)
    run1 = os.path.realpath(work / "latest")  # holds the model every later run scores with
    summary = _summary(os.path.join(run1, "summary.json"))
    summary["model"]["path"] = os.path.join(run1, "train", "model")  # the copy's, not the fixture's
    Path(run1, "summary.json").write_text(json.dumps(summary))
    for _ in range(2):
        proc = _cli("nightly", "--catalog", manifest, "--workdir", work, *RETRIEVE, "--skip-evaluate", "--keep-runs", "1")
        assert proc.returncode == 0, proc.stderr
    last = _summary(work / "last-run.json")
    assert sorted(os.listdir(work / "runs")) == sorted([os.path.basename(run1), last["run_id"]])
    assert len(last["pruned"]) == 1 and os.path.basename(os.path.realpath(work / "latest")) == last["run_id"]

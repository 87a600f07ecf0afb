"""retrieve and score-pairs as Beam pipelines (pipelines/retrieve.py, pipelines/score_pairs.py): on the in-process
FnApiRunner they give the single-process stages' outputs on the same model and features; the model is loaded
once per worker process and shared by its threads; Beam options pass through the CLI, and a bad one is refused."""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
import torch

from fashionbert.commands import cli
from fashionbert.errors import UserError
from fashionbert.model.score_fusion import ScoreFusion
from fashionbert.rank import retrieve, score_pairs
from fashionbert.rank.cross_encoder import CrossEncoderScorer, PairScorer
from fashionbert.rank.hubness import Hubness
from pipelines import rerank
from pipelines import retrieve as beam_retrieve
from pipelines import score_pairs as beam_score_pairs
from schemas import read_table
from tests.fake_features import make_tiny_backbone, write_fake_features
from tests.test_retrieve import features  # noqa: F401 - the fixture: 24 products, 2 images each
from tests.test_scoring import fit_itc_head, train_tiny_model

torch.set_num_threads(1)
FN_API = "--runner=FnApiRunner"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, features):
    """A model with an itc head (the recall embeddings) and a fitted-looking fusion, so the cosine counts."""
    tmp = tmp_path_factory.mktemp("model")
    three_tasks = train_tiny_model(tmp, features, make_tiny_backbone(tmp / "bert"))
    model = fit_itc_head(three_tasks, features, tmp / "itc", steps=10)
    ScoreFusion(0.7, 3.0, -0.5, {"source": "test"}).save(model)
    return model


def _retrieve_config(features, model, out, *extra) -> retrieve.RetrieveConfig:
    parser = argparse.ArgumentParser()
    retrieve.add_arguments(parser)
    return retrieve.config_from_args(parser.parse_args([
        "--features", str(features), "--model", str(model), "--out", str(out), "--device", "cpu", "--precision", "fp32",
        "--run-id", "r1", "--no-progress", *map(str, extra)]))


def _tables(out):
    return {name: read_table(str(out / name), "retrieval").to_pydict()
            for name in (retrieve.TEXT_TO_IMAGE, retrieve.IMAGE_TO_TEXT)}


def _assert_same_tables(got, want):
    for name in want:
        g, w = got[name], want[name]
        for column in ("query_id", "query_kind", "rank", "candidate_id", "stage", "model_version", "run_id"):
            assert g[column] == w[column], (name, column)
        np.testing.assert_allclose(g["score"], w["score"], atol=1e-5)
        np.testing.assert_allclose(g["recall_score"], w["recall_score"], atol=1e-5)


@pytest.mark.parametrize("workers", [[], ["--direct_num_workers=2"],
                                     ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]],
                         ids=["one-worker", "two-threads", "two-processes"])
def test_beam_retrieve_equals_the_single_process_tables(tmp_path, features, model_dir, workers):
    """two-processes: workers are `sdk_worker_main` processes fed over gRPC, so nothing may come from the driver's
    memory (as on a portable runner's worker pool)."""
    want_summary = retrieve.run(_retrieve_config(features, model_dir, tmp_path / "single", "--top-k", 4,
                                                 "--recall-k", 6))
    # chunks of 5 items: several embedding, search and top-K tasks, and text queries split over chunks
    got_summary = beam_retrieve.run(_retrieve_config(features, model_dir, tmp_path / "beam", "--top-k", 4,
                                                     "--recall-k", 6), [FN_API, *workers], chunk=5)
    _assert_same_tables(_tables(tmp_path / "beam"), _tables(tmp_path / "single"))
    assert (tmp_path / "beam" / "_SUCCESS").is_file() and not list(tmp_path.glob("*.staging-*"))
    on_disk = json.loads((tmp_path / "beam" / "_run.json").read_text())
    names = {side: sorted(p.name for p in (tmp_path / side).iterdir()) for side in ("beam", "single")}
    assert names["beam"] == names["single"]
    for key in ("model", "features", "index_used", "recall_embedding", "ranking_score", "counts"):
        assert on_disk[key] == want_summary[key] == got_summary[key], key
    assert on_disk["beam_options"] == [FN_API, *workers]


def test_beam_retrieve_and_score_pairs_on_the_portable_runner(tmp_path, features, model_dir, portable_pipeline_args):
    """Workers in the worker pool's processes (the path Flink, Spark and Dataflow take): same outputs."""
    config = _retrieve_config(features, model_dir, tmp_path / "single", "--top-k", 3, "--recall-k", 5)
    retrieve.run(config)
    beam_retrieve.run(dataclasses.replace(config, out=str(tmp_path / "beam")), portable_pipeline_args, chunk=16)
    _assert_same_tables(_tables(tmp_path / "beam"), _tables(tmp_path / "single"))
    pq.write_table(pa.table({"product_id": ["p00003", "zzz", "p00005"], "image_id": ["p00003-1", "p00001-0",
                                                                                     "p00000-0"]}), tmp_path / "p.parquet")
    common = ("--features", features, "--model", model_dir, "--pairs", tmp_path / "p.parquet")
    want = score_pairs.run(_score_config(*common, "--out", tmp_path / "single.parquet"))
    got = beam_score_pairs.run(_score_config(*common, "--out", tmp_path / "beam.parquet"), portable_pipeline_args)
    assert got["scored"] == want["scored"] == 2 and got["rejected"] == 1
    np.testing.assert_allclose(pq.read_table(tmp_path / "beam.parquet").column("score").to_numpy(),
                               pq.read_table(tmp_path / "single.parquet").column("score").to_numpy(), atol=1e-5)


def test_the_model_is_loaded_once_per_process_and_shared(tmp_path, features, model_dir, monkeypatch):
    loads = []
    real = rerank.load_model

    def counting(*a, **kw):
        loads.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(rerank, "load_model", counting)
    # Two worker threads in one process; two RunInference steps (embeddings, cross-encoder) and the DoFns that
    # read the catalog's ids: one load.
    beam_retrieve.run(_retrieve_config(features, model_dir, tmp_path / "beam", "--top-k", 2, "--recall-k", 3),
                      [FN_API, "--direct_num_workers=2", "--direct_running_mode=multi_threading"], chunk=8)
    assert len(loads) == 1
    handler = rerank.CrossEncoderHandler(rerank.spec_for(
        _retrieve_config(features, model_dir, tmp_path / "x"), "r", 1))
    # One copy per process (Beam's Shared), not one model server for all processes.
    assert not handler.share_model_across_processes()
    assert handler.batch_elements_kwargs()["max_batch_size"] == 512  # --block-images


def _score_config(*args) -> score_pairs.ScorePairsConfig:
    parser = argparse.ArgumentParser()
    score_pairs.add_arguments(parser)
    return score_pairs.config_from_args(parser.parse_args([*map(str, args), "--device", "cpu", "--precision", "fp32",
                                                           "--no-progress"]))


@pytest.mark.parametrize("suffix", ["parquet", "csv"])
def test_beam_score_pairs_equals_the_single_process_output(tmp_path, features, model_dir, suffix):
    pairs = pa.table({
        "note": ["a", "b", "c", "d", "e", "f", "g"],
        "image_id": ["p00003-1", "p00000-0", "nope-0", "p00003-1", "p00007-0", None, "p00009-1"],
        "product_id": ["p00003", "p00005", "p00001", "p00003", "zzz", "p00002", "p00011"],
        "weight": [1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5],
    })
    pq.write_table(pairs, tmp_path / "pairs.parquet")
    common = ("--features", features, "--model", model_dir, "--pairs", tmp_path / "pairs.parquet")
    want = score_pairs.run(_score_config(*common, "--out", tmp_path / f"single.{suffix}"))
    got = beam_score_pairs.run(_score_config(*common, "--out", tmp_path / f"beam.{suffix}"), [FN_API])
    read = (lambda p: pq.read_table(p)) if suffix == "parquet" else (lambda p: pcsv.read_csv(p))
    g, w = read(tmp_path / f"beam.{suffix}"), read(tmp_path / f"single.{suffix}")
    assert g.column_names == w.column_names == ["note", "image_id", "product_id", "weight", "score"]
    assert g.drop(["score"]).equals(w.drop(["score"]))
    np.testing.assert_allclose(g.column("score").to_numpy(), w.column("score").to_numpy(), atol=1e-5)
    assert pq.read_table(tmp_path / "beam.rejects.parquet").equals(pq.read_table(tmp_path / "single.rejects.parquet"))
    for key in ("pairs", "scored", "rejected", "reject_reasons", "distinct_pairs_scored", "model_version"):
        assert got[key] == want[key], key
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_cli_passes_beam_options_and_refuses_a_bad_one(tmp_path, features, model_dir, capsys):
    code = cli.main(["retrieve", "--features", str(features), "--model", str(model_dir), "--out",
                     str(tmp_path / "r"), "--top-k", "2", "--recall-k", "3", "--device", "cpu", "--no-progress",
                     "--runner", "FnApiRunner", "--direct_num_workers", "1"])
    assert code == 0
    run_info = json.loads((tmp_path / "r" / "_run.json").read_text())
    assert run_info["beam_options"] == ["--runner", "FnApiRunner", "--direct_num_workers", "1"]
    capsys.readouterr()
    # An option neither the stage's nor Beam's: the stage's usage and argparse's words, before any work.
    for command, bad, words in (
            (["retrieve", "--out", str(tmp_path / "r2")], ["--runner", "FnApiRunner", "--recal-k", "3"],
             "unrecognized arguments: --recal-k 3"),
            (["score-pairs", "--pairs", "x.csv", "--out", str(tmp_path / "o.csv")], ["--direct_num_workrs=2"],
             "unrecognized arguments: --direct_num_workrs=2 (did you mean --direct_num_workers?)")):
        with pytest.raises(SystemExit) as exit_:
            cli.main([*command, "--features", str(features), "--model", str(model_dir), *bad])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.startswith(f"usage: fashionbert {command[0]} ")
        assert err.strip().splitlines()[-1] == f"fashionbert {command[0]}: error: {words}"
    assert not (tmp_path / "r2").exists()


def test_beam_stages_with_a_hubness_corrected_fusion_equal_the_single_process_ones(tmp_path, model_dir, monkeypatch):
    """The biases need every vector: Beam's retrieve takes them from the Embed side input in each worker, its
    score-pairs embeds the catalog for them (and only then) and takes the pairs' cosines from those vectors too; the
    outputs are the single-process ones. The catalog has 1, 2 or 3 photos per product: each worker weighs the texts
    by their images as the single process does."""
    features = write_fake_features(tmp_path / "features", n_products=24, images_per_product=(2, 3, 1), feature_dim=16,
                                   n_image_shards=2, row_group_size=8)
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    ScoreFusion(0.7, 3.0, -0.5, {"source": "test"}, Hubness(0.05, 5, rounds=3).describe()).save(model)
    want = retrieve.run(_retrieve_config(features, model, tmp_path / "single", "--top-k", 4, "--recall-k", 6))
    got = beam_retrieve.run(_retrieve_config(features, model, tmp_path / "beam", "--top-k", 4, "--recall-k", 6),
                            [FN_API, "--direct_num_workers=2"], chunk=5)
    _assert_same_tables(_tables(tmp_path / "beam"), _tables(tmp_path / "single"))
    assert got["hubness"] == Hubness(0.05, 5, rounds=3).describe() and want["hubness"]["k"] == 5
    pq.write_table(pa.table({"product_id": ["p00003", "p00005", "p00011"], "image_id": ["p00003-1", "p00000-0",
                                                                                        "p00009-1"]}),
                   tmp_path / "p.parquet")
    common = ("--features", features, "--model", model, "--pairs", tmp_path / "p.parquet")
    score_pairs.run(_score_config(*common, "--out", tmp_path / "single.parquet"))
    with monkeypatch.context() as m:  # the in-process runner shares this module: no pair is embedded a second time
        m.setattr(PairScorer, "cosines", lambda *a, **k: pytest.fail("score-pairs embedded the pairs' items again"))
        beam_score_pairs.run(_score_config(*common, "--out", tmp_path / "beam.parquet"), [FN_API])
    scores = pq.read_table(tmp_path / "single.parquet").column("score").to_numpy()
    np.testing.assert_allclose(pq.read_table(tmp_path / "beam.parquet").column("score").to_numpy(), scores, atol=1e-5)
    plain = tmp_path / "plain"  # the same weights without the correction score otherwise: the correction ran
    shutil.copytree(model_dir, plain)
    score_pairs.run(_score_config("--features", features, "--model", plain, "--pairs", tmp_path / "p.parquet",
                                  "--out", tmp_path / "plain.parquet"))
    assert np.abs(pq.read_table(tmp_path / "plain.parquet").column("score").to_numpy() - scores).max() > 1e-4


def test_beam_runs_refuse_the_score_cache(tmp_path, features, model_dir):
    config = _retrieve_config(features, model_dir, tmp_path / "r", "--save-scores", tmp_path / "s.parquet")
    with pytest.raises(UserError, match="--score-cache and --save-scores work in the single-process retrieve only"):
        beam_retrieve.run(config, [FN_API])
    with pytest.raises(UserError, match=r"unrecognized arguments: --runer=FnApiRunner .*neither a `fashionbert retrieve`"):
        beam_retrieve.run(_retrieve_config(features, model_dir, tmp_path / "r"), ["--runer=FnApiRunner"])


def test_local_paths_are_refused_where_workers_run_on_other_machines(tmp_path, features, model_dir):
    """Dataflow's workers do not see this machine's disk: the run stops before any work, naming each local path and
    the fix; --shared-filesystem vouches for a mount (the run then gets as far as Beam's own Dataflow checks)."""
    dataflow = ["--runner=DataflowRunner", "--project=p", "--region=r", "--temp_location=gs://b/tmp"]
    config = _retrieve_config(features, model_dir, tmp_path / "r")
    with pytest.raises(UserError) as refused:
        beam_retrieve.run(config, dataflow)
    message = str(refused.value)
    assert f"--model {model_dir}" in message and f"--features {features}" in message and "--out" in message
    assert "gs://" in message and "--shared-filesystem" in message and "\n" not in message
    assert not (tmp_path / "r").exists() and not list(tmp_path.glob("r.staging-*"))
    parser = argparse.ArgumentParser()
    score_pairs.add_arguments(parser)
    pairs_config = score_pairs.config_from_args(parser.parse_args([
        "--features", str(features), "--model", str(model_dir), "--pairs", str(tmp_path / "p.csv"),
        "--out", "gs://b/scored.csv"]))
    (tmp_path / "p.csv").write_text("product_id,image_id\n")
    with pytest.raises(UserError, match=f"--pairs {tmp_path / 'p.csv'}"):
        beam_score_pairs.run(pairs_config, dataflow)
    assert rerank.unknown_beam_args(["--shared-filesystem", *dataflow]) is None  # the CLI lets it through


def test_beam_retrieve_without_tia_weight_runs_no_cross_encoder_pass(tmp_path, features, model_dir, monkeypatch):
    """A fusion the fit left without TIA weight: the Beam tables equal the single-process ones (ranked by the
    calibrated recall cosine, stage "recall", no cross-encoder pair counted) and no worker runs the cross-encoder."""
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    ScoreFusion(0.0, 3.0, -0.5, {"source": "test", "dropped": ["tia"]}).save(model)

    def no_cross_encoder(*args, **kwargs):
        raise AssertionError("the cross-encoder ran for a fusion without TIA weight")

    monkeypatch.setattr(CrossEncoderScorer, "score", no_cross_encoder)  # the in-process runner shares this module
    want = retrieve.run(_retrieve_config(features, model, tmp_path / "single", "--top-k", 4, "--recall-k", 6))
    got = beam_retrieve.run(_retrieve_config(features, model, tmp_path / "beam", "--top-k", 4, "--recall-k", 6),
                            [FN_API], chunk=5)
    tables = _tables(tmp_path / "beam")
    _assert_same_tables(tables, _tables(tmp_path / "single"))
    assert all(set(t["stage"]) == {"recall"} for t in tables.values())
    assert got["counts"] == want["counts"] and got["counts"]["cross_encoder_pairs"] == 0

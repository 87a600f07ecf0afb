"""Every stage reads and writes URIs: train, retrieve, score-pairs, evaluate and report run on `fbtest://` (an
object-store-like scheme over the local disk, tests/object_store.py) and give what the same runs give on local
paths; a model folder at a URI loads with its local model_version; an unknown scheme is one clear line; and without
Beam (the GPU box) the scoring and training modules import, local paths work and URIs go through pyarrow.fs."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
import torch

from fashionbert.data import model_store
from fashionbert.errors import UserError
from fashionbert.evaluation import evaluate, report
from fashionbert.model.loading import load_model
from fashionbert.rank import retrieve, score_pairs
from fashionbert.runtime import resolve_runtime
from fashionbert.train.trainer import run as train_run
from tests.fake_features import make_tiny_backbone, write_fake_features
from tests.object_store import uri
from tests.test_train import REPO, make_args

torch.set_num_threads(1)
CPU = ("--device", "cpu", "--precision", "fp32")


def _config(stage, *argv):
    parser = argparse.ArgumentParser()
    stage.add_arguments(parser)
    return stage.config_from_args(parser.parse_args([str(a) for a in argv]))


def _weights_sha(model_dir: Path) -> str:
    return hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Features and a trained run on the local disk, the same uploaded to the store (`store/`, read as fbtest://)."""
    tmp = tmp_path_factory.mktemp("uris")
    saved = os.environ.get(model_store.CACHE_ENV)
    os.environ[model_store.CACHE_ENV] = str(tmp / "cache")
    features = write_fake_features(tmp / "features", n_products=12, images_per_product=2, feature_dim=16,
                                   n_image_shards=2, row_group_size=8)
    store = tmp / "store"
    shutil.copytree(features, store / "features")
    backbone = make_tiny_backbone(tmp / "bert")
    train = ("--steps", 3, "--checkpoint-every", 2, "--prefetch", 0, "--val-every", 0, "--itc-dim", 16)
    from_uri = train_run(make_args(uri(store / "features"), tmp / "train-uri", backbone, *train))
    local = train_run(make_args(features, tmp / "train", backbone, *train))
    shutil.copytree(tmp / "train", store / "run")
    yield types.SimpleNamespace(tmp=tmp, store=store, features=features, features_uri=uri(store / "features"),
                                model=Path(local["model_dir"]), model_uri=uri(store / "run" / "model"),
                                model_from_uri=Path(from_uri["model_dir"]))
    if saved is None:
        os.environ.pop(model_store.CACHE_ENV, None)
    else:
        os.environ[model_store.CACHE_ENV] = saved


def test_train_reads_features_from_a_uri(world):
    # Seeded training on the same rows: the same weights whether the features were read locally or from the store.
    assert _weights_sha(world.model_from_uri) == _weights_sha(world.model)
    with pytest.raises(UserError, match=r"--out fbtest://.*local folder.*upload it"):
        train_run(make_args(world.features_uri, uri(world.tmp / "nowhere"), world.tmp / "bert", "--steps", 1))


def test_model_from_a_uri_has_its_local_version(world):
    rt = resolve_runtime("cpu", "fp32")
    local = load_model(world.model, rt)
    remote = model_store.load_model(world.model_uri, rt)
    assert remote.version == local.version and remote.step == local.step == 3
    assert remote.uri == world.model_uri and remote.location == world.model_uri and remote.has_itc_head
    assert str(remote.folder).startswith(str(world.tmp / "cache"))
    again = model_store.load_model(world.model_uri, rt)
    assert again.folder == remote.folder  # the cached copy is reused
    # The run's files beside the folder came along: evaluate reads the training split from them.
    assert (remote.folder.parent / "summary.json").is_file()
    assert sorted(p.name for p in (remote.folder.parent / "checkpoints").iterdir()) == ["step-0000002", "step-0000003"]


@pytest.fixture(scope="module")
def retrieved(world):
    options = ("--run-id", "r1", "--top-k", 5, "--recall-k", 8, *CPU)
    local = retrieve.run(_config(retrieve, "--features", world.features, "--model", world.model,
                                 "--out", world.tmp / "retrieval", *options))
    out = uri(world.store / "retrieval")
    remote = retrieve.run(_config(retrieve, "--features", world.features_uri, "--model", world.model_uri, "--out", out,
                                  "--save-scores", uri(world.store / "scores.parquet"), *options))
    return local, remote, out


def test_retrieve_reads_and_writes_uris_with_the_local_tables(world, retrieved):
    local, remote, out = retrieved
    for name in (retrieve.TEXT_TO_IMAGE, retrieve.IMAGE_TO_TEXT):
        assert pq.read_table(world.store / "retrieval" / name).equals(pq.read_table(world.tmp / "retrieval" / name))
    assert sorted(os.listdir(world.store / "retrieval")) == ["_SUCCESS", "_run.json", retrieve.IMAGE_TO_TEXT,
                                                            retrieve.TEXT_TO_IMAGE]
    # No staged object is left (the empty local folder that backs fbtest:// is no object).
    assert not [f for d, _, files in os.walk(world.store) if ".staging-" in d for f in files]
    run_info = json.loads((world.store / "retrieval" / "_run.json").read_text())
    assert run_info["model"]["path"] == world.model_uri and run_info["features"] == [world.features_uri]
    assert run_info["model"]["version"] == local["model"]["version"]
    assert run_info["outputs"]["text_to_image"] == f"{out}/{retrieve.TEXT_TO_IMAGE}"
    # The scores saved to the store serve every pair of a rerun, which replaces the published output.
    again = retrieve.run(_config(retrieve, "--features", world.features_uri, "--model", world.model_uri, "--out", out,
                                 "--score-cache", uri(world.store / "scores.parquet"), "--overwrite", "--run-id", "r1",
                                 "--top-k", 5, "--recall-k", 8, *CPU))
    assert again["counts"]["pairs_scored"] == 0 and again["counts"]["pairs_reused"] == remote["counts"]["pairs_scored"]
    assert pq.read_table(world.store / "retrieval" / retrieve.TEXT_TO_IMAGE).equals(
        pq.read_table(world.tmp / "retrieval" / retrieve.TEXT_TO_IMAGE))
    with pytest.raises(UserError, match="already holds files"):
        retrieve.run(_config(retrieve, "--features", world.features_uri, "--model", world.model_uri, "--out", out,
                             *CPU))


def test_score_pairs_reads_and_writes_uris(world):
    pairs = pa.table({"product_id": ["p00001", "p00002", "zzz"], "image_id": ["p00001-0", "p00003-1", "p00001-0"]})
    pq.write_table(pairs, world.store / "pairs.parquet")
    pq.write_table(pairs, world.tmp / "pairs.parquet")
    local = score_pairs.run(_config(score_pairs, "--features", world.features, "--model", world.model, "--pairs",
                                    world.tmp / "pairs.parquet", "--out", world.tmp / "scored.csv", *CPU))
    remote = score_pairs.run(_config(score_pairs, "--features", world.features_uri, "--model", world.model_uri,
                                     "--pairs", uri(world.store / "pairs.parquet"), "--out",
                                     uri(world.store / "scored.csv"), *CPU))
    assert remote["out"] == uri(world.store / "scored.csv")
    assert remote["rejects"] == uri(world.store / "scored.rejects.parquet")
    assert pcsv.read_csv(world.store / "scored.csv").equals(pcsv.read_csv(world.tmp / "scored.csv"))
    assert pq.read_table(world.store / "scored.rejects.parquet").equals(pq.read_table(local["rejects"]))
    assert remote["scored"] == 2 and remote["model_version"] == local["model_version"]



def test_explain_writes_its_folder_to_a_uri(world):
    from fashionbert.evaluation import explain

    pairs = pa.table({"product_id": ["p00001", "p00002", "zzz"], "image_id": ["p00001-0", "p00003-1", "p00001-0"]})
    pq.write_table(pairs, world.store / "explain-pairs.parquet")
    common = ("--pairs", uri(world.store / "explain-pairs.parquet"), "--size", 32, *CPU, "--no-progress")
    local = explain.run(_config(explain, "--features", world.features, "--model", world.model,
                                "--out", world.tmp / "explain", *common))
    out = uri(world.store / "explain")
    remote = explain.run(_config(explain, "--features", world.features_uri, "--model", world.model_uri, "--out", out,
                                 *common))
    assert remote["out"] == out and remote["explained"] == local["explained"] == 2 and remote["rejected"] == 1
    written = sorted(str(p.relative_to(world.store / "explain")) for p in (world.store / "explain").rglob("*"))
    assert written == ["_SUCCESS", "attention.parquet", "index.html", "pairs", "pairs/000000.png",
                       "pairs/000001.png", "rejects.parquet"]  # nested files moved in, _SUCCESS last
    assert not [p for p in world.store.glob("explain.staging-*/**/*") if p.is_file()]  # (an object store keeps no folder)
    assert (pq.read_table(world.store / "explain" / "attention.parquet").column("patch_map")
            .equals(pq.read_table(world.tmp / "explain" / "attention.parquet").column("patch_map")))

@pytest.fixture(scope="module")
def evaluated(world):
    options = ("--split", "all", "--queries", 6, "--draws", 1, "--candidates", 5, "--recall-k", 8, *CPU)
    local = evaluate.run(_config(evaluate, "--features", world.features, "--model", world.model,
                                 "--out", world.tmp / "metrics.json", *options))
    out = uri(world.store / "metrics.json")
    remote = evaluate.run(_config(evaluate, "--features", world.features_uri, "--model", world.model_uri,
                                  "--out", out, *options))
    return local, remote, out


def test_evaluate_reads_uris_and_writes_its_metrics_there(world, evaluated):
    local, remote, _ = evaluated
    written = json.loads((world.store / "metrics.json").read_text())
    assert written["model"]["path"] == world.model_uri and written["features"] == [world.features_uri]
    assert evaluate.headline(written) == evaluate.headline(local)
    assert written["sample100"]["t2i"] == local["sample100"]["t2i"]


def test_report_reads_and_writes_uris(world, retrieved, evaluated):
    _, _, retrieval = retrieved
    _, _, metrics = evaluated
    argv = ["--retrieval", retrieval, "--metrics", metrics, "--queries", 3, "--out", uri(world.store / "report.html")]
    if (world.store / "run" / "training_curves.png").is_file():  # written where matplotlib is installed
        argv += ["--training", uri(world.store / "run")]
    summary = report.run(_config(report, *argv))
    page = (world.store / "report.html").read_text()
    assert summary["out"] == uri(world.store / "report.html") and summary["text_queries"] == 3
    assert "Sample-100" in page or "sample-100" in page.lower()
    assert world.model_uri in page  # the model as retrieve recorded it
    with pytest.raises(UserError, match="--metrics .*no such file"):
        report.run(_config(report, "--retrieval", retrieval, "--metrics", uri(world.store / "none.json"),
                           "--out", uri(world.store / "r.html")))


def test_an_unknown_scheme_is_one_line_naming_the_option_and_the_fix(world, tmp_path):
    with pytest.raises(UserError) as err:
        retrieve.run(_config(retrieve, "--features", "nosuch://bucket/features", "--model", world.model,
                             "--out", tmp_path / "out", *CPU))
    message = str(err.value)
    assert "\n" not in message and message.startswith("--features nosuch://bucket/features: ")
    assert "nosuch://" in message and "gs://" in message
    with pytest.raises(UserError, match=r"^--out nosuch://b/o: no filesystem here reads nosuch://"):
        evaluate.run(_config(evaluate, "--features", world.features, "--model", world.model,
                             "--out", "nosuch://b/o", *CPU))


NO_BEAM = """
import sys


class NoBeam:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "apache_beam":
            raise ImportError("no apache_beam on this box")


sys.meta_path.insert(0, NoBeam())
import numpy as np
import fashionbert.evaluation.evaluate, fashionbert.rank.retrieve, fashionbert.rank.score_pairs  # noqa: F401
import fashionbert.train.trainer  # noqa: F401
from fashionbert.data import model_store, storage
from fashionbert.data.features import FeatureReader, index_images, load_texts, open_feature_folder
from fashionbert.errors import UserError
from fashionbert.model.loading import load_model
from fashionbert.runtime import resolve_runtime

features, run = sys.argv[1], sys.argv[2]


def upload(folder, to):
    for f in storage.walk(folder):
        storage.write_bytes(to + f.path[len(folder):], open(f.path, "rb").read())


def view(path):
    folder = open_feature_folder(path)
    texts = load_texts([folder])
    index = index_images([folder], texts)
    feats = FeatureReader(index.shards, folder.num_patches, folder.feature_dim).read(index.shard, index.row_group,
                                                                                    index.row)
    return texts.product_ids, index.image_ids, feats


upload(features, "mock:///features")  # pyarrow's in-memory filesystem stands in for an object store
local, remote = view(features), view("mock:///features")
assert local[0] == remote[0] and local[1] == remote[1] and np.array_equal(local[2], remote[2])
upload(run, "mock:///run")
rt = resolve_runtime("cpu", "fp32")
assert model_store.load_model("mock:///run/model", rt).version == load_model(run + "/model", rt).version
try:
    storage.resolve("fbtest:///x", "--features")
    raise AssertionError("fbtest:// is Beam's only")
except UserError as exc:
    assert str(exc).startswith("--features fbtest:///x: no filesystem here reads fbtest://"), exc
assert "apache_beam" not in sys.modules
print("ok")
"""


def test_without_beam_scoring_imports_and_uris_go_through_pyarrow(world):
    env = {**os.environ, "PYTHONPATH": str(REPO), model_store.CACHE_ENV: str(world.tmp / "cache-no-beam")}
    proc = subprocess.run([sys.executable, "-c", NO_BEAM, str(world.features), str(world.tmp / "train")], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]

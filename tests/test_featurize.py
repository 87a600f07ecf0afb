"""End-to-end featurize runs on the FnApiRunner: synthetic, bad input, hm-dev, HDF5, incremental, offline."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tarfile

import h5py
import numpy as np
import pytest

import schemas
from fashionbert.data import synth
from fashionbert.errors import UserError
from fashionbert.model.patch_cnn import FEATURE_DIM
from pipelines import featurize as featurize_module
from tests.bad_corpus import make_bad_corpus
from tests.featurize_helpers import (HM_COLUMNS, HM_DEV, assert_same_view, featurize, hm_subset, live_view, read_kind,
                                     read_manifest, run_info, synthetic_row, write_manifest)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _by_id(table, key="image_id"):
    return {r[key]: r for r in table.to_pylist()}


def test_synthetic_catalog_even_shards_and_schemas(tmp_path):
    out = tmp_path / "feat"
    summary = featurize("synthetic:25", out, images_per_shard=10)
    files = sorted(os.listdir(out))
    assert "_SUCCESS" in files and "_run.json" in files
    image_files = [f for f in files if f.startswith("images-")]
    assert image_files == [f"images-0000{i}-of-00003.parquet" for i in range(3)]
    sizes = [schemas.read_table(str(out / f), "images").num_rows for f in image_files]
    assert sorted(sizes) == [8, 8, 9]  # even split of 25 rows, no empty shard
    images = read_kind(out, "images")
    ids = images.column("image_id").to_pylist()
    assert ids == sorted(ids) and len(set(ids)) == 25  # shards partition the sorted ids
    feats = np.asarray(images.column("features")[0].values, dtype=np.float32).reshape(64, FEATURE_DIM)
    assert np.isfinite(feats).all() and feats.std() > 0
    texts = read_kind(out, "texts")
    assert texts.num_rows == 25
    row = texts.to_pylist()[0]
    assert row["input_ids"][0] == 101 and row["input_ids"][-1] == 102 and len(row["input_ids"]) <= 64
    assert row["subcategory"] and row["group_id"] == row["product_id"]
    counts = summary["counts"]
    assert counts["input_rows"] == 25 == counts["accepted_images"] + counts["rejected_rows"]
    info = run_info(out)
    assert info["schema_version"] == schemas.SCHEMA_VERSION and info["package_versions"]["torch"]


def test_bad_input_corpus_rejects_with_reasons_and_counts_add_up(tmp_path):
    manifest, expected = make_bad_corpus(tmp_path / "corpus")
    out = tmp_path / "feat"
    summary = featurize(manifest, out)
    images = _by_id(read_kind(out, "images"))
    rejects = read_kind(out, "rejects").to_pylist()
    got = {}
    for r in rejects:
        key = r["image_id"] if r["image_id"] not in got and r["reason"] != "duplicate-image-id" else f"{r['image_id']}#dup"
        got[key] = r["reason"]
        assert r["source"] and r["detail"] and r["stage"] in ("catalog", "read", "decode")
    for image_id, reason in expected.items():
        if reason is None:
            assert image_id in images, f"{image_id} should have been featurized"
        else:
            assert got.get(image_id) == reason, f"{image_id}: expected {reason}, got {got.get(image_id)}"
    counts = summary["counts"]
    assert counts["input_rows"] == len(expected) == counts["accepted_images"] + counts["rejected_rows"]
    assert counts["rejected_rows"] == sum(1 for r in expected.values() if r)
    # odd-but-valid images really were converted: 1x1 and 16-bit come out as full-size features
    assert images["one-pixel"]["width"] == 1 and len(images["png16"]["features"]) == 64 * FEATURE_DIM


def test_hm_dev_rows_featurize_without_rejects(tmp_path):
    if not os.path.isfile(os.path.join(HM_DEV, "articles.csv")):
        pytest.skip("../shared/data/hm-dev is not present")
    manifest = hm_subset(tmp_path, 200)  # absolute image paths: allowed, unlike relative ones escaping the folder
    summary = featurize(manifest, tmp_path / "feat", **HM_COLUMNS)
    assert summary["counts"]["accepted_images"] == 200 and summary["counts"]["rejected_rows"] == 0
    texts = read_kind(tmp_path / "feat", "texts").to_pylist()
    assert len(texts) == 200  # one text per article (colour variant)
    t = texts[0]
    assert t["group_id"] != t["product_id"] and t["subcategory"]  # product_code groups colour variants
    images = read_kind(tmp_path / "feat", "images").to_pylist()
    assert {(r["width"], r["height"]) for r in images} == {(360, 540)}


def _write_fashiongen(path, n_products=3, poses=2):
    rng = np.random.default_rng(0)
    n = n_products * poses
    with h5py.File(path, "w") as h5:
        h5["input_image"] = rng.integers(0, 255, size=(n, 256, 256, 3), dtype=np.uint8)
        names = [f"Caf\xe9 jacket {i // poses}".encode("latin-1") for i in range(n)]
        h5["input_name"] = np.array(names, dtype="S40").reshape(n, 1)
        h5["input_description"] = np.array([b"Wool blend, notched lapels."] * n, dtype="S40").reshape(n, 1)
        h5["input_category"] = np.array([b"JACKETS & COATS"] * n, dtype="S20").reshape(n, 1)
        h5["input_subcategory"] = np.array([b"BLAZERS"] * n, dtype="S20").reshape(n, 1)
        h5["input_productID"] = np.array([1000 + i // poses for i in range(n)]).reshape(n, 1)
        h5["input_pose"] = np.array([f"id_gridfs_{1 + i % poses}".encode() for i in range(n)], dtype="S20").reshape(n, 1)


def test_fashiongen_hdf5_fixture_read_by_row_ranges(tmp_path):
    path = tmp_path / "fashiongen_256_256_validation.h5"
    _write_fashiongen(path)
    out = tmp_path / "feat"
    cfg_rows = 4  # several range readers, the last one partial
    from pipelines.config import FeaturizeConfig
    from pipelines.featurize import run

    run(FeaturizeConfig(catalog=str(path), out=str(out), progress=False, hdf5_chunk_rows=cfg_rows),
        ["--runner=FnApiRunner"])
    images = read_kind(out, "images").to_pylist()
    assert sorted(r["image_id"] for r in images) == [f"{1000 + p}-id_gridfs_{k}" for p in range(3) for k in (1, 2)]
    texts = read_kind(out, "texts").to_pylist()
    assert len(texts) == 3  # poses share their product's text
    assert texts[0]["text"].startswith("Caf\xe9 jacket") and texts[0]["subcategory"] == "BLAZERS"


def test_incremental_rerun_recomputes_only_changes_and_matches_full_run(tmp_path):
    cat = tmp_path / "cat"
    manifest = synth.write_catalog(cat, 12, seed=3)
    first = tmp_path / "run1"
    featurize(manifest, first)
    rows = read_manifest(manifest)
    removed = rows.pop(0)["image_id"]
    shutil.copy(cat / rows[1]["image"], cat / rows[0]["image"])  # new pixels, same id
    rows[2]["description"] += " Now in organic cotton."
    extra = synthetic_row(manifest, 3, 99)
    write_manifest(manifest, rows + [extra])
    second = tmp_path / "run2"
    summary = featurize(manifest, second, previous=str(first))
    c = summary["counts"]
    assert c["images"] == {"new": 1, "changed": 1, "carried": 10, "deleted": 1, "computed": 2, "linked": 10}
    assert c["text_rows"] == {"computed": 2, "carried": 10, "deleted": 2}  # changed text = new hash + old one gone
    full = tmp_path / "full"
    featurize(manifest, full)
    inc, ref = live_view(second), live_view(full)
    assert removed not in inc["image_ids"] and extra["image_id"] in inc["image_ids"]
    assert_same_view(inc, ref)  # carried rows (served by the previous run's linked file) equal recomputed ones
    assert read_kind(second, "texts").to_pylist() == read_kind(full, "texts").to_pylist()


def test_same_input_twice_gives_identical_files(tmp_path):
    featurize("synthetic:6", tmp_path / "a")
    featurize("synthetic:6", tmp_path / "b")
    for kind in ("images", "texts", "rejects"):
        assert read_kind(tmp_path / "a", kind).equals(read_kind(tmp_path / "b", kind))


def test_no_socket_is_opened(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"featurize tried to open a network connection: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    summary = featurize("synthetic:4", tmp_path / "feat")
    assert summary["counts"]["accepted_images"] == 4


def test_existing_output_needs_overwrite_and_failed_run_leaves_old_output(tmp_path, monkeypatch):
    out = tmp_path / "feat"
    featurize("synthetic:3", out)
    before = sorted(os.listdir(out))
    with pytest.raises(UserError, match="--overwrite"):
        featurize("synthetic:3", out)

    def crash(*args, **kwargs):
        raise RuntimeError("killed mid-run")

    monkeypatch.setattr(featurize_module, "finalize", crash)
    with pytest.raises(RuntimeError):
        featurize("synthetic:5", out, overwrite=True)
    assert sorted(os.listdir(out)) == before and run_info(out)["counts"]["accepted_images"] == 3


def test_previous_must_be_complete(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(UserError, match="_SUCCESS"):
        featurize("synthetic:2", tmp_path / "feat", previous=str(tmp_path / "half"))


@pytest.mark.parametrize("catalog, message", [
    ("missing.csv", "no such file"),
    ("catalog.txt", "unknown catalog format"),
    ("synthetic:abc", "synthetic:N"),
])
def test_cli_bad_catalog_is_one_clear_line(tmp_path, catalog, message):
    proc = subprocess.run([sys.executable, "-m", "fashionbert.commands.cli", "featurize", "--catalog", str(catalog),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 2
    err = [line for line in proc.stderr.splitlines() if " INFO " not in line]  # the stage's start line is a log line
    assert len(err) == 1 and message in err[0] and "Traceback" not in proc.stderr


def test_cli_missing_column_names_columns_and_fix(tmp_path):
    manifest = synth.write_catalog(tmp_path / "cat", 2)
    proc = subprocess.run([sys.executable, "-m", "fashionbert.commands.cli", "featurize", "--catalog", manifest,
                           "--out", str(tmp_path / "o"), "--id-column", "sku"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 2 and "'sku'" in proc.stderr and "--id-column" in proc.stderr


def test_jsonl_and_parquet_manifests(tmp_path):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = synth.write_catalog(tmp_path / "cat", 4)
    rows = read_manifest(manifest)
    jsonl = tmp_path / "cat" / "manifest.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "cat" / "manifest.parquet", row_group_size=2)
    a = featurize(jsonl, tmp_path / "a")
    b = featurize(tmp_path / "cat" / "manifest.parquet", tmp_path / "b")
    assert a["counts"]["accepted_images"] == b["counts"]["accepted_images"] == 4
    assert read_kind(tmp_path / "a", "images").equals(read_kind(tmp_path / "b", "images"))


def test_sdist_ships_the_code_packages(tmp_path):
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], cwd=ROOT, check=True,
                   capture_output=True)
    (sdist,) = list(tmp_path.glob("*.tar.gz"))
    names = tarfile.open(sdist).getnames()
    for module in ("pipelines/featurize.py", "pipelines/decode.py", "fashionbert/model/patch_cnn.py", "schemas/__init__.py",
                   "setup.py"):
        assert any(n.endswith(module) for n in names), module


def test_worker_image_matches_setup_py():
    """Dockerfile.worker is built by hand (no docker in CI): its base must carry the Beam version setup.py pins, and
    it must copy every package setup.py installs."""
    import re

    with open(os.path.join(ROOT, "Dockerfile.worker")) as fh:
        dockerfile = fh.read()
    with open(os.path.join(ROOT, "setup.py")) as fh:
        setup_py = fh.read()
    beam = re.search(r'"apache-beam==([\d.]+)"', setup_py).group(1)
    assert re.search(rf"^FROM apache/beam_python3\.\d+_sdk:{re.escape(beam)}$", dockerfile, re.M)
    packages = set(re.findall(r'"(\w+)"', re.search(r"find_packages\(include=\[(.*?)\]", setup_py).group(1)))
    assert set(re.findall(r"^COPY (\S+) ", dockerfile, re.M)) == {"setup.py", *packages}
    assert "RUN pip install --no-cache-dir ." in dockerfile


def test_two_local_worker_threads_give_the_same_rows(tmp_path):
    from pipelines.config import FeaturizeConfig
    from pipelines.featurize import run

    run(FeaturizeConfig(catalog="synthetic:8", out=str(tmp_path / "two"), progress=False, images_per_shard=3),
        ["--runner=FnApiRunner", "--direct_num_workers=2"])
    featurize("synthetic:8", tmp_path / "one", images_per_shard=3)
    assert read_kind(tmp_path / "two", "texts").equals(read_kind(tmp_path / "one", "texts"))
    two, one = read_kind(tmp_path / "two", "images"), read_kind(tmp_path / "one", "images")
    assert two.drop(["features"]).equals(one.drop(["features"]))
    # The same rows in the same order; their values may differ by a rounding: fp32 convolutions (what
    # --precision auto runs on a CPU without native bf16) sum in an order that depends on the torch thread count
    # for small batches (2 workers x 1 thread here against 1 worker x 2 threads), ~2e-5 before the fp16 cast.
    a, b = (np.asarray(t["features"].combine_chunks().flatten()) for t in (two, one))
    np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), rtol=2e-3, atol=1e-4)

"""Incremental featurize links the previous run's image files instead of copying their rows (issue #14): the new
folder reads exactly like one that copied them, survives pruning of older runs, and is rewritten (compacted) before
dead rows or files pile up."""
from __future__ import annotations

import errno
import os
import shutil

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.util import assert_that, equal_to

import schemas
from fashionbert.data import synth
from fashionbert.data.features import DEAD_IMAGE_ROWS, index_images, load_texts, open_feature_folder
from fashionbert.errors import UserError
from pipelines import images as img
from tests.fake_features import write_fake_features
from tests.featurize_helpers import (assert_same_view, featurize, live_view, read_manifest, synthetic_row,
                                     write_manifest)

SEED = 5


def _image_files(folder) -> list[str]:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.startswith("images-"))


def _inodes(folder) -> set[int]:
    return {os.stat(f).st_ino for f in _image_files(folder)}


def _num_rows(path) -> int:
    return pq.ParquetFile(path).metadata.num_rows


def _by_id(rows: list[dict]) -> dict:
    return {r["image_id"]: r for r in rows}


def test_linked_chain_reads_like_a_fresh_run_and_survives_pruning(tmp_path):
    cat = tmp_path / "cat"
    manifest = synth.write_catalog(cat, 16, seed=SEED)
    night1, night2, night3 = tmp_path / "night1", tmp_path / "night2", tmp_path / "night3"
    featurize(manifest, night1, images_per_shard=6)
    assert not (night1 / DEAD_IMAGE_ROWS).exists()  # a run without --previous links nothing: an "older" folder

    # Night 2: one image deleted, one changed, one added, one text changed, one image re-assigned to another product.
    rows = _by_id(read_manifest(manifest))
    ids = sorted(rows)
    deleted, changed, retexted, reowned, owner = ids[1], ids[4], ids[7], ids[10], ids[13]
    del rows[deleted]
    shutil.copy(cat / rows[ids[0]]["image"], cat / rows[changed]["image"])  # new pixels, same id
    rows[retexted]["description"] += " Now in organic cotton."
    for col in ("product_id", "title", "description", "category", "subcategory"):
        rows[reowned][col] = rows[owner][col]
    added = synthetic_row(manifest, SEED, 99)
    write_manifest(manifest, [*rows.values(), added])
    summary = featurize(manifest, night2, previous=str(night1), images_per_shard=6)
    c = summary["counts"]
    assert c["images"] == {"new": 1, "changed": 1, "carried": 14, "deleted": 1, "computed": 2, "linked": 13}
    assert c["accepted_images"] == 16
    fresh2 = tmp_path / "fresh2"
    featurize(manifest, fresh2, images_per_shard=6)
    assert_same_view(live_view(night2), live_view(fresh2))
    # The carried rows live in night 1's files, hard-linked: same inode, no new bytes.
    linked = [f for f in _image_files(night2) if os.stat(f).st_ino in _inodes(night1)]
    assert len(linked) == 3 == c["storage"]["image_files_linked"] and c["storage"]["image_files_copied"] == 0
    assert all(os.stat(f).st_nlink >= 2 for f in linked)
    own = [f for f in _image_files(night2) if f not in linked]
    assert sum(_num_rows(f) for f in own) == 3  # changed, new, re-owned: only these rows were written
    dead = pq.read_table(night2 / DEAD_IMAGE_ROWS)
    assert dead.schema.metadata[schemas.META_NAME] == b"dead_image_rows" and dead.num_rows == 3
    assert c["storage"]["dead_image_rows"] == 3 and c["storage"]["compacted"] is None
    assert c["storage"]["bytes_linked"] == sum(os.path.getsize(f) for f in linked)
    assert c["storage"]["bytes_written"] < c["storage"]["bytes_linked"] / 2

    # Night 3 on night 2: links night 1's files again (through night 2's links) and night 2's own file.
    rows = _by_id(read_manifest(manifest))
    del rows[added["image_id"]]
    rows[ids[2]]["title"] += " (new season)"
    write_manifest(manifest, [*rows.values(), synthetic_row(manifest, SEED, 98)])
    summary = featurize(manifest, night3, previous=str(night2), images_per_shard=6)
    c = summary["counts"]
    assert c["images"] == {"new": 1, "changed": 0, "carried": 15, "deleted": 1, "computed": 1, "linked": 15}
    assert _inodes(night3) > (_inodes(night2) & _inodes(night3)) == _inodes(night2)  # all of night 2's + one new
    fresh3 = tmp_path / "fresh3"
    featurize(manifest, fresh3, images_per_shard=6)
    want = live_view(fresh3)
    assert_same_view(live_view(night3), want)
    shutil.rmtree(night1)
    shutil.rmtree(night2)
    assert_same_view(live_view(night3), want)


def test_compaction_past_the_dead_row_threshold_and_on_request(tmp_path):
    manifest = synth.write_catalog(tmp_path / "cat", 8, seed=SEED)
    first, second, third = tmp_path / "first", tmp_path / "second", tmp_path / "third"
    featurize(manifest, first)
    rows = read_manifest(manifest)
    write_manifest(manifest, rows[3:])  # 3 of 8 rows dead in the only file: past 25%
    c = featurize(manifest, second, previous=str(first))["counts"]
    assert c["images"]["carried"] == 5 and c["images"]["linked"] == 0 and c["images"]["computed"] == 0
    assert c["storage"]["compacted"].startswith("3 dead rows") and c["storage"]["image_files_linked"] == 0
    assert not (second / DEAD_IMAGE_ROWS).exists()
    assert all(os.stat(f).st_nlink == 1 for f in _image_files(second))
    before, after = live_view(first), live_view(second)
    keep = [i for i, iid in enumerate(before["image_ids"]) if iid in {r["image_id"] for r in rows[3:]}]
    assert after["image_ids"] == [before["image_ids"][i] for i in keep]
    assert np.array_equal(after["features"], before["features"][keep])

    c = featurize(manifest, third, previous=str(second), compact=True)["counts"]
    assert c["storage"]["compacted"] == "--compact" and c["images"]["carried"] == 5 and c["images"]["linked"] == 0
    assert not (third / DEAD_IMAGE_ROWS).exists() and not (_inodes(third) & _inodes(second))
    assert_same_view(live_view(third), after)


def test_files_are_copied_where_hard_links_fail(tmp_path, monkeypatch):
    manifest = synth.write_catalog(tmp_path / "cat", 6, seed=SEED)
    first, second = tmp_path / "first", tmp_path / "second"
    featurize(manifest, first)
    rows = read_manifest(manifest)
    write_manifest(manifest, rows[1:])

    def cross_device(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    c = featurize(manifest, second, previous=str(first))["counts"]
    assert c["images"]["linked"] == 5 and c["storage"]["image_files_copied"] == 1
    assert c["storage"]["bytes_copied"] > 0 and c["storage"]["bytes_linked"] == 0
    assert all(os.stat(f).st_nlink == 1 for f in _image_files(second))
    before, after = live_view(first), live_view(second)
    assert after["image_ids"] == before["image_ids"][1:] and np.array_equal(after["features"], before["features"][1:])


def test_decide_links_thresholds():
    assert img.decide_links(10, {}, 100) == img.LinkDecision(False)
    assert img.decide_links(10, {"a": (10, 10)}, 100, force_rewrite=True) == img.LinkDecision(False, "--compact")
    assert img.decide_links(10, {"a": (10, 8)}, 100).link  # 2 dead of 12 rows
    assert not img.decide_links(10, {"a": (12, 7)}, 100).link  # 5 dead of 15 rows
    many = {f"f{i}": (1, 1) for i in range(img.COMPACT_FILE_FACTOR + img.COMPACT_FILE_SLACK)}
    assert img.decide_links(len(many), many, 100).link  # at the limit
    many["one more"] = (1, 1)
    assert "image files" in img.decide_links(len(many), many, 100).compacted


def _mark_dead(folder, name: str, rows: list[int]) -> None:
    table = pa.Table.from_pydict({"file": [name] * len(rows), "row": rows}, schema=schemas.DEAD_IMAGE_ROWS)
    pq.write_table(table, folder / DEAD_IMAGE_ROWS)


def test_readers_skip_dead_rows_and_refuse_a_record_of_missing_files(tmp_path):
    from fashionbert.evaluation.report import read_catalog_info

    folder = write_fake_features(tmp_path / "f", n_products=6, feature_dim=4, n_image_shards=2)
    first = sorted(folder.glob("images-*.parquet"))[0]
    dead_id = pq.read_table(first).column("image_id")[1].as_py()
    _mark_dead(folder, first.name, [1])
    opened = open_feature_folder(folder)
    index = index_images([opened], load_texts([opened]))
    assert len(index) == 5 and dead_id not in index.image_ids
    assert dead_id not in read_catalog_info([str(folder)])[2]
    with beam.Pipeline(runner="FnApiRunner") as p:  # what featurize's workers read as --previous rows
        assert_that(p | img.ReadPreviousImages(str(folder)) | beam.Keys(), equal_to(index.image_ids))
    _mark_dead(folder, "images-00009-of-00010.parquet", [0])
    with pytest.raises(UserError, match=DEAD_IMAGE_ROWS):
        open_feature_folder(folder)


def test_previous_may_be_the_output_folder_itself(tmp_path):
    manifest = synth.write_catalog(tmp_path / "cat", 8, seed=SEED)
    out = tmp_path / "features"
    featurize(manifest, out)
    before = live_view(out)
    write_manifest(manifest, read_manifest(manifest)[1:])
    c = featurize(manifest, out, previous=str(out), overwrite=True)["counts"]  # what the demo does
    assert c["images"]["linked"] == 7 and c["storage"]["image_files_linked"] == 1
    after = live_view(out)
    assert after["image_ids"] == before["image_ids"][1:] and np.array_equal(after["features"], before["features"][1:])

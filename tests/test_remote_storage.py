"""Featurize against a URI-addressed filesystem, as on Dataflow with gs://: shards are written and published
through Beam's FileSystems, never through local paths."""
from __future__ import annotations

import os

from fashionbert.data import storage
from tests.featurize_helpers import featurize, live_view
from tests.object_store import PREFIX


def test_featurize_writes_and_publishes_through_filesystems(tmp_path):
    out = f"{PREFIX}{tmp_path}/features"
    first = featurize("synthetic:5", out, images_per_shard=2)
    assert storage.is_complete(out)
    names = sorted(os.listdir(tmp_path / "features"))
    assert names == ["_SUCCESS", "_run.json", "images-00000-of-00003.parquet", "images-00001-of-00003.parquet",
                     "images-00002-of-00003.parquet", "rejects-00000-of-00001.parquet", "texts-00000-of-00001.parquet"]
    second = featurize("synthetic:3", f"{PREFIX}{tmp_path}/features2", previous=out)
    assert second["counts"]["images"]["carried"] == 3 and first["counts"]["accepted_images"] == 5
    # An object store has no hard links: the previous image files serving live rows are copied, their dead row listed.
    assert second["counts"]["images"]["linked"] == 3 and second["counts"]["storage"]["image_files_copied"] == 2
    assert live_view(tmp_path / "features2")["image_ids"] == live_view(tmp_path / "features")["image_ids"][:3]
    replaced = featurize("synthetic:2", out, overwrite=True)
    assert replaced["counts"]["accepted_images"] == 2
    assert sorted(os.listdir(tmp_path / "features")) == ["_SUCCESS", "_run.json", "images-00000-of-00001.parquet",
                                                         "rejects-00000-of-00001.parquet", "texts-00000-of-00001.parquet"]

"""Featurize against a URI-addressed filesystem, as on Dataflow with gs://: shards are written and published
through Beam's FileSystems, never through local paths."""
from __future__ import annotations

import os

from apache_beam.io.filesystem import FileMetadata
from apache_beam.io.localfilesystem import LocalFileSystem

from pipelines import storage
from tests.featurize_helpers import featurize, live_view

PREFIX = "fbtest://"


class PrefixedLocalFileSystem(LocalFileSystem):
    """`fbtest:///abs/path` -> `/abs/path`: an object-store-like scheme backed by the local disk."""

    @classmethod
    def scheme(cls):
        return "fbtest"

    @staticmethod
    def _local(path):
        return path[len(PREFIX):] if path.startswith(PREFIX) else path

    def has_dirs(self):
        return False

    def _list(self, dir_or_prefix):
        # Object stores list by key prefix, not by folder.
        prefix = self._local(dir_or_prefix)
        folder = prefix if os.path.isdir(prefix) else os.path.dirname(prefix)
        for m in super()._list(folder):
            if m.path.startswith(prefix):
                yield FileMetadata(PREFIX + m.path, m.size_in_bytes, m.last_updated_in_seconds)

    def create(self, path, *args, **kwargs):
        local = self._local(path)
        os.makedirs(os.path.dirname(local), exist_ok=True)
        return super().create(local, *args, **kwargs)

    def open(self, path, *args, **kwargs):
        return super().open(self._local(path), *args, **kwargs)

    def rename(self, sources, destinations):
        for d in destinations:  # object stores have no folders to create first
            os.makedirs(os.path.dirname(self._local(d)), exist_ok=True)
        super().rename([self._local(s) for s in sources], [self._local(d) for d in destinations])

    def exists(self, path):
        return super().exists(self._local(path))

    def delete(self, paths):
        super().delete([self._local(p) for p in paths])


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

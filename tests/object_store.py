"""An object-store-like filesystem for tests: `fbtest:///abs/path` is `/abs/path` on the local disk, seen as an object
store sees it: no folders (a listing is by key prefix, a write needs no parent folder), no atomic folder rename.

Importing this module registers the scheme with Beam's FileSystems (Beam finds FileSystem subclasses by scheme), so
every stage reads and writes `fbtest://` URIs through `fashionbert.data.storage` exactly as it would gs:// ones.
"""
from __future__ import annotations

import os

from apache_beam.io.filesystem import FileMetadata
from apache_beam.io.localfilesystem import LocalFileSystem

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

    def metadata(self, path):
        m = super().metadata(self._local(path))
        return FileMetadata(path, m.size_in_bytes, m.last_updated_in_seconds)

    def exists(self, path):
        return super().exists(self._local(path))

    def delete(self, paths):
        super().delete([self._local(p) for p in paths])


def uri(path) -> str:
    """The fbtest:// URI of a local path."""
    return f"{PREFIX}{os.path.abspath(path)}"

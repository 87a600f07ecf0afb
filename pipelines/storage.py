"""Output folders through Beam's FileSystems, so workers of a remote runner can write to gs://, s3://, ...

Local folders are published with one atomic directory rename (`fashionbert.data.publish`). Object stores
have no atomic folder rename: there the files are moved one by one and `_SUCCESS` is written last, after
the old output's `_SUCCESS` was removed first, so a reader that waits for `_SUCCESS` (as every reader
here does) never reads a mixture.
"""
from __future__ import annotations

import os
import posixpath
import shutil

from apache_beam.io.filesystems import FileSystems

from fashionbert.data import publish

SUCCESS = publish.SUCCESS


def is_remote(path: str) -> bool:
    return "://" in path


def join(folder: str, name: str) -> str:
    return FileSystems.join(folder, name)


def glob(folder: str, pattern: str) -> list[str]:
    result = FileSystems.match([join(folder, pattern)])[0]
    return sorted(m.path for m in result.metadata_list)


def exists(path: str) -> bool:
    return FileSystems.exists(path)


def is_complete(folder: str) -> bool:
    return exists(join(folder, SUCCESS))


def open_read(path: str):
    return FileSystems.open(path, compression_type="uncompressed")


def create(path: str):
    return FileSystems.create(path, mime_type="application/octet-stream", compression_type="uncompressed")


def write_text(path: str, text: str) -> None:
    with create(path) as fh:
        fh.write(text.encode())


def rename(src: str, dst: str) -> None:
    FileSystems.rename([src], [dst])


def sizes(folder: str, pattern: str) -> dict[str, int]:
    """Bytes of each file matching `pattern`, by path."""
    return {m.path: m.size_in_bytes for m in FileSystems.match([join(folder, pattern)])[0].metadata_list}


def delete(path: str) -> None:
    FileSystems.delete([path])


def link_or_copy(src: str, dst: str) -> bool:
    """Make `dst` hold `src`'s bytes: a hard link where the filesystem allows one (both local, same device), else a
    byte copy (across devices, on object stores). True when linked: the file then costs no new disk space, and
    deleting `src`'s folder later leaves `dst` intact."""
    if not is_remote(src) and not is_remote(dst):
        try:
            os.link(src, dst)
            return True
        except OSError:  # another device, a filesystem without hard links, a link count at its limit
            pass
    with open_read(src) as fin, create(dst) as fout:
        shutil.copyfileobj(fin, fout, 1 << 22)
    return False


def staging_path(out: str, run_id: str) -> str:
    if is_remote(out):
        return f"{out.rstrip('/')}.staging-{run_id}"
    return publish.staging_path(out, run_id)


def make_folder(path: str) -> None:
    if not is_remote(path):
        FileSystems.mkdirs(path)


def check_target(out: str, overwrite: bool) -> None:
    if not is_remote(out):
        publish.check_target(out, overwrite)
    elif glob(out, "*") and not overwrite:
        from fashionbert.errors import UserError

        raise UserError(f"--out {out} already holds files; pass --overwrite to replace them, or choose a new folder")


def clean_stale_staging(out: str) -> None:
    if not is_remote(out):
        publish.clean_stale_staging(out)


def publish_folder(staging: str, out: str) -> None:
    if not is_remote(out):
        publish.publish(staging, out)
        return
    if exists(join(out, SUCCESS)):
        FileSystems.delete([join(out, SUCCESS)])
    old = glob(out, "*")
    if old:
        FileSystems.delete(old)
    files = glob(staging, "*")
    FileSystems.rename(files, [join(out, posixpath.basename(f)) for f in files])
    write_text(join(out, SUCCESS), "")  # object stores keep no empty folder: nothing left to remove

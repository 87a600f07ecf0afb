"""Files and folders by local path or URI: the one storage layer every stage reads and writes through.

Local paths are plain os calls, and a local output folder is published with one atomic directory rename
(`fashionbert.data.publish`). A URI (gs://, s3://, ...) goes through Beam's FileSystems when apache_beam is
importable (it knows gs:// and s3:// with Beam's extras installed, and any scheme a FileSystem subclass registers),
else, or when Beam does not know the scheme, through pyarrow.fs: the GPU box that trains and scores has pyarrow but
no Beam, and nothing here imports Beam before a URI needs it.

Object stores have no folders and no atomic folder rename: there the files of a staged output are moved one by one
and `_SUCCESS` is written last, after the old output's `_SUCCESS` was removed first, so a reader that waits for
`_SUCCESS` (as every reader here does) never reads a mixture. One object write is atomic there, so a single output
file is written in place; a local one goes to a temporary name and is renamed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import glob as _glob
import os
import posixpath
import shutil
from typing import BinaryIO, Callable

from fashionbert.data import publish
from fashionbert.errors import UserError

SUCCESS = publish.SUCCESS

# What makes a scheme readable here; anything else is refused with the generic advice.
_INSTALL = {"gs": "pip install 'apache-beam[gcp]'", "s3": "pip install 'apache-beam[aws]'",
            "azfs": "pip install 'apache-beam[azure]'", "hdfs": "pip install 'apache-beam[hadoop]'"}


@dataclasses.dataclass(frozen=True)
class FileInfo:
    path: str
    size: int
    mtime: float  # seconds since the epoch; 0 where the filesystem does not say


# ============================================================================================ backends
class _Local:
    def match(self, pattern: str) -> list[FileInfo]:
        out = []
        for p in _glob.glob(pattern):
            if os.path.isfile(p):  # object stores list objects, not folders: so do local listings
                st = os.stat(p)
                out.append(FileInfo(p, st.st_size, st.st_mtime))
        return out

    def walk(self, folder: str) -> list[FileInfo]:
        out = []
        for root, _, names in os.walk(folder):
            for name in names:
                st = os.stat(os.path.join(root, name))
                out.append(FileInfo(os.path.join(root, name), st.st_size, st.st_mtime))
        return out

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def open(self, path: str) -> BinaryIO:
        return open(path, "rb")

    def create(self, path: str) -> BinaryIO:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        return open(path, "wb")

    def rename(self, sources: list[str], destinations: list[str]) -> None:
        for s, d in zip(sources, destinations):
            os.replace(s, d)

    def delete(self, paths: list[str]) -> None:
        for p in paths:
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)


class _Beam:
    def __init__(self, filesystems):
        self.fs = filesystems

    def match(self, pattern: str) -> list[FileInfo]:
        found = self.fs.match([pattern])[0].metadata_list
        return [FileInfo(m.path, m.size_in_bytes, m.last_updated_in_seconds or 0.0) for m in found]

    def walk(self, folder: str) -> list[FileInfo]:
        return self.match(f"{folder.rstrip('/')}/**")

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def open(self, path: str) -> BinaryIO:
        return self.fs.open(path, compression_type="uncompressed")

    def create(self, path: str) -> BinaryIO:
        return self.fs.create(path, mime_type="application/octet-stream", compression_type="uncompressed")

    def rename(self, sources: list[str], destinations: list[str]) -> None:
        self.fs.rename(sources, destinations)

    def delete(self, paths: list[str]) -> None:
        self.fs.delete(paths)


class _Arrow:
    """A pyarrow.fs filesystem for one scheme://authority; URIs map to its paths by the root it gave for it."""

    def __init__(self, root_uri: str):
        from pyarrow import fs

        self._fs, root = fs.FileSystem.from_uri(root_uri)
        self._types = fs.FileType
        self._selector = fs.FileSelector
        self.root_uri = root_uri
        self.root = root.rstrip("/")

    def _path(self, uri: str) -> str:
        rest = uri[len(self.root_uri):]
        return f"{self.root}/{rest}" if self.root else rest

    def _uri(self, path: str) -> str:
        return self.root_uri + (path[len(self.root) + 1:] if self.root else path)

    def _files(self, folder: str, recursive: bool) -> list[FileInfo]:
        infos = self._fs.get_file_info(self._selector(self._path(folder.rstrip("/")), allow_not_found=True,
                                                      recursive=recursive))
        return [FileInfo(self._uri(i.path), i.size, i.mtime.timestamp() if i.mtime else 0.0) for i in infos
                if i.type == self._types.File]

    def match(self, pattern: str) -> list[FileInfo]:
        folder, name = posixpath.split(pattern)
        return [f for f in self._files(folder, False) if fnmatch.fnmatchcase(posixpath.basename(f.path), name)]

    def walk(self, folder: str) -> list[FileInfo]:
        return self._files(folder, True)

    def exists(self, path: str) -> bool:
        return self._fs.get_file_info(self._path(path)).type != self._types.NotFound

    def open(self, path: str) -> BinaryIO:
        return self._fs.open_input_file(self._path(path))

    def _with_parent(self, action: Callable[[], object], path: str):
        """Object stores need no parent folder; a filesystem with folders (local, in-memory) gets it on demand."""
        try:
            return action()
        except FileNotFoundError:
            self._fs.create_dir(posixpath.dirname(path), recursive=True)
            return action()

    def create(self, path: str) -> BinaryIO:
        p = self._path(path)
        return self._with_parent(lambda: self._fs.open_output_stream(p), p)

    def rename(self, sources: list[str], destinations: list[str]) -> None:
        for s, d in zip(sources, destinations):
            src, dst = self._path(s), self._path(d)
            self._with_parent(lambda: self._fs.move(src, dst), dst)

    def delete(self, paths: list[str]) -> None:
        for p in paths:
            self._fs.delete_file(self._path(p))


_LOCAL = _Local()
_remote: dict[str, object] = {}  # scheme://authority/ -> backend


def is_remote(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def scheme(path: str) -> str:
    return str(path).split("://", 1)[0]


def _root(uri: str) -> str:
    rest = uri.split("://", 1)[1]
    return f"{scheme(uri)}://{rest.split('/', 1)[0]}/"


def _beam():
    try:
        from apache_beam.io.filesystems import FileSystems
    except ImportError:  # the GPU box: torch, transformers and pyarrow only
        return None
    return FileSystems


def _backend(path: str, option: str | None = None):
    if not is_remote(path):
        return _LOCAL
    root = _root(path)
    backend = _remote.get(root)
    if backend is None:
        backend = _remote[root] = _find_backend(path, root, option)
    return backend


def _find_backend(path: str, root: str, option: str | None):
    filesystems = _beam()
    if filesystems is not None:
        try:
            filesystems.get_filesystem(path)
            return _Beam(filesystems)
        except Exception:  # noqa: BLE001 - Beam does not know the scheme, or lacks its extra (BeamIOError); pyarrow may
            pass
    try:
        return _Arrow(root)
    except Exception as exc:  # pyarrow's ArrowInvalid (unknown scheme), or its filesystem failed to start
        fix = _INSTALL.get(scheme(path), "use a local path, or a URI whose scheme Beam's FileSystems or pyarrow.fs "
                                         "knows (gs://, s3://)")
        if scheme(path) in _INSTALL and filesystems is None:
            fix = f"{fix}, or a pyarrow built with {scheme(path)} support"
        name = f"{option} {path}" if option else path
        raise UserError(f"{name}: no filesystem here reads {scheme(path)}:// URIs ({str(exc).splitlines()[0]}); "
                        f"{fix}") from None


# ============================================================================================ paths
def resolve(path: str | os.PathLike, option: str) -> str:
    """A path option made ready to use: a local path absolute, a URI as given once its scheme is known here (else a
    UserError naming the option, the scheme and what to install), so a typo fails before any work."""
    path = str(path)
    if not is_remote(path):
        return os.path.abspath(os.path.expanduser(path))
    _backend(path, option)
    return path


def join(folder: str, name: str) -> str:
    return os.path.join(folder, name) if not is_remote(folder) else f"{folder.rstrip('/')}/{name}"


def basename(path: str) -> str:
    return posixpath.basename(str(path).rstrip("/"))


def parent(path: str) -> str:
    return os.path.dirname(path) if not is_remote(path) else str(path).rstrip("/").rsplit("/", 1)[0]


def match(folder: str, pattern: str) -> list[FileInfo]:
    """The files directly in `folder` whose names match `pattern` (`*` stays within a name), sorted by path."""
    return sorted(_backend(folder).match(join(folder, pattern)), key=lambda f: f.path)


def walk(folder: str) -> list[FileInfo]:
    """Every file under `folder`, at any depth, sorted by path."""
    return sorted(_backend(folder).walk(folder), key=lambda f: f.path)


def glob(folder: str, pattern: str) -> list[str]:
    return [f.path for f in match(folder, pattern)]


def sizes(folder: str, pattern: str) -> dict[str, int]:
    """Bytes of each file matching `pattern`, by path."""
    return {f.path: f.size for f in match(folder, pattern)}


def exists(path: str) -> bool:
    return _backend(path).exists(path)


def is_folder(path: str) -> bool:
    """A local folder, or a URI prefix some object lies under (object stores have no empty folders)."""
    return os.path.isdir(path) if not is_remote(path) else bool(glob(path, "*"))


def is_complete(folder: str) -> bool:
    return exists(join(folder, SUCCESS))


# ============================================================================================ files
def open_read(path: str) -> BinaryIO:
    """A seekable binary reader: pyarrow reads Parquet footers and row groups from it at random."""
    return _backend(path).open(path)


def create(path: str) -> BinaryIO:
    return _backend(path).create(path)


def read_bytes(path: str) -> bytes:
    with open_read(path) as fh:
        return fh.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def arrow_source(path: str):
    """What pyarrow should open: a local path as it is (native reads), a URI as an open file (kept open by whoever
    holds the pyarrow object: a ParquetFile reads row groups from it later)."""
    return path if not is_remote(path) else open_read(path)


@contextlib.contextmanager
def arrow_input(path: str):
    """`arrow_source`, closed on leaving the block."""
    source = arrow_source(path)
    try:
        yield source
    finally:
        if source is not path:
            source.close()


def write_file(path: str, write: Callable[[BinaryIO], None]) -> None:
    """`write(fh)` the whole file so that readers see the old file or the new one: locally into a temporary name
    then renamed; on an object store straight to the object (an object appears whole when its write closes)."""
    if is_remote(path):
        with create(path) as fh:
            write(fh)
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes(path: str, data: bytes) -> None:
    write_file(path, lambda fh: fh.write(data))


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def check_out_file(path: str, option: str) -> str:
    """An output file's path, checked before any work: a local one's folder must exist (an object store has none)."""
    path = resolve(path, option)
    if not is_remote(path) and not os.path.isdir(os.path.dirname(path)):
        raise UserError(f"{option} {path}: folder {os.path.dirname(path)} does not exist; create it or choose another "
                        f"path")
    return path


def rename(src: str, dst: str) -> None:
    _backend(src).rename([src], [dst])


def delete(path: str) -> None:
    _backend(path).delete([path])


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


# ============================================================================================ output folders
def staging_path(out: str, run_id: str) -> str:
    if is_remote(out):
        return f"{out.rstrip('/')}.staging-{run_id}"
    return publish.staging_path(out, run_id)


def make_folder(path: str) -> None:
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def check_target(out: str, overwrite: bool) -> None:
    if not is_remote(out):
        publish.check_target(out, overwrite)
    elif glob(out, "*") and not overwrite:
        raise UserError(f"--out {out} already holds files; pass --overwrite to replace them, or choose a new folder")


def clean_stale_staging(out: str) -> None:
    if not is_remote(out):
        publish.clean_stale_staging(out)


def publish_folder(staging: str, out: str) -> None:
    if not is_remote(out):
        publish.publish(staging, out)
        return
    if exists(join(out, SUCCESS)):
        delete(join(out, SUCCESS))
    old = [f.path for f in walk(out)]
    if old:
        _backend(out).delete(old)
    # At any depth (explain writes pairs/*.png): keys keep their path below the staging prefix.
    files = [f.path for f in walk(staging)]
    prefix = staging.rstrip("/") + "/"
    _backend(out).rename(files, [join(out, f[len(prefix):]) for f in files])
    with create(join(out, SUCCESS)):  # object stores keep no empty folder: nothing left to remove
        pass

"""Model folders by local path or URI: `--model gs://bucket/run/model` loads like a local folder.

torch and safetensors read local files, so a folder at a URI is copied into a local cache first, with the files of
its training run that `fashionbert.model.loading` reads beside it (the run's summary.json and each checkpoint's
training_state.json: the training step and the held-out split). The cache is keyed by the URI and every copied
file's size and modification time, so a second load of an unchanged folder copies nothing, and a folder whose
weights changed gets a fresh copy. The copy holds the same bytes, so `model_version` is the one the folder has
locally; `LoadedModel.uri` keeps the URI for messages and run summaries.

Cache root: $FASHIONBERT_CACHE, else the platform's temp folder; each copy is written beside its final name and
renamed into place, so a killed copy is never used.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from fashionbert.data import storage
from fashionbert.errors import UserError
from fashionbert.model.loading import LoadedModel, load_model as load_local
from fashionbert.runtime import Runtime

CACHE_ENV = "FASHIONBERT_CACHE"


def load_model(path: str | os.PathLike, runtime: Runtime) -> LoadedModel:
    """`fashionbert.model.loading.load_model` for a local folder or a URI (copied to the local cache first)."""
    path = str(path)
    if not storage.is_remote(path):
        return load_local(path, runtime)
    storage.resolve(path, "--model")
    return load_local(local_copy(path.rstrip("/")), runtime, uri=path.rstrip("/"))


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or os.path.join(tempfile.gettempdir(), "fashionbert-cache")) / "models"


def local_copy(uri: str) -> Path:
    """The local copy of the model folder at `uri`, made now unless the cache holds one of the same files."""
    files = storage.match(uri, "*")
    if not files:
        raise UserError(f"--model {uri}: no such folder (no files under it); point it at OUT/model of "
                        f"`fashionbert train`")
    run = storage.parent(uri)
    name = storage.basename(uri)
    # The folder's files by their place in the copy: NAME/file, and the run's files the loader looks for.
    wanted = {f"{name}/{storage.basename(f.path)}": f for f in files}
    wanted.update({"summary.json": f for f in storage.match(run, "summary.json")})
    checkpoints = storage.join(run, "checkpoints")
    wanted.update({f.path[len(run) + 1:]: f for f in storage.walk(checkpoints)
                   if storage.basename(f.path) == "training_state.json"})
    known = all(f.mtime for f in wanted.values())  # without modification times a copy cannot be shown current
    key = hashlib.sha256(json.dumps([uri] + sorted((rel, f.size, f.mtime) for rel, f in wanted.items()))
                         .encode()).hexdigest()[:24]
    final = cache_root() / key
    if known and (final / name).is_dir():
        return final / name
    staging = Path(tempfile.mkdtemp(prefix=f"{key}.tmp-", dir=_make(cache_root())))
    try:
        for rel, f in wanted.items():
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            with storage.open_read(f.path) as src, open(staging / rel, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
        if not known:
            final = Path(f"{staging}-copy")  # never reused: a later load copies again
        try:
            os.rename(staging, final)
        except OSError:  # another process finished the same copy first
            if not (final / name).is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final / name


def _make(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder

"""A trained model folder, loaded for scoring: weights, config, itc head, score fusion, and its version.

The folder is what `fashionbert train` writes (OUT/model, or a checkpoint OUT/checkpoints/step-N). `model_version`
names the exact scores a folder gives (weights and fusion), and is written into every retrieval table row.

A folder at a URI is first copied to a local cache (`fashionbert.data.model_store`); `uri` then names it in
messages and run summaries, `folder` is the local copy.

Imports torch, transformers and safetensors only (no faiss, no Beam).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

from fashionbert.errors import UserError
from fashionbert.model import score_fusion
from fashionbert.model.config import FashionBertConfig
from fashionbert.model.modeling import WEIGHTS_NAME, FashionBertModel
from fashionbert.runtime import Runtime


@dataclasses.dataclass
class LoadedModel:
    model: FashionBertModel
    folder: Path
    version: str  # <sha256 of the weights, 12 hex>[-s<sha256 of score_fusion.json, 6 hex>][-step<N>]
    step: int | None
    has_itc_head: bool
    fusion: score_fusion.ScoreFusion  # the ranking score (TIA alone without a score_fusion.json)
    uri: str | None = None  # where the folder was read from when that was a URI (gs://...); `folder` is its local copy

    @property
    def where(self) -> str:
        """The folder as the user named it: the URI, or the local path."""
        return self.uri or str(self.folder)

    @property
    def location(self) -> str:
        """The folder for run summaries: the URI, or the absolute local path."""
        return self.uri or str(self.folder.resolve())

    @property
    def config(self) -> FashionBertConfig:
        return self.model.config


def load_model(folder: str | Path, runtime: Runtime, uri: str | None = None) -> LoadedModel:
    """A model folder written by training (OUT/model or OUT/checkpoints/step-N), in eval mode on the runtime's
    device (`FashionBertModel.from_checkpoint`), with its score fusion. Reads only JSON and safetensors. `uri`: where
    the local `folder` was copied from, named in messages instead of the copy."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"--model {folder}: no such folder; point it at OUT/model of `fashionbert train`")
    try:
        model = FashionBertModel.from_checkpoint(folder, runtime.device)
    except UserError as exc:
        message = str(exc).replace(str(folder), uri) if uri else str(exc)
        raise UserError(f"--model {message}") from None  # the messages start with the path; name the option too
    has_itc = getattr(model, "itc_head", None) is not None
    fusion = score_fusion.load(folder)
    if fusion.uses_itc and not has_itc:
        raise UserError(f"{uri or folder}/{score_fusion.FUSION_NAME} weighs the itc cosine, but the model has no itc "
                        f"head; delete the file (rank by TIA alone) or refit it with `fashionbert fuse`")
    step = training_step(folder)
    return LoadedModel(model, folder, model_version(folder, step), step, has_itc, fusion, uri)


def model_version(folder: Path, step: int | None) -> str:
    """<sha256 of the weights, 12 hex>[-s<sha256 of score_fusion.json, 6 hex>][-step<N>]. The fusion is part of
    it: the scores change with the fusion while the weights stay the same."""
    fusion_sha = score_fusion.file_digest(folder)
    return (weights_sha256(folder / WEIGHTS_NAME)[:12] + (f"-s{fusion_sha[:6]}" if fusion_sha else "")
            + (f"-step{step}" if step is not None else ""))


def weights_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_STEP_DIR = re.compile(r"^step-(\d+)$")


def _training_states(folder: Path) -> list[Path]:
    """training_state.json files that describe the run a model folder came from, most specific first: the
    folder itself (a checkpoint), else the newest checkpoint of the run (OUT/model's sibling)."""
    own = folder / "training_state.json"
    if own.is_file():
        return [own]
    root = folder.parent / "checkpoints"
    found = sorted(root.glob("step-*/training_state.json")) if root.is_dir() else []
    return list(reversed(found))


def training_step(folder: Path) -> int | None:
    for path in _training_states(folder)[:1]:
        try:
            return int(json.loads(path.read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    summary = folder.parent / "summary.json"
    if summary.is_file():
        try:
            return int(json.loads(summary.read_text())["final_step"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    m = _STEP_DIR.match(folder.name)
    return int(m.group(1)) if m else None


def training_options(folder: Path) -> tuple[dict, Path | None]:
    """The options of the training run that wrote a model folder (for its train/validation split)."""
    for path in _training_states(folder):
        try:
            return dict(json.loads(path.read_text()).get("options") or {}), path
        except (OSError, ValueError, AttributeError):
            continue
    return {}, None

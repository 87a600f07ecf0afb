"""Checkpoints: one folder per step, written atomically, loaded without unpickling untrusted data.

OUT/checkpoints/step-0000500/
    model.safetensors, config.json      the model (FashionBertModel.save)
    vocab.txt, tokenizer.json, ...      the backbone tokenizer, so the folder is self-contained
    score_fusion.json                   the ranking score fitted at this step's validation (fusion.py); only
                                        on steps that validated
    training_state.json                 step, data positions, options, last metrics (human-readable)
    training_state.pt                   optimizer, scheduler, RNG states: tensors and plain containers only,
                                        read back with torch.load(weights_only=True)

A folder is written under a dot-named staging name and renamed into place when complete, so a run killed
mid-write leaves only a staging folder, which `latest_checkpoint` ignores and the next save removes.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fashionbert.errors import UserError

CHECKPOINTS = "checkpoints"
MODEL_DIR = "model"
STATE_JSON = "training_state.json"
STATE_PT = "training_state.pt"
_STEP_RE = re.compile(r"^step-(\d{7,})$")
_MODEL_FILES = ("model.safetensors", "config.json")
_TRAINING_FILES = (STATE_JSON, STATE_PT)


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def _fsync_tree(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _publish(staging: Path, final: Path) -> None:
    """Rename a complete staging folder to `final`, replacing an older folder of that name."""
    _fsync_tree(staging)
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.rename(final, old)
    os.rename(staging, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    """Global RNG states as tensors and plain Python values (all loadable with weights_only=True)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    npd = state["numpy"]
    np.random.set_state(("MT19937", npd["keys"].numpy().astype(np.uint32), npd["pos"], npd["has_gauss"], npd["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out: Path, step: int, model, tokenizer, optimizer, scheduler, info: dict[str, Any],
                    keep: int = 3, fusion=None, extra: dict[str, Any] | None = None) -> Path:
    """Write OUT/checkpoints/step-N atomically; keep the newest `keep` checkpoints (0 = all). `fusion` (a
    `fusion.ScoreFusion` fitted on this step's validation) goes into the folder as its ranking score; `extra`
    (tensors only) joins the training state (e.g. the itc queue)."""
    root = Path(out) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    staging = root / f".staging-{final.name}-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    model.save(staging)
    save_tokenizer(tokenizer, staging)
    if fusion is not None:
        fusion.save(staging)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state(),
                **(extra or {})}, staging / STATE_PT)
    (staging / STATE_JSON).write_text(json.dumps({"step": step, **info}, indent=2, sort_keys=True, default=str) + "\n")
    _publish(staging, final)
    for stale in root.glob(".staging-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if keep > 0:
        for old in complete_checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def save_tokenizer(tokenizer, folder: Path) -> None:
    """The tokenizer files, plus a plain WordPiece vocab.txt (transformers 5 writes only tokenizer.json), so
    that any BERT tool, and `fashionbert.model.backbone.load_tokenizer`, can read the folder."""
    tokenizer.save_pretrained(str(folder))
    vocab_file = Path(folder) / "vocab.txt"
    if not vocab_file.exists():
        vocab = tokenizer.get_vocab()
        by_id = sorted(vocab.items(), key=lambda kv: kv[1])
        if [i for _, i in by_id] == list(range(len(by_id))):
            vocab_file.write_text("".join(tok + "\n" for tok, _ in by_id), encoding="utf-8")


def complete_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoint folders under OUT/checkpoints, oldest first."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and all((p / f).is_file() for f in _MODEL_FILES + _TRAINING_FILES):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(out: Path) -> Path | None:
    found = complete_checkpoints(out)
    return found[-1] if found else None


def load_training_state(folder: Path, map_location="cpu") -> tuple[dict[str, Any], dict[str, Any]]:
    """-> (training_state.json dict, tensors dict with optimizer/scheduler/rng). No arbitrary unpickling."""
    folder = Path(folder)
    try:
        info = json.loads((folder / STATE_JSON).read_text())
        tensors = torch.load(str(folder / STATE_PT), map_location=map_location, weights_only=True)
    except (OSError, json.JSONDecodeError, RuntimeError) as exc:
        raise UserError(f"{folder}: cannot read the training state ({exc}); remove this checkpoint folder to resume "
                        f"from an earlier one") from exc
    return info, tensors


def export_model(checkpoint: Path, dest: Path) -> Path:
    """The scoring folder: weights, config.json and tokenizer files of a checkpoint (no training state),
    copied (not linked) and published atomically."""
    checkpoint, dest = Path(checkpoint), Path(dest)
    staging = dest.with_name(f".staging-{dest.name}-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    for f in checkpoint.iterdir():
        if f.is_file() and f.name not in _TRAINING_FILES:
            shutil.copy2(f, staging / f.name)
    _publish(staging, dest)
    return dest

"""Recall vectors: L2-normalised text-only and image-only embeddings of a whole catalog, in batches.

The model's itc head (fashionbert/model/contrastive.py) defines the vectors; this module only batches the work:
texts sorted by length under a token budget, images in feature batches.

Imports torch and numpy only (no faiss, no Beam).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fashionbert.data.batching import length_batches, pad_texts
from fashionbert.logs import progress
from fashionbert.model.contrastive import ContrastiveHead, masked_mean


class DualEncoder:
    """L2-normalised recall vectors for texts and images, in batches (inference only).

    With `model.itc_head`: the head's projections. Without: the mean-pooled hidden states of the two passes,
    unprojected (the identity projection), so recall works before training has the itc task, at whatever
    quality the backbone gives; `description` says which was used.

    `progress`: None = silent (training's validation); True = a bar on a terminal, else log lines; False = log lines.
    """

    def __init__(self, model, device: torch.device, autocast: Callable[[], contextlib.AbstractContextManager]
                 = contextlib.nullcontext, max_text_len: int | None = None, progress: bool | None = None):
        self.model = model
        self.head: ContrastiveHead | None = getattr(model, "itc_head", None)
        self.device = device
        self.autocast = autocast
        self.max_text_len = max_text_len or int(model.config.max_text_len)
        self.progress = progress

    @property
    def trained(self) -> bool:
        return self.head is not None

    @property
    def description(self) -> str:
        if self.head is not None:
            return f"itc_head ({self.head.pooling} pooling, {self.head.dim}-d projection, trained contrastively)"
        return ("backbone fallback: mean-pooled text-only / image-only hidden states, identity projection "
                "(the model has no itc_head; recall is untrained)")

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[np.ndarray], token_budget: int = 16384, max_rows: int = 512) -> np.ndarray:
        """(n, d) float32 in the order given. Texts are sorted by length and batched under a token budget, so
        a batch pads to within a few tokens of each of its rows."""
        cfg = self.model.config
        lengths = np.fromiter((min(len(t), self.max_text_len) for t in texts), dtype=np.int64, count=len(texts))
        order = np.argsort(lengths, kind="stable")
        out: np.ndarray | None = None
        shown = self._progress(len(texts), "embed texts", "texts")
        for batch in length_batches(order, lengths, token_budget, max_rows, extra_tokens=0):
            ids, mask = pad_texts([texts[i] for i in batch], self.max_text_len, cfg.pad_token_id, cfg.sep_token_id)
            ids, mask = torch.from_numpy(ids).to(self.device), torch.from_numpy(mask).to(self.device)
            with self.autocast():
                if self.head is not None:
                    vec = self.head.embed_text(self.model, ids, mask)
                else:
                    vec = F.normalize(masked_mean(self.model.encode_text(ids, mask), mask), dim=-1)
            vec = vec.float().cpu().numpy()
            if out is None:
                out = np.empty((len(texts), vec.shape[1]), dtype=np.float32)
            out[batch] = vec
            shown.update(len(batch))
        shown.close()
        return out if out is not None else np.zeros((0, self.dim), dtype=np.float32)

    @torch.inference_mode()
    def embed_images(self, feature_batches: Iterable[np.ndarray], total: int | None = None) -> np.ndarray:
        """(n, d) float32 for feature batches ((b, P, D) float16 each) in the order given (`total` images, for the
        progress report)."""
        parts = []
        shown = self._progress(total, "embed images", "images")
        for feats in feature_batches:
            if len(feats) == 0:
                continue
            x = torch.from_numpy(np.ascontiguousarray(feats)).to(self.device).float()
            with self.autocast():
                if self.head is not None:
                    vec = self.head.embed_image(self.model, x)
                else:
                    vec = F.normalize(masked_mean(self.model.encode_image(x), None), dim=-1)
            parts.append(vec.float().cpu().numpy())
            shown.update(len(feats))
        shown.close()
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), dtype=np.float32)

    def _progress(self, total: int | None, desc: str, unit: str):
        return progress(total, desc, unit, bar=bool(self.progress), enabled=self.progress is not None)

    @property
    def dim(self) -> int:
        return self.head.dim if self.head is not None else int(self.model.config.hidden_size)

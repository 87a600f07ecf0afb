"""Recall vectors: L2-normalised text-only and image-only embeddings of a whole catalog, in batches.

The model's itc head (fashionbert/model/contrastive.py) defines the vectors; this module only batches the work:
texts sorted by length under a token budget, images in feature batches. `embed_items` takes the vectors a score
cache holds (fashionbert/rank/score_cache.py) from it and embeds only the others.

Imports torch and numpy only (no faiss, no Beam).
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fashionbert.data.batching import length_batches, pad_texts
from fashionbert.logs import progress
from fashionbert.model.contrastive import ContrastiveHead, masked_mean

if TYPE_CHECKING:
    from fashionbert.data.feature_catalog import ImageSource
    from fashionbert.rank.score_cache import ItemKeys, ScoreCache

IMAGE_BATCH = 256


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


def embed_items(dual: DualEncoder, texts: Sequence[np.ndarray], images: ImageSource, text_index: np.ndarray,
                image_index: np.ndarray, token_budget: int, cache: ScoreCache | None = None,
                keys: ItemKeys | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The vectors of texts `text_index` and images `image_index`, in that order. With a cache and the call's
    content hashes (`keys`), the vectors it holds are taken from it and only the others are computed (a night
    with 1% changes embeds 1% of the catalog)."""
    text_index, image_index = np.asarray(text_index, dtype=np.int64), np.asarray(image_index, dtype=np.int64)

    def embed_texts(rows: np.ndarray) -> np.ndarray:
        return dual.embed_texts([texts[t] for t in text_index[rows]], token_budget=token_budget)

    def embed_images(rows: np.ndarray) -> np.ndarray:
        chosen = image_index[rows]
        return dual.embed_images((images.read(chosen[s:s + IMAGE_BATCH]) for s in range(0, len(chosen), IMAGE_BATCH)),
                                 total=len(chosen))

    if cache is None or keys is None:
        return embed_texts(np.arange(len(text_index))), embed_images(np.arange(len(image_index)))
    return (cache.vectors("text", keys.text[text_index], dual.dim, embed_texts),
            cache.vectors("image", keys.image[image_index], dual.dim, embed_images))

"""Batched scoring of (text, image) pairs: the cross-encoder's TIA margin, and the model's ranking score.

The ranking score is P(aligned) = sigmoid(fusion of the TIA margin and the itc cosine) per the model folder's
score_fusion.json (fashionbert/model/score_fusion.py; the TIA margin alone for a folder without one). `PairScorer` gives it
for arbitrary pairs; `CrossEncoderScorer` is the expensive half, the joint pass.

How the work is laid out, and why:
- Reuse. A text's embeddings (word + position + segment 0, LayerNorm) and an image's patch embeddings
  (Linear(CNN dim -> hidden) + patch positions + segment 1, LayerNorm) each depend on that item alone, so they
  are computed once and gathered into every pair that uses the item; only the encoder, which mixes the two,
  runs per pair. A late-fusion model (`config.fusion_layer` k) encodes each side alone in its first k layers,
  so those run once per text and once per image too, and a pair costs only the layers above. The patch projection is the part worth saving (a 64 x 1280 x hidden matmul, plus the fp16 ->
  fp32 copy of 160 KB of features, per image instead of per pair). Patch embeddings are kept for a block of
  images at a time; text embeddings are recomputed per batch (deduplicated within it): they are a table
  lookup and a LayerNorm, far cheaper than the memory a catalog-wide cache would take.
- Padding. Pairs are grouped by image into blocks, then sorted by text length within a block and cut into
  batches under a token budget, so every batch pads to within a few tokens of each row; patches never pad.
- Precision and device: cuda when present, else cpu; bf16 where the device runs it natively
  (`fashionbert.runtime`, the same rule as training), as a bf16 copy of the model rather than
  autocast (see `CrossEncoderScorer.__init__`).

Imports torch, numpy and pyarrow only (no faiss, no Beam): this is the GPU stage.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
from typing import Sequence

import numpy as np
import torch

from fashionbert.data.batching import length_batches, pad_texts
from fashionbert.data.feature_catalog import ImageSource
from fashionbert.errors import UserError
from fashionbert.logs import progress
from fashionbert.model import score_fusion
from fashionbert.model.config import FashionBertConfig
from fashionbert.model.modeling import FashionBertModel
from fashionbert.rank.embeddings import DualEncoder, embed_items
from fashionbert.rank.score_cache import ItemKeys, ScoreCache
from fashionbert.runtime import Runtime

DEFAULT_TOKEN_BUDGET = 16384
DEFAULT_BLOCK_IMAGES = 512


@dataclasses.dataclass(frozen=True)
class BatchingOptions:
    """The fields of `add_batching_arguments`' options, for the configs of the stages that score pairs."""

    batch_tokens: int = DEFAULT_TOKEN_BUDGET
    block_images: int = DEFAULT_BLOCK_IMAGES
    progress: bool = True


def add_batching_arguments(group: argparse._ArgumentGroup) -> None:
    """The cross-encoder's batching and progress options (into a stage's runtime group)."""
    d = BatchingOptions()
    group.add_argument("--batch-tokens", type=int, default=d.batch_tokens,
                       help="cross-encoder batch size in tokens (pairs x (text + patch tokens)); pairs are sorted by "
                            "text length so batches barely pad (default %(default)s)")
    group.add_argument("--block-images", type=int, default=d.block_images,
                       help="images whose patch embeddings are held at once; memory ~ block x patches x hidden x 4 "
                            "bytes (2 in bf16) (default %(default)s)")
    group.add_argument("--progress", action=argparse.BooleanOptionalAction, default=d.progress,
                       help="a progress bar on a terminal; with --no-progress, or when stderr is not a terminal, a log "
                            "line every 30 s instead (default --progress)")


def probability(margin: np.ndarray) -> np.ndarray:
    """P(aligned) from the TIA logit margin (a 2-way softmax is the sigmoid of the margin), float32."""
    return (1.0 / (1.0 + np.exp(-np.asarray(margin, dtype=np.float64)))).astype(np.float32)


# ============================================================================================ scorer
class CrossEncoderScorer:
    """Scores (text index, image index) pairs. Returns the TIA logit margin l1 - l0 per pair: it ranks exactly
    like P(aligned) = sigmoid(margin) but does not saturate into ties at P ~ 1 (use `probability` for P).

    With a `cache` (fashionbert/rank/score_cache.py), a call that passes its items' content hashes (`keys`) takes the
    pairs the cache holds from it, as `embed_items` does the recall embeddings; only the others are computed."""

    def __init__(self, model: FashionBertModel, runtime: Runtime, token_budget: int = DEFAULT_TOKEN_BUDGET,
                 block_images: int = DEFAULT_BLOCK_IMAGES, max_rows: int = 512, cache: ScoreCache | None = None,
                 progress: bool | None = None):
        """`progress`: None = silent (training's validation); True = a bar on a terminal, else log lines; False = log
        lines only."""
        if token_budget < 1 or block_images < 1:
            raise UserError("--batch-tokens and --block-images must be >= 1")
        self.runtime = runtime
        if runtime.precision == "bf16":
            # bf16 weights end to end rather than autocast: autocast re-casts each fp32 LayerNorm output once per
            # Linear that reads it (Q, K and V) and keeps the residual stream in fp32; on the calibration CPU those
            # copies were ~30% of scoring time, and a bf16 copy of the model scored 1.2x faster with P(aligned)
            # within ~1e-3 of fp32. The copy is small (the weights once more, at half size).
            self.model = copy.deepcopy(model).to(torch.bfloat16).eval()
        else:
            self.model = model
        self.dtype = next(self.model.parameters()).dtype
        self.token_budget = token_budget
        self.block_images = block_images
        self.max_rows = max_rows
        self.cache = cache
        self.progress = progress
        self.pairs_scored = 0
        # A residual TIA head (config.tia_residual) adds each pair's itc cosine: from vectors of each text and image
        # of a call, computed once per item, not per pair.
        self.dual = DualEncoder(self.model, runtime.device) if self.config.tia_residual else None

    @property
    def config(self) -> FashionBertConfig:
        return self.model.config

    @torch.inference_mode()
    def patch_embeddings(self, features: np.ndarray) -> torch.Tensor:
        """(k, P, D) features -> (k, P, H) patch states entering the fusion layer on the device (the model's
        `embed_patches` and `encode_patches_below_fusion`, so fp32 scores match the unfactored model)."""
        x = torch.from_numpy(np.ascontiguousarray(features)).to(self.runtime.device).to(self.dtype)
        m = self.model
        out = [m.encode_patches_below_fusion(m.embed_patches(x[start:start + 256])) for start in range(0, len(x), 256)]
        return torch.cat(out) if out else x.new_zeros((0, self.config.num_patches, self.config.hidden_size))

    def score(self, texts: Sequence[np.ndarray], images: ImageSource, pairs: np.ndarray,
              keys: ItemKeys | None = None, cosines: np.ndarray | None = None) -> np.ndarray:
        """`texts`: token ids per text index ([CLS] ... [SEP]); `pairs` (n, 2) int (text index, image index)
        -> (n,) float32 margins, in the order of `pairs`. `keys`: the texts' and images' content hashes, for the
        cache. `cosines`: the pairs' itc cosines where the caller has them (the recall stage), which a residual TIA
        head (`config.tia_residual`) adds; without them it embeds the call's texts and images itself."""
        pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        if self.dual is None:
            cosines = None
        elif cosines is None:
            cosines = pair_cosines(self.dual, texts, images, pairs, self.token_budget, self.cache, keys)
        elif len(cosines) != len(pairs):
            raise ValueError(f"{len(cosines)} cosines for {len(pairs)} pairs")
        if self.cache is not None and keys is not None:
            of_pairs = _pair_lookup(pairs, cosines) if cosines is not None else lambda todo: None
            return self.cache.margins(keys, pairs, lambda todo: self._score(texts, images, todo, of_pairs(todo)))
        return self._score(texts, images, pairs, cosines)

    @torch.inference_mode()
    def _score(self, texts: Sequence[np.ndarray], images: ImageSource, pairs: np.ndarray,
               cosines: np.ndarray | None = None) -> np.ndarray:
        out = np.empty(len(pairs), dtype=np.float32)
        if not len(pairs):
            return out
        cfg = self.config
        max_len = int(cfg.max_text_len)
        lengths = np.fromiter((min(len(t), max_len) for t in texts), dtype=np.int64, count=len(texts))
        order = np.lexsort((lengths[pairs[:, 0]], pairs[:, 1]))  # by image, then text length
        images_sorted = pairs[order, 1]
        starts = np.flatnonzero(np.r_[True, images_sorted[1:] != images_sorted[:-1]])
        with progress(len(pairs), "score pairs", "pairs", bar=bool(self.progress),
                      enabled=self.progress is not None) as shown:
            for b in range(0, len(starts), self.block_images):
                lo = starts[b]
                hi = starts[b + self.block_images] if b + self.block_images < len(starts) else len(order)
                block = order[lo:hi]
                block_images = images_sorted[starts[b:b + self.block_images]]
                patches = self.patch_embeddings(images.read(block_images))
                local_image = np.searchsorted(block_images, pairs[block, 1])
                # Within the block: by text length, so that batches pad little.
                by_len = np.argsort(lengths[pairs[block, 0]], kind="stable")
                block, local_image = block[by_len], local_image[by_len]
                block_lengths = lengths[pairs[block, 0]]
                for batch in length_batches(np.arange(len(block)), block_lengths, self.token_budget, self.max_rows,
                                            extra_tokens=cfg.num_patches):
                    rows = block[batch]
                    cosine = None if cosines is None else torch.from_numpy(cosines[rows]).to(self.runtime.device)
                    out[rows] = self._score_batch(texts, pairs[rows, 0], patches, local_image[batch], cosine)
                    shown.update(len(rows))
        self.pairs_scored += len(pairs)
        return out

    def _score_batch(self, texts, text_index: np.ndarray, patches: torch.Tensor, image_local: np.ndarray,
                     cosine: torch.Tensor | None = None) -> np.ndarray:
        m, cfg, dev = self.model, self.config, self.runtime.device
        unique_text, text_of_row = np.unique(text_index, return_inverse=True)
        ids, mask = pad_texts([texts[t] for t in unique_text], cfg.max_text_len, cfg.pad_token_id, cfg.sep_token_id)
        mask = torch.from_numpy(mask).to(dev)
        text_states = m.encode_text_below_fusion(m.embed_text(torch.from_numpy(ids).to(dev)), mask)
        rows = torch.from_numpy(text_of_row).to(dev)
        sequence_output, pooled = m.fuse(text_states[rows], mask[rows], patches[torch.from_numpy(image_local).to(dev)])
        return m.tia_margin(sequence_output, mask[rows], pooled, cosine).cpu().numpy()


def pair_cosines(dual: DualEncoder, texts: Sequence[np.ndarray], images: ImageSource, pairs: np.ndarray,
                 token_budget: int, cache: ScoreCache | None = None, keys: ItemKeys | None = None) -> np.ndarray:
    """(n,) float32 itc cosines of (text index, image index) `pairs`, each distinct text and image embedded once
    (taken from the cache where it holds them)."""
    if not len(pairs):
        return np.zeros(0, dtype=np.float32)
    text_ids, text_of = np.unique(pairs[:, 0], return_inverse=True)
    image_ids, image_of = np.unique(pairs[:, 1], return_inverse=True)
    text_vec, image_vec = embed_items(dual, texts, images, text_ids, image_ids, token_budget, cache, keys)
    return np.einsum("nd,nd->n", text_vec[text_of], image_vec[image_of]).astype(np.float32)


def _pair_lookup(pairs: np.ndarray, values: np.ndarray):
    """-> a function from some of `pairs` (m, 2) to their `values`, for the cache, which computes a subset."""
    width = int(pairs[:, 1].max()) + 1 if len(pairs) else 1
    codes = pairs[:, 0] * width + pairs[:, 1]
    order = np.argsort(codes, kind="stable")
    return lambda todo: values[order[np.searchsorted(codes[order], todo[:, 0] * width + todo[:, 1])]]


# ============================================================================================ ranking score
def fusion_cosine(fusion: score_fusion.ScoreFusion, cosine: np.ndarray | None,
                  offsets: np.ndarray | None) -> np.ndarray | None:
    """The cosine `fusion` reads: `cosine` itself, or less `offsets` when the fusion was fitted on the
    hubness-corrected cosine."""
    if cosine is None or not fusion.reads_corrected_cosine:
        return cosine
    if offsets is None:
        raise ValueError("this fusion reads the hubness-corrected cosine: pass the pairs' offsets "
                         "(rank.hubness.HubnessBiases.offsets over the catalog being scored)")
    return np.asarray(cosine, dtype=np.float64) - np.asarray(offsets, dtype=np.float64)


@dataclasses.dataclass
class PairScores:
    margin: np.ndarray | None  # float32 TIA logit margins (None when not asked for and the fusion does not use them)
    cosine: np.ndarray | None  # float32 itc cosines (None when not asked for and the fusion does not use them)
    logit: np.ndarray  # float64 logit of the ranking score: P(aligned) = sigmoid(logit)


class PairScorer:
    """The model's ranking score for arbitrary (text, image) pairs: the cross-encoder's TIA margin fused with the
    cosine of the itc embeddings, per `fusion`. Each distinct text and image of a call is embedded once.

    `cosines=True` computes the cosine even when the fusion does not use it, `margins=True` the TIA margin
    (evaluate's per-head figures); otherwise a fusion without TIA weight runs no cross-encoder pass at all."""

    def __init__(self, cross: CrossEncoderScorer, fusion: score_fusion.ScoreFusion, cosines: bool = False,
                 margins: bool = False):
        self.cross = cross
        self.fusion = fusion
        self.margins = fusion.uses_tia or margins
        wanted = fusion.uses_itc or cosines or (self.margins and cross.dual is not None)
        self.dual = DualEncoder(cross.model, cross.runtime.device, progress=cross.progress) if wanted else None

    def score(self, texts: Sequence[np.ndarray], images: ImageSource, pairs: np.ndarray,
              keys: ItemKeys | None = None, offsets: np.ndarray | None = None,
              vectors: tuple[np.ndarray, np.ndarray] | None = None, cosines: np.ndarray | None = None) -> PairScores:
        """`keys`: the texts' and images' content hashes, for the cross-encoder's cache. `offsets`: what the fusion's
        hubness correction subtracts from each pair's cosine (`rank.hubness.HubnessBiases.offsets` over the catalog
        being scored); required when the fusion has one. `vectors`: every text's and image's recall vector, when
        the caller has them (the cosines are then their dot products, nothing is embedded again); `cosines`: the
        pairs' cosines themselves, when the caller has those."""
        pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        cosine = None
        if cosines is not None and self.dual is not None:
            cosine = np.asarray(cosines, dtype=np.float32).reshape(-1)
        elif vectors is not None and self.dual is not None:
            cosine = np.einsum("nd,nd->n", vectors[0][pairs[:, 0]], vectors[1][pairs[:, 1]]).astype(np.float32)
        elif self.dual is not None:
            cosine = self.cosines(texts, images, pairs, keys)
        margin = self.cross.score(texts, images, pairs, keys, cosine) if self.margins else None
        return PairScores(margin, cosine, self.fusion.logit(margin, fusion_cosine(self.fusion, cosine, offsets)))

    def cosines(self, texts: Sequence[np.ndarray], images: ImageSource, pairs: np.ndarray,
                keys: ItemKeys | None = None) -> np.ndarray:
        return pair_cosines(self.dual, texts, images, np.asarray(pairs, dtype=np.int64).reshape(-1, 2),
                            self.cross.token_budget, self.cross.cache, keys)

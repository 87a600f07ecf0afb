"""Batched scoring of (text, image) pairs: the cross-encoder's TIA margin, and the model's ranking score.

The ranking score is P(aligned) = sigmoid(fusion of the TIA margin and the itc cosine) per the model folder's
score_fusion.json (fashionbert/fusion.py; the TIA margin alone for a folder without one). `PairScorer` gives it
for arbitrary pairs; `CrossEncoderScorer` is the expensive half, the joint pass.

How the work is laid out, and why:
- Reuse. A text's embeddings (word + position + segment 0, LayerNorm) and an image's patch embeddings
  (Linear(CNN dim -> hidden) + patch positions + segment 1, LayerNorm) each depend on that item alone, so they
  are computed once and gathered into every pair that uses the item; only the encoder, which mixes the two,
  runs per pair. The patch projection is the part worth saving (a 64 x 1280 x hidden matmul, plus the fp16 ->
  fp32 copy of 160 KB of features, per image instead of per pair). Patch embeddings are kept for a block of
  images at a time; text embeddings are recomputed per batch (deduplicated within it): they are a table
  lookup and a LayerNorm, far cheaper than the memory a catalog-wide cache would take.
- Padding. Pairs are grouped by image into blocks, then sorted by text length within a block and cut into
  batches under a token budget, so every batch pads to within a few tokens of each row; patches never pad.
- Precision and device: cuda when present, else cpu; bf16 where the device runs it natively
  (`fashionbert.train.resolve_precision`, the same rule as training), as a bf16 copy of the model rather than
  autocast (see `CrossEncoderScorer.__init__`).

Imports torch, numpy and pyarrow only (no faiss, no Beam): this is the GPU stage.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch

from .config import FashionBertConfig
from . import fusion as score_fusion
from .dual_encoder import ITC_PREFIX, ContrastiveHead, DualEncoder, length_batches
from .errors import UserError
from .features import (FeatureFolder, FeatureReader, ImageIndex, TextTable, index_images, load_texts,
                       open_feature_folders)
from .modeling import WEIGHTS_NAME, FashionBertModel
from .patch_cnn import COLOUR_DIM

DEFAULT_TOKEN_BUDGET = 16384
DEFAULT_BLOCK_IMAGES = 512


# ============================================================================================ runtime
@dataclasses.dataclass
class Runtime:
    device: torch.device
    precision: str  # "bf16" or "fp32"

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def resolve_runtime(device: str = "auto", precision: str = "auto", num_threads: int = 0) -> Runtime:
    from .train import resolve_precision

    if num_threads:
        torch.set_num_threads(num_threads)
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    dev = torch.device("cuda") if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else torch.device("cpu")
    return Runtime(device=dev, precision=resolve_precision(precision, dev))


def add_runtime_arguments(parser: argparse.ArgumentParser, batching: bool = True) -> None:
    g = parser.add_argument_group("runtime")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto = cuda if available, else cpu (default auto)")
    g.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="bf16 or fp32 arithmetic; auto = bf16 where the device runs it natively (CUDA with bf16, CPUs "
                        "with AVX512-BF16/AMX), else fp32 (default auto)")
    g.add_argument("--num-threads", type=int, default=0, help="torch CPU threads, 0 = torch's default")
    if not batching:
        return
    g.add_argument("--batch-tokens", type=int, default=DEFAULT_TOKEN_BUDGET,
                   help="cross-encoder batch size in tokens (pairs x (text + patch tokens)); pairs are sorted by "
                        "text length so batches barely pad (default %(default)s)")
    g.add_argument("--block-images", type=int, default=DEFAULT_BLOCK_IMAGES,
                   help="images whose patch embeddings are held at once; memory ~ block x patches x hidden x 4 "
                        "bytes (2 in bf16) (default %(default)s)")


# ============================================================================================ model
@dataclasses.dataclass
class LoadedModel:
    model: FashionBertModel
    folder: Path
    version: str  # <sha256 of the weights, 12 hex>[-s<sha256 of score_fusion.json, 6 hex>][-step<N>]
    step: int | None
    has_itc_head: bool
    fusion: score_fusion.ScoreFusion  # the ranking score (TIA alone without a score_fusion.json)

    @property
    def config(self) -> FashionBertConfig:
        return self.model.config


def load_model(folder: str | Path, runtime: Runtime) -> LoadedModel:
    """A model folder written by training (OUT/model or OUT/checkpoints/step-N), in eval mode on the runtime's
    device, with its itc_head attached when the weights file has one (whether or not the model class builds
    it itself), and its score fusion. Reads only JSON and safetensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"--model {folder}: no such folder; point it at OUT/model of `fashionbert train`")
    weights = folder / WEIGHTS_NAME
    config = FashionBertConfig.load(folder)
    if not weights.is_file():
        raise UserError(f"--model {folder}: no {WEIGHTS_NAME}; not a complete FashionBERT model folder (use OUT/model "
                        f"of a finished `fashionbert train`)")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise UserError(f"--model {folder}: cannot read {WEIGHTS_NAME} ({exc}); the file is damaged or was cut "
                        f"short while copying: copy the model folder again or re-export it with `fashionbert train`"
                        ) from None
    model = FashionBertModel(config)
    if any(k.startswith(ITC_PREFIX) for k in state) and getattr(model, "itc_head", None) is None:
        model.itc_head = ContrastiveHead.from_state_dict(state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{weights}: weights do not match config.json (missing {missing[:5]}, unexpected "
                        f"{unexpected[:5]}); re-export the model with `fashionbert train`")
    model.to(runtime.device).eval()
    has_itc = getattr(model, "itc_head", None) is not None
    fusion = score_fusion.load(folder)
    if fusion.uses_itc and not has_itc:
        raise UserError(f"{folder / score_fusion.FUSION_NAME} weighs the itc cosine, but the model has no itc head; "
                        f"delete the file (rank by TIA alone) or refit it with `fashionbert fuse`")
    step = training_step(folder)
    return LoadedModel(model, folder, model_version(folder, step), step, has_itc, fusion)


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


def check_compatible(loaded: LoadedModel, grid: int, feature_dim: int, texts: TextTable, where: str) -> None:
    cfg = loaded.config
    if (cfg.grid, cfg.feature_dim) != (grid, feature_dim):
        if cfg.grid == grid and cfg.feature_dim + COLOUR_DIM == feature_dim:
            raise UserError(f"--model {loaded.folder} was trained on {cfg.feature_dim}-d patch features, from before "
                            f"featurize added {COLOUR_DIM} colour statistics per patch ({feature_dim}-d in --features "
                            f"{where}); train a model on these features (fashionbert train, or nightly --train)")
        raise UserError(f"--model {loaded.folder} expects a {cfg.grid}x{cfg.grid} grid of {cfg.feature_dim}-d patch "
                        f"features, but --features {where} has {grid}x{grid} x {feature_dim}; featurize with the "
                        f"model's --grid/--cnn or use a model trained on these features")
    if texts.max_token_id() >= cfg.vocab_size:
        raise UserError(f"--features {where} holds token id {texts.max_token_id()} >= the model's vocabulary "
                        f"({cfg.vocab_size}): the texts were tokenized for another backbone; featurize with the "
                        f"model's --backbone")


# ============================================================================================ catalog
@dataclasses.dataclass
class Catalog:
    """A featurize output opened for scoring: product texts, the image index and a feature reader."""

    folders: list[FeatureFolder]
    texts: TextTable
    index: ImageIndex
    reader: FeatureReader

    @property
    def text_ids(self) -> list[np.ndarray]:
        """The token ids scored for each product: its first text (a product listed with several texts is
        scored, like in training's validation, on the first)."""
        return [ids[0] for ids in self.texts.input_ids]

    @property
    def image_product(self) -> np.ndarray:
        return self.index.product


def open_catalog(paths: Sequence[str], loaded: LoadedModel) -> Catalog:
    folders = open_feature_folders(list(paths))
    texts = load_texts(folders)
    index = index_images(folders, texts)
    where = ", ".join(str(f.path) for f in folders)
    if not len(index):
        raise UserError(f"--features {where}: no image row has a product text; nothing to score")
    check_compatible(loaded, folders[0].grid, folders[0].feature_dim, texts, where)
    reader = FeatureReader(index.shards, folders[0].num_patches, folders[0].feature_dim)
    return Catalog(folders, texts, index, reader)


# ============================================================================================ images
class ImageSource(Protocol):
    def __len__(self) -> int: ...

    def read(self, indices: np.ndarray) -> np.ndarray:
        """(k, P, D) float16 patch features of the given image indices, in that order."""


class ArrayImages:
    """Images whose features are already in memory."""

    def __init__(self, features: np.ndarray):
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def read(self, indices: np.ndarray) -> np.ndarray:
        return self.features[np.asarray(indices, dtype=np.int64)]


class IndexedImages:
    """Images `rows` of an ImageIndex (all when None), read from Parquet on demand; index i = rows[i]."""

    def __init__(self, index: ImageIndex, reader: FeatureReader, rows: np.ndarray | None = None):
        self.index = index
        self.reader = reader
        self.rows = np.arange(len(index), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def read(self, indices: np.ndarray) -> np.ndarray:
        r = self.rows[np.asarray(indices, dtype=np.int64)]
        return self.reader.read(self.index.shard[r], self.index.row_group[r], self.index.row[r])


def iter_features(images: ImageSource, batch_rows: int = 256):
    """Every image of a source in index order (storage order for `IndexedImages`: sequential reads)."""
    for start in range(0, len(images), batch_rows):
        yield images.read(np.arange(start, min(start + batch_rows, len(images))))


def probability(margin: np.ndarray) -> np.ndarray:
    """P(aligned) from the TIA logit margin (a 2-way softmax is the sigmoid of the margin), float32."""
    return (1.0 / (1.0 + np.exp(-np.asarray(margin, dtype=np.float64)))).astype(np.float32)


# ============================================================================================ scorer
class CrossEncoderScorer:
    """Scores (text index, image index) pairs. Returns the TIA logit margin l1 - l0 per pair: it ranks exactly
    like P(aligned) = sigmoid(margin) but does not saturate into ties at P ~ 1 (use `probability` for P)."""

    def __init__(self, model: FashionBertModel, runtime: Runtime, token_budget: int = DEFAULT_TOKEN_BUDGET,
                 block_images: int = DEFAULT_BLOCK_IMAGES, max_rows: int = 512):
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
        self.pairs_scored = 0

    @property
    def config(self) -> FashionBertConfig:
        return self.model.config

    @torch.inference_mode()
    def patch_embeddings(self, features: np.ndarray) -> torch.Tensor:
        """(k, P, D) features -> (k, P, H) patch embeddings on the device, as `FashionBertModel.encode` makes
        them (the same modules, so fp32 scores match the unfactored model)."""
        m = self.model
        x = torch.from_numpy(np.ascontiguousarray(features)).to(self.runtime.device).to(self.dtype)
        seg = m.bert.embeddings.token_type_embeddings.weight[1]
        out = [m.patch_embeddings(x[start:start + 256], seg) for start in range(0, len(x), 256)]
        return torch.cat(out) if out else x.new_zeros((0, self.config.num_patches, self.config.hidden_size))

    @torch.inference_mode()
    def score(self, texts: Sequence[np.ndarray], images: ImageSource, pairs: np.ndarray) -> np.ndarray:
        """`texts`: token ids per text index ([CLS] ... [SEP]); `pairs` (n, 2) int (text index, image index)
        -> (n,) float32 margins, in the order of `pairs`."""
        pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        out = np.empty(len(pairs), dtype=np.float32)
        if not len(pairs):
            return out
        cfg = self.config
        max_len = int(cfg.max_text_len)
        lengths = np.fromiter((min(len(t), max_len) for t in texts), dtype=np.int64, count=len(texts))
        order = np.lexsort((lengths[pairs[:, 0]], pairs[:, 1]))  # by image, then text length
        images_sorted = pairs[order, 1]
        starts = np.flatnonzero(np.r_[True, images_sorted[1:] != images_sorted[:-1]])
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
                out[rows] = self._score_batch(texts, pairs[rows, 0], patches, local_image[batch])
        self.pairs_scored += len(pairs)
        return out

    def _score_batch(self, texts, text_index: np.ndarray, patches: torch.Tensor, image_local: np.ndarray) -> np.ndarray:
        from transformers.masking_utils import create_bidirectional_mask

        from .batching import pad_texts

        m, cfg, dev = self.model, self.config, self.runtime.device
        unique_text, text_of_row = np.unique(text_index, return_inverse=True)
        ids, mask = pad_texts([texts[t] for t in unique_text], cfg.max_text_len, cfg.pad_token_id, cfg.sep_token_id)
        ids_t = torch.from_numpy(ids).to(dev)
        text_emb = m.bert.embeddings(input_ids=ids_t, token_type_ids=torch.zeros_like(ids_t))
        rows = torch.from_numpy(text_of_row).to(dev)
        hidden = torch.cat([text_emb[rows], patches[torch.from_numpy(image_local).to(dev)]], dim=1)
        text_mask = torch.from_numpy(mask).to(dev)[rows]
        full_mask = torch.cat([text_mask, text_mask.new_ones((len(rows), cfg.num_patches))], dim=1)
        extended = create_bidirectional_mask(config=m.bert.config, inputs_embeds=hidden, attention_mask=full_mask)
        sequence = m.bert.encoder(hidden, attention_mask=extended).last_hidden_state
        logits = m.tia_head(m.bert.pooler(sequence)).float()
        return (logits[:, 1] - logits[:, 0]).cpu().numpy()


# ============================================================================================ ranking score
@dataclasses.dataclass
class PairScores:
    margin: np.ndarray  # float32 TIA logit margins
    cosine: np.ndarray | None  # float32 itc cosines (None when not asked for and the fusion does not use them)
    logit: np.ndarray  # float64 logit of the ranking score: P(aligned) = sigmoid(logit)


class PairScorer:
    """The model's ranking score for arbitrary (text, image) pairs: the cross-encoder's TIA margin fused with the
    cosine of the itc embeddings, per `fusion`. Each distinct text and image of a call is embedded once.

    `cosines=True` computes the cosine even when the fusion does not use it (evaluate's per-head figures)."""

    def __init__(self, cross: CrossEncoderScorer, fusion: score_fusion.ScoreFusion, cosines: bool = False):
        self.cross = cross
        self.fusion = fusion
        self.dual = DualEncoder(cross.model, cross.runtime.device) if (fusion.uses_itc or cosines) else None

    def score(self, texts: Sequence[np.ndarray], images: ImageSource, pairs: np.ndarray) -> PairScores:
        pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        margin = self.cross.score(texts, images, pairs)
        cosine = self.cosines(texts, images, pairs) if self.dual is not None else None
        return PairScores(margin, cosine, self.fusion.logit(margin, cosine))

    def cosines(self, texts: Sequence[np.ndarray], images: ImageSource, pairs: np.ndarray) -> np.ndarray:
        if not len(pairs):
            return np.zeros(0, dtype=np.float32)
        text_ids, text_of = np.unique(pairs[:, 0], return_inverse=True)
        image_ids, image_of = np.unique(pairs[:, 1], return_inverse=True)
        text_vec = self.dual.embed_texts([texts[t] for t in text_ids], token_budget=self.cross.token_budget)
        image_vec = self.dual.embed_images(images.read(image_ids[i:i + 256]) for i in range(0, len(image_ids), 256))
        return np.einsum("nd,nd->n", text_vec[text_of], image_vec[image_of]).astype(np.float32)

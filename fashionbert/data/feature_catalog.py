"""A featurize output opened for scoring (product texts, the image index, a feature reader), and the image
sources the scorers read patch features from.

Imports numpy and pyarrow only (no torch at import, no faiss, no Beam).
"""
from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence

import numpy as np

from fashionbert.data.features import (FeatureFolder, FeatureReader, ImageIndex, TextTable, index_images, load_texts,
                                       open_feature_folders)
from fashionbert.errors import UserError
from fashionbert.model.loading import LoadedModel
from fashionbert.model.patch_cnn import COLOUR_DIM


def check_compatible(loaded: LoadedModel, grid: int, feature_dim: int, texts: TextTable, where: str) -> None:
    cfg = loaded.config
    if (cfg.grid, cfg.feature_dim) != (grid, feature_dim):
        if cfg.grid == grid and cfg.feature_dim + COLOUR_DIM == feature_dim:
            raise UserError(f"--model {loaded.where} was trained on {cfg.feature_dim}-d patch features, from before "
                            f"featurize added {COLOUR_DIM} colour statistics per patch ({feature_dim}-d in --features "
                            f"{where}); train a model on these features (fashionbert train, or nightly --train)")
        raise UserError(f"--model {loaded.where} expects a {cfg.grid}x{cfg.grid} grid of {cfg.feature_dim}-d patch "
                        f"features, but --features {where} has {grid}x{grid} x {feature_dim}; featurize with the "
                        f"model's --grid/--cnn or use a model trained on these features")
    if texts.max_token_id() >= cfg.vocab_size:
        raise UserError(f"--features {where} holds token id {texts.max_token_id()} >= the model's vocabulary "
                        f"({cfg.vocab_size}): the texts were tokenized for another backbone; featurize with the "
                        f"model's --backbone")


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
    def text_hashes(self) -> np.ndarray:
        """Per product, the content_hash of the text `text_ids` scores (object array of str): what a score cache
        keys it by."""
        return np.asarray([h[0] for h in self.texts.content_hash], dtype=object)

    @property
    def image_hashes(self) -> np.ndarray:
        """Per image index, its content_hash (object array of str)."""
        return np.asarray(self.index.content_hash, dtype=object)


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


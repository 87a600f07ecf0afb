"""Recall stage: the top-k nearest neighbours of L2-normalised dual embeddings by inner product (= cosine).

faiss is imported here, lazily, inside `build_index`: scoring and training must run on a GPU box that has
only torch, transformers, pyarrow and numpy. Index kinds:
- flat: faiss IndexFlatIP, exact. Chosen by `auto` up to `exact_max` database vectors: exact search costs
  queries x database x dim multiply-adds, which at 100k x 100k x 256 is still minutes on a CPU, and it needs
  no training and has no recall loss.
- hnsw: faiss IndexHNSWFlat (inner product), chosen by `auto` above `exact_max`: no training step, and ~0.95+
  recall at efSearch >= 2k on embedding data at a small fraction of the exact cost.
- ivf: faiss IndexIVFFlat (inner product) with ~4 sqrt(n) lists; on request (cheaper to build than HNSW).
- torch: exact blocked matmul + top-k in torch (on the GPU when there is one); `auto` falls back to it when
  faiss is not installed.
Approximate indexes may return fewer than k neighbours, which faiss pads with id -1: those never leave
this module (`Neighbours` holds real candidates only).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from fashionbert.errors import UserError

KINDS = ("auto", "flat", "hnsw", "ivf", "torch")
DEFAULT_EXACT_MAX = 100_000
HNSW_M = 32


@dataclasses.dataclass
class Neighbours:
    """Ragged top-k lists, flattened: row j is (query[j], candidate[j], score[j]); rows of one query are
    contiguous, queries ascending, scores descending within a query, equal scores by candidate ascending. No -1
    padding."""

    query: np.ndarray  # int64
    candidate: np.ndarray  # int64
    score: np.ndarray  # float32 cosine
    kind: str  # the index kind that produced them

    def __len__(self) -> int:
        return len(self.query)

    def first(self, k: int) -> "Neighbours":
        """Each query's first `k` rows (its best k, the lists being ordered)."""
        starts = np.flatnonzero(np.r_[True, self.query[1:] != self.query[:-1]]) if len(self) else np.zeros(0, int)
        rank = np.arange(len(self)) - np.repeat(starts, np.diff(np.r_[starts, len(self)]))
        keep = rank < k
        return Neighbours(self.query[keep], self.candidate[keep], self.score[keep], self.kind)


def choose_kind(n_database: int, kind: str = "auto", exact_max: int = DEFAULT_EXACT_MAX) -> str:
    if kind not in KINDS:
        raise UserError(f"--index {kind!r}: choose one of {', '.join(KINDS)}")
    if kind != "auto":
        if kind != "torch":
            _faiss(kind)
        return kind
    if not _faiss_available():
        return "torch"
    return "flat" if n_database <= exact_max else "hnsw"


def _faiss_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("faiss") is not None


def _faiss(kind: str):
    try:
        import faiss
    except ImportError as exc:
        raise UserError(f"--index {kind} needs faiss, which is not installed: pip install faiss-cpu (or faiss-gpu), "
                        f"or pass --index torch for exact search without it") from exc
    return faiss


def search(database: np.ndarray, queries: np.ndarray, k: int, kind: str = "auto",
           exact_max: int = DEFAULT_EXACT_MAX, nprobe: int | None = None, ef_search: int | None = None,
           device: str = "cpu") -> Neighbours:
    """Top-`k` database rows for each query row by inner product. Both are L2-normalised float32 (n, d)."""
    return NeighbourIndex(database, k, kind, exact_max, nprobe, ef_search, device).search(queries)


class NeighbourIndex:
    """A database indexed once and searched for its top-`k` by any number of query chunks (the Beam retrieve
    searches chunks of queries in its workers against one index per worker)."""

    def __init__(self, database: np.ndarray, k: int, kind: str = "auto", exact_max: int = DEFAULT_EXACT_MAX,
                 nprobe: int | None = None, ef_search: int | None = None, device: str = "cpu"):
        self.database = np.ascontiguousarray(database, dtype=np.float32)
        self.kind = choose_kind(len(self.database), kind, exact_max)
        self.k = min(int(k), len(self.database))
        self.device = device
        self._faiss = (_build_faiss(self.database, self.kind, nprobe, ef_search, self.k)
                       if self.kind != "torch" and self.k >= 1 else None)

    def search(self, queries: np.ndarray, first_query: int = 0) -> Neighbours:
        """Neighbours of each query row; query numbers start at `first_query` (a chunk's offset)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self.k < 1 or not len(queries):
            empty = np.zeros(0, dtype=np.int64)
            return Neighbours(empty, empty.copy(), np.zeros(0, dtype=np.float32), self.kind)
        if self._faiss is None:
            scores, ids = _torch_search(self.database, queries, self.k, self.device)
        else:
            scores, ids = self._faiss.search(queries, self.k)
        found = _flatten(scores, ids, self.kind)
        found.query += first_query
        return found


def _build_faiss(database: np.ndarray, kind: str, nprobe: int | None, ef_search: int | None, k: int):
    faiss = _faiss(kind)
    n, d = database.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.hnsw.efSearch = int(ef_search or max(2 * k, 128))
    else:
        # faiss wants >= 39 training points per list; 4 sqrt(n) lists is its usual starting point.
        nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        sample = database if n <= 256 * nlist else database[np.sort(rng.choice(n, 256 * nlist, replace=False))]
        index.train(sample)
        index.nprobe = int(nprobe or max(1, min(nlist, 16)))
    index.add(database)
    return index


def _torch_search(database: np.ndarray, queries: np.ndarray, k: int, device: str) -> tuple[np.ndarray, np.ndarray]:
    import torch

    dev = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    db = torch.from_numpy(database).to(dev)
    scores, ids = [], []
    step = max(1, (1 << 26) // max(1, len(database)))  # keep each block's score matrix ~256 MB
    for start in range(0, len(queries), step):
        q = torch.from_numpy(queries[start:start + step]).to(dev)
        s, i = torch.topk(q @ db.t(), k, dim=1)
        scores.append(s.cpu().numpy())
        ids.append(i.cpu().numpy())
    return np.concatenate(scores), np.concatenate(ids).astype(np.int64)


def _flatten(scores: np.ndarray, ids: np.ndarray, kind: str) -> Neighbours:
    ids = np.asarray(ids, dtype=np.int64)
    valid = ids >= 0
    query = np.broadcast_to(np.arange(ids.shape[0], dtype=np.int64)[:, None], ids.shape)[valid]
    cand, score = ids[valid], np.asarray(scores, dtype=np.float32)[valid]
    # faiss returns each list best-first; the re-sort makes that a guarantee for every backend, and puts exact ties
    # (catalogs repeat a product's text or photo) in candidate order, as retrieve.rank_rows does: otherwise a
    # re-rank that keeps the recall order (a fusion without TIA weight) would still swap tied items and change
    # Rank@1 (hm-dev's gallery: 7 of 500 image -> text queries).
    order = np.lexsort((cand, -score, query))
    return Neighbours(query[order], cand[order], score[order], kind)

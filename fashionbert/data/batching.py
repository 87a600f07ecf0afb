"""Training batches from featurize output: image stream, negative pairs, masking, collate.

Determinism is by construction, so that `--resume` replays the exact batches:
- the image order of an epoch is a function of (seed, epoch, rank, world size) only, computed from Parquet
  metadata and the light id columns, never from the features; a stream position is (epoch, offset) and
  resuming at a position re-reads only the window it falls in;
- each batch's negatives and masks come from an RNG seeded by (seed, rank, batch number).

Memory: the stream holds one shuffle window (`window_rows` images) plus one Parquet record batch.
"""
from __future__ import annotations

import dataclasses
import queue
import threading
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from fashionbert.data.features import FeatureReader, ImageIndex, TextTable, truncate_ids
from fashionbert.model.hard_negatives import MiningRequest

IGNORE_INDEX = -100


# ------------------------------------------------------------------------------------------- masking
@dataclasses.dataclass
class MaskingVocab:
    """Per-token-id lookups for masking: never-masked special tokens and WordPiece continuation pieces."""

    special: np.ndarray  # bool (V,)
    continuation: np.ndarray  # bool (V,)
    mask_token_id: int
    vocab_size: int

    @classmethod
    def from_tokenizer(cls, tokenizer, vocab_size: int) -> "MaskingVocab":
        special = np.zeros(vocab_size, dtype=bool)
        special[[i for i in tokenizer.all_special_ids if i < vocab_size]] = True
        continuation = np.zeros(vocab_size, dtype=bool)
        for token, i in tokenizer.get_vocab().items():
            if i < vocab_size and token.startswith("##"):
                continuation[i] = True
        return cls(special, continuation, int(tokenizer.mask_token_id), vocab_size)


def mask_tokens(input_ids: np.ndarray, attention_mask: np.ndarray, rng: np.random.Generator, vocab: MaskingVocab,
                probability: float, whole_word: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """BERT masking: choose ~probability of the words (whole words: a "##" piece goes with its word), at
    least one per row that has any; of the chosen tokens 80% -> [MASK], 10% -> random id, 10% kept.
    -> (masked ids, labels with -100 at unchosen positions)."""
    ids = input_ids
    if probability <= 0:
        return ids.copy(), np.full_like(ids, IGNORE_INDEX)
    maskable = attention_mask.astype(bool) & ~vocab.special[ids]
    if whole_word:
        starts = maskable & ~vocab.continuation[ids]
        word = np.cumsum(starts, axis=1) - 1  # a continuation piece gets the id of the word it continues
        chosen_word = rng.random(ids.shape) < probability
        chosen = np.take_along_axis(chosen_word, np.clip(word, 0, None), axis=1) & maskable & (word >= 0)
        candidates = starts
    else:
        chosen = (rng.random(ids.shape) < probability) & maskable
        word = None
        candidates = maskable
    # At least one masked word per row: every row then contributes to MLM, and no batch leaves the head unused.
    empty = ~chosen.any(axis=1) & candidates.any(axis=1)
    for r in np.nonzero(empty)[0]:
        pos = rng.choice(np.nonzero(candidates[r])[0])
        if word is not None:
            chosen[r] = (word[r] == word[r, pos]) & maskable[r]
        else:
            chosen[r, pos] = True
    labels = np.where(chosen, ids, IGNORE_INDEX)
    u = rng.random(ids.shape)
    out = ids.copy()
    out[chosen & (u < 0.8)] = vocab.mask_token_id
    rand = chosen & (u >= 0.8) & (u < 0.9)
    out[rand] = rng.integers(0, vocab.vocab_size, size=int(rand.sum()))
    return out, labels


def mask_patches(rows: int, num_patches: int, rng: np.random.Generator, probability: float) -> np.ndarray:
    """(rows, num_patches) bool: patches to zero and reconstruct; at least one per row."""
    m = rng.random((rows, num_patches)) < probability
    if probability <= 0:
        return m
    empty = np.nonzero(~m.any(axis=1))[0]
    m[empty, rng.integers(0, num_patches, size=len(empty))] = True
    return m


# ------------------------------------------------------------------------------------------- image stream
@dataclasses.dataclass
class StreamPosition:
    epoch: int = 0
    offset: int = 0  # rows of this rank's epoch plan already consumed

    def as_list(self) -> list[int]:
        return [self.epoch, self.offset]


@dataclasses.dataclass
class Window:
    rows: np.ndarray  # indices into the ImageIndex, in the order they are served
    start: int  # offset of rows[0] within the epoch plan


class ImageStream:
    """This rank's endless, deterministic sequence of training images.

    An epoch: the (shard, row group) units are permuted by (seed, epoch); rank r takes units r::world (or,
    with fewer units than ranks, every unit with rows striped across ranks); consecutive units are gathered
    into windows of at least `window_rows` rows, and each window is shuffled. Reads stay sequential within a
    row group, and only one window's features are in memory.

    With `groups` (a group code per ImageIndex entry) a window is shuffled group by group: its groups in a random
    order, each group's rows together in a random order, so that a product's colour variants share a batch (a
    group split across two windows is not put back together: featurize writes shards in id order, in which a
    catalog's variants usually sit side by side).

    With `subcategories` (a code per ImageIndex entry) the window is then served sub-category by sub-category, in
    a random order of them (the rows of each keep their order, so groups stay together), so that a batch's other
    positives -- its in-batch itc negatives and the pool of its mined ones -- are mostly of its own sub-category,
    as the sample-100 candidates are.
    """

    def __init__(self, index: ImageIndex, rows: np.ndarray, reader: FeatureReader, seed: int, rank: int = 0,
                 world: int = 1, window_rows: int = 512, groups: np.ndarray | None = None,
                 subcategories: np.ndarray | None = None):
        self.index = index
        self.reader = reader
        self.groups = None if groups is None else np.asarray(groups, dtype=np.int64)
        self.subcategories = None if subcategories is None else np.asarray(subcategories, dtype=np.int64)
        self.seed, self.rank, self.world = seed, rank, world
        self.window_rows = max(1, window_rows)
        rows = np.sort(np.asarray(rows, dtype=np.int64))
        keys = index.shard[rows].astype(np.int64) * (1 << 32) + index.row_group[rows]
        order = np.lexsort((index.row[rows], keys))
        rows, keys = rows[order], keys[order]
        bounds = np.nonzero(np.diff(keys))[0] + 1
        self.units = [u for u in np.split(rows, bounds) if len(u)]
        if len(rows) < world:
            raise ValueError(f"{len(rows)} training images cannot feed {world} processes")

    def epoch_units(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch, 0x5EED])
        order = rng.permutation(len(self.units))
        if len(self.units) >= self.world:
            return [self.units[u] for u in order[self.rank::self.world]]
        return [self.units[u][(self.rank + i) % self.world::self.world] for i, u in enumerate(order)]

    def epoch_windows(self, epoch: int) -> list[Window]:
        windows, current, start, size = [], [], 0, 0
        for unit in self.epoch_units(epoch):
            if not len(unit):
                continue
            current.append(unit)
            size += len(unit)
            if size >= self.window_rows:
                windows.append(self._window(epoch, len(windows), current, start))
                start += size
                current, size = [], 0
        if current:
            windows.append(self._window(epoch, len(windows), current, start))
        return windows

    def _window(self, epoch: int, w: int, units: list[np.ndarray], start: int) -> Window:
        rows = np.concatenate(units)
        rng = np.random.default_rng([self.seed, epoch, self.rank, self.world, w, 0x3A7])
        rows = rows[rng.permutation(len(rows))]
        for codes in (self.groups, self.subcategories):
            if codes is not None:
                _, block = np.unique(codes[rows], return_inverse=True)
                rows = rows[np.argsort(rng.permutation(int(block.max()) + 1)[block], kind="stable")]
        return Window(rows=rows, start=start)

    def iter_windows(self, position: StreamPosition) -> Iterator[tuple[int, Window, np.ndarray, int]]:
        """(epoch, window, the window's features, rows of it already consumed) forever from `position`.

        The whole window is read even when resuming inside it: its images are the pool image negatives
        come from, so a resumed run sees the same pool as an uninterrupted one."""
        epoch, offset = position.epoch, position.offset
        empty_epochs = 0
        while True:
            served = False
            for win in self.epoch_windows(epoch):
                if win.start + len(win.rows) <= offset:
                    continue
                rows = win.rows
                feats = self.reader.read(self.index.shard[rows], self.index.row_group[rows], self.index.row[rows])
                served = True
                yield epoch, win, feats, max(0, offset - win.start)
            empty_epochs = 0 if served else empty_epochs + 1
            if empty_epochs > 100:
                raise RuntimeError(f"rank {self.rank}: no training images in 100 consecutive epochs")
            epoch, offset = epoch + 1, 0


# ------------------------------------------------------------------------------------------- pairs
@dataclasses.dataclass
class Pairs:
    """One batch's rows: all positives first, then the negatives drawn here. `images` index the batch's
    positives (b < B) or, from B on, the window pool (B + pool index). `mined_anchor` / `mined_swap_image` are the
    negative slots left to the training step, which draws them from the itc similarity
    (model/hard_negatives.py): anchor = the positive's number, swap_image = keep its text and mine an image (else
    keep its image and mine a text)."""
    texts: list[np.ndarray]
    images: np.ndarray
    labels: np.ndarray
    text_products: np.ndarray
    mined_anchor: np.ndarray
    mined_swap_image: np.ndarray


class PairBuilder:
    """Positive (text, image) pairs plus negatives: each positive gets `neg_ratio` negatives, each either
    its image with another product's text or its text with another product's image (half and half).

    A `hard_fraction` of the negatives are mined by the training step from the itc similarity inside the batch
    (the batch only records which slots). Of the others, a `random_neg_fraction` take a random other product and
    the rest one of the same sub-category (random when the sub-category has no other product). Same-sub-category
    negatives alone left TIA at chance in calibration: the mix gives it an easy signal to start from.

    `negative_code` is what each batch hands the model as its rows' groups (rows sharing a code are not each
    other's itc-queue or mined negatives): the product's group, or with `group_negatives` the product itself, so
    that its colour variants become negatives too.
    """

    def __init__(self, texts: TextTable, products: np.ndarray, neg_ratio: int = 1, random_neg_fraction: float = 0.5,
                 hard_fraction: float = 0.0, group_negatives: bool = False):
        self.texts = texts
        self.products = np.asarray(products, dtype=np.int64)  # products negatives' texts may come from
        self.neg_ratio = int(neg_ratio)
        self.random_neg_fraction = float(random_neg_fraction)
        self.hard_fraction = float(hard_fraction)
        self.group_code = texts.group_codes()
        self.negative_code = np.arange(len(texts), dtype=np.int64) if group_negatives else self.group_code
        self.subcat_of = np.asarray([texts.subcategory[p] for p in range(len(texts))], dtype=object)
        by_sub: dict[str, list[int]] = {}
        for p in self.products:
            by_sub.setdefault(self.subcat_of[p], []).append(int(p))
        self.by_subcat = {k: np.asarray(v, dtype=np.int64) for k, v in by_sub.items()}

    def _other_product(self, p: int, rng: np.random.Generator) -> int:
        same = self.by_subcat.get(self.subcat_of[p]) if self.subcat_of[p] else None
        use_random = rng.random() < self.random_neg_fraction or same is None or len(same) < 2
        pool = self.products if use_random else same
        if len(pool) < 2:
            return -1
        for _ in range(8):
            q = int(pool[rng.integers(len(pool))])
            if q != p:
                return q
        others = pool[pool != p]
        return int(others[rng.integers(len(others))]) if len(others) else -1

    def _other_image(self, p: int, pool_products: np.ndarray, rng: np.random.Generator) -> int:
        """Index into the pool of an image of another product (same sub-category unless random/too few)."""
        others = np.nonzero(pool_products != p)[0]
        if not len(others):
            return -1
        if self.subcat_of[p] and rng.random() >= self.random_neg_fraction:
            same = others[self.subcat_of[pool_products[others]] == self.subcat_of[p]]
            if len(same):
                return int(same[rng.integers(len(same))])
        return int(others[rng.integers(len(others))])

    def text_of(self, p: int, rng: np.random.Generator) -> np.ndarray:
        options = self.texts.input_ids[p]
        return options[0] if len(options) == 1 else options[int(rng.integers(len(options)))]

    def build(self, products: np.ndarray, pool_products: np.ndarray, rng: np.random.Generator) -> Pairs:
        texts, images, labels, text_products = [], [], [], []
        mined_anchor, mined_swap = [], []
        batch = len(products)
        for i, p in enumerate(products):
            texts.append(self.text_of(int(p), rng))
            images.append(i)
            labels.append(1)
            text_products.append(int(p))
        for i, p in enumerate(products):
            p = int(p)
            for _ in range(self.neg_ratio):
                # (no draw when off, so that runs without mining keep their exact negatives)
                if self.hard_fraction > 0 and rng.random() < self.hard_fraction:
                    mined_anchor.append(i)
                    mined_swap.append(rng.random() < 0.5)
                    continue
                swap_image = rng.random() < 0.5
                if swap_image:
                    j = self._other_image(p, pool_products, rng)
                    if j >= 0:
                        texts.append(self.text_of(p, rng))
                        images.append(batch + j)
                        labels.append(0)
                        text_products.append(p)
                        continue
                q = self._other_product(p, rng)
                if q < 0:
                    continue
                texts.append(self.text_of(q, rng))
                images.append(i)
                labels.append(0)
                text_products.append(q)
        return Pairs(texts, np.asarray(images), np.asarray(labels, dtype=np.int64), np.asarray(text_products),
                     np.asarray(mined_anchor, dtype=np.int64), np.asarray(mined_swap, dtype=bool))


def pad_texts(texts: Sequence[np.ndarray], max_len: int, pad_id: int, sep_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad to the longest text in the batch (at most max_len): -> (ids, attention mask) int64."""
    texts = [truncate_ids(t, max_len, sep_id) for t in texts]
    length = max(len(t) for t in texts)
    ids = np.full((len(texts), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(texts), length), dtype=np.int64)
    for i, t in enumerate(texts):
        ids[i, : len(t)] = t
        mask[i, : len(t)] = 1
    return ids, mask


@dataclasses.dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    patch_features: torch.Tensor  # float16, (R, P, D)
    patch_mask: torch.Tensor
    mlm_labels: torch.Tensor
    tia_labels: torch.Tensor
    positives: int
    position: StreamPosition  # stream position after this batch
    index: int  # batch number in this rank's stream
    tia_only: bool = False  # a TIA warm-up batch: no masks, no MLM/MPM targets
    groups: torch.Tensor | None = None  # (positives,) group codes: rows of one group are not each other's negatives
    mining: MiningRequest | None = None  # negative slots the step draws from the itc similarity

    @property
    def rows(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device) -> "Batch":
        nb = device.type == "cuda"
        moved = {f: getattr(self, f).to(device, non_blocking=nb)
                 for f in ("input_ids", "attention_mask", "patch_features", "patch_mask", "mlm_labels", "tia_labels")}
        return dataclasses.replace(self, **moved, groups=self.groups.to(device) if self.groups is not None else None,
                                   mining=self.mining.to(device) if self.mining is not None else None)

    def model_inputs(self, joint: bool = True) -> dict:
        """The model's forward arguments; joint=False for a step without the joint pass (--itc-warmup's): the itc task
        alone, so no mining request."""
        inputs = dict(input_ids=self.input_ids, attention_mask=self.attention_mask, patch_features=self.patch_features,
                      tia_labels=self.tia_labels)
        if not self.tia_only:
            inputs.update(patch_mask=self.patch_mask, mlm_labels=self.mlm_labels)
        if self.groups is not None:
            inputs["groups"] = self.groups
        if self.mining is not None and joint:
            inputs["mining"] = self.mining
        return dict(inputs, joint=joint)


@dataclasses.dataclass
class BatchSettings:
    batch_size: int  # positive pairs per batch
    max_text_len: int
    pad_token_id: int
    sep_token_id: int
    mlm_probability: float
    mpm_probability: float
    whole_word_mask: bool = True
    # Batches numbered below this are for the TIA-only warm-up: no masks (TIA sees clean pairs, as at scoring).
    unmasked_batches: int = 0
    mining_temperature: float = 0.0  # of mined negatives' softmax; 0 = the itc head's
    mining_similarity: str = "cosine"  # what that softmax reads (MiningRequest.similarity)


def collate(pairs: Pairs, positive_features: np.ndarray, pool_features: np.ndarray, settings: BatchSettings,
            vocab: MaskingVocab, rng: np.random.Generator, position: StreamPosition, index: int,
            groups: np.ndarray | None = None, mining_seed: int = 0) -> Batch:
    """`groups`: the positives' group codes (which rows are not each other's negatives); `mining_seed` seeds the
    draw of the mined slots."""
    image_index, labels = pairs.images, pairs.labels
    ids, attn = pad_texts(pairs.texts, settings.max_text_len, settings.pad_token_id, settings.sep_token_id)
    # Every row is masked alike, negatives included, so that "is it masked" never tells TIA the label;
    # the model counts MLM/MPM on aligned rows only.
    unmasked = index < settings.unmasked_batches
    mlm_p = 0.0 if unmasked else settings.mlm_probability
    mpm_p = 0.0 if unmasked else settings.mpm_probability
    masked_ids, mlm_labels = mask_tokens(ids, attn, rng, vocab, mlm_p, settings.whole_word_mask)
    b = len(positive_features)
    feats = np.empty((len(image_index),) + positive_features.shape[1:], dtype=np.float16)
    own = image_index < b
    feats[own] = positive_features[image_index[own]]
    feats[~own] = pool_features[image_index[~own] - b]
    patch_mask = mask_patches(len(image_index), feats.shape[1], rng, mpm_p)
    mining = None
    if len(pairs.mined_anchor):
        mining = MiningRequest(anchors=torch.from_numpy(pairs.mined_anchor),
                               swap_image=torch.from_numpy(pairs.mined_swap_image), seed=mining_seed,
                               temperature=settings.mining_temperature, similarity=settings.mining_similarity)
    return Batch(
        input_ids=torch.from_numpy(masked_ids),
        attention_mask=torch.from_numpy(attn),
        patch_features=torch.from_numpy(feats),
        patch_mask=torch.from_numpy(patch_mask),
        mlm_labels=torch.from_numpy(mlm_labels),
        tia_labels=torch.from_numpy(labels),
        positives=int(labels.sum()),
        position=position,
        index=index,
        tia_only=unmasked,
        groups=torch.from_numpy(np.asarray(groups, dtype=np.int64)) if groups is not None else None,
        mining=mining,
    )


def iter_batches(stream: ImageStream, pairs: PairBuilder, settings: BatchSettings, vocab: MaskingVocab,
                 seed: int, position: StreamPosition, first_index: int = 0) -> Iterator[Batch]:
    """Endless training batches for this rank, starting at `position` (batch numbers from `first_index`).

    A batch that straddles two windows (or two epochs) takes its first rows from the previous one; its
    image-negative pool is the newer window."""
    b = settings.batch_size
    carry_rows = np.zeros(0, dtype=np.int64)
    carry_feats: np.ndarray | None = None
    index = first_index
    for epoch, win, feats, i in stream.iter_windows(position):
        pool_products = stream.index.product[win.rows]
        n = len(win.rows)
        while True:
            need = b - len(carry_rows)
            if n - i < need:
                carry_rows = np.concatenate([carry_rows, win.rows[i:]])
                part = feats[i:]
                carry_feats = part.copy() if carry_feats is None else np.concatenate([carry_feats, part])
                break
            rows = np.concatenate([carry_rows, win.rows[i:i + need]])
            batch_feats = feats[i:i + need] if carry_feats is None else np.concatenate([carry_feats, feats[i:i + need]])
            i += need
            carry_rows, carry_feats = carry_rows[:0], None
            rng = np.random.default_rng([seed, stream.rank, index, 0xBA7C])
            products = stream.index.product[rows]
            built = pairs.build(products, pool_products, rng)
            yield collate(built, batch_feats, feats, settings, vocab, rng, StreamPosition(epoch, win.start + i), index,
                          groups=pairs.negative_code[products], mining_seed=mining_seed(seed, stream.rank, index))
            index += 1


def mining_seed(seed: int, rank: int, index: int) -> int:
    """The seed of a batch's mined-negative draw: a function of the batch alone, so a resumed run draws alike."""
    return int(np.random.SeedSequence([seed, rank, index, 0x4E6]).generate_state(1)[0])


class Prefetcher:
    """Builds the next batches in a background thread while the model trains (Parquet reads and numpy
    release the GIL). Order and content are unchanged: the producer is the same deterministic iterator."""

    _END = object()

    def __init__(self, iterator: Iterator[Batch], depth: int = 2):
        self.iterator = iterator
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="fashionbert-prefetch")
        self.thread.start()

    def _run(self):
        try:
            for item in self.iterator:
                while not self.stop.is_set():
                    try:
                        self.queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self.stop.is_set():
                    return
        except BaseException as exc:  # re-raised in the consumer
            self.queue.put(exc)
            return
        self.queue.put(self._END)

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        item = self.queue.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        self.stop.set()
        self.thread.join(timeout=5)


def length_batches(order: np.ndarray, lengths: np.ndarray, token_budget: int, max_rows: int,
                    extra_tokens: int) -> Iterable[np.ndarray]:
    """Cut `order` (ascending length) into batches whose padded size (rows x (longest + extra)) stays within
    the token budget (always at least one row)."""
    start = 0
    n = len(order)
    while start < n:
        stop = start + 1
        while stop < n and stop - start < max_rows and \
                (stop - start + 1) * (int(lengths[order[stop]]) + extra_tokens) <= token_budget:
            stop += 1
        yield order[start:stop]
        start = stop

"""Small, valid featurize output folders with learnable structure, for training and scoring tests.

Every product has a sub-category and three attributes (colour, material, pattern). Its text names them
("red striped cotton shirt ..."), tokenized with the real backbone tokenizer; its image features are made of
per-attribute patterns placed on the patch grid plus noise. So text and image agree only for the right
product, and telling two products of one sub-category apart needs the attributes, as in a real catalog.
Also builds tiny BERT backbone folders (the packaged WordPiece vocab, a few layers) so that tests run fast.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from schemas import REJECTS, TEXTS, images_schema

COLORS = ["red", "blue", "green", "black", "white", "yellow", "pink", "brown", "grey", "orange", "purple", "beige"]
MATERIALS = ["cotton", "leather", "denim", "silk", "wool", "linen", "velvet", "nylon"]
PATTERNS = ["striped", "floral", "plain", "checked", "dotted", "printed"]
SUBCATEGORIES = {  # subcategory -> (category, noun)
    "shirts": ("tops", "shirt"),
    "dresses": ("dresses", "dress"),
    "jackets": ("outerwear", "jacket"),
    "sneakers": ("shoes", "sneakers"),
    "bags": ("accessories", "bag"),
}
FILLER = "for everyday wear with a comfortable fit and a modern look made to last season after season".split()


def _sha(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


ATTRIBUTES = ("color", "material", "pattern")


def make_products(n_products: int, seed: int = 0, subcategories: list[str] | None = None,
                  attributes: int = 3) -> list[dict]:
    """Attribute combinations are unique within a sub-category (up to 576 products each with all three
    attributes), so every sample-100 query has exactly one right answer. `attributes` < 3 leaves out pattern,
    then material (fewer things to tell apart)."""
    rng = np.random.default_rng(seed)
    subs = subcategories or list(SUBCATEGORIES)
    sizes = {"color": len(COLORS), "material": len(MATERIALS) if attributes >= 2 else 1,
             "pattern": len(PATTERNS) if attributes >= 3 else 1}
    n_combos = sizes["color"] * sizes["material"] * sizes["pattern"]
    if n_products > n_combos * len(subs):
        raise ValueError(f"at most {n_combos * len(subs)} distinct products with {len(subs)} sub-categories")
    combos = {sub: rng.permutation(n_combos) for sub in subs}
    products = []
    for i in range(n_products):
        sub = subs[i % len(subs)]
        c = int(combos[sub][i // len(subs)])
        color, rest = divmod(c, sizes["material"] * sizes["pattern"])
        material, pattern = divmod(rest, sizes["pattern"])
        products.append({
            "product_id": f"p{i:05d}",
            "subcategory": sub,
            "category": SUBCATEGORIES[sub][0],
            "color": color,
            "material": material,
            "pattern": pattern,
            "attributes": attributes,
            "group_id": f"g{i // 2:05d}",  # pairs of variants share a group, as colour variants of one style do
        })
    return products


def product_text(p: dict, extra_words: int = 0) -> str:
    n = p.get("attributes", 3)
    words = [COLORS[p["color"]]] + ([PATTERNS[p["pattern"]]] if n >= 3 else []) + \
        ([MATERIALS[p["material"]]] if n >= 2 else []) + [SUBCATEGORIES[p["subcategory"]][1]]
    filler = [FILLER[i % len(FILLER)] for i in range(extra_words)]
    return " ".join(words + filler)


class _Patterns:
    """Each attribute value switches on a fixed random set of feature channels (as a CNN's channels respond
    to a colour or a texture), placed where it shows on the grid; the sum stays additive and non-negative."""

    def __init__(self, grid: int, feature_dim: int, seed: int):
        rng = np.random.default_rng(seed + 1000)
        self.grid, self.feature_dim = grid, feature_dim
        k = max(2, feature_dim // 8)

        def table(n):
            t = np.zeros((n, feature_dim))
            for v in range(n):
                t[v, rng.choice(feature_dim, size=k, replace=False)] = 1.0
            return t

        self.sub = table(len(SUBCATEGORIES))
        self.color = table(len(COLORS))
        self.material = table(len(MATERIALS))
        self.pattern = table(len(PATTERNS))
        rows, cols = np.divmod(np.arange(grid * grid), grid)
        centre = (grid - 1) / 2
        self.object = (np.abs(rows - centre) <= grid / 3) & (np.abs(cols - centre) <= grid / 3)
        self.left = cols < grid / 2

    def image(self, p: dict, rng: np.random.Generator, noise: float) -> np.ndarray:
        sub_i = list(SUBCATEGORIES).index(p["subcategory"])
        f = np.zeros((self.grid * self.grid, self.feature_dim))
        f[:] = 0.5 * self.sub[sub_i]
        obj = self.object
        f[obj] += self.color[p["color"]]
        n = p.get("attributes", 3)
        if n >= 2:
            f[obj & self.left] += self.material[p["material"]]
        if n >= 3:
            f[obj & ~self.left] += self.pattern[p["pattern"]]
        return f + np.maximum(noise * rng.standard_normal(f.shape), 0.0)  # CNN features are non-negative


def write_fake_features(
    out: str | Path,
    n_products: int = 60,
    grid: int = 8,
    feature_dim: int = 32,
    images_per_product: int | Sequence[int] = 1,
    n_image_shards: int = 2,
    row_group_size: int = 16,
    seed: int = 0,
    noise: float = 0.3,
    extra_words: int = 0,
    tokenizer=None,
    max_text_len: int = 64,
    subcategories: list[str] | None = None,
    attributes: int = 3,
    success: bool = True,
) -> Path:
    """Write DIR/images-*.parquet, texts-*.parquet, rejects-*.parquet, _run.json and _SUCCESS. `images_per_product`:
    a count for every product, or counts that the products take in turn (a catalog with several photos for some)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        from fashionbert.model.backbone import load_tokenizer

        tokenizer = load_tokenizer(None)
    products = make_products(n_products, seed, subcategories, attributes)
    patterns = _Patterns(grid, feature_dim, seed)
    rng = np.random.default_rng(seed + 1)

    texts = [product_text(p, extra_words) for p in products]
    ids = tokenizer(texts, truncation=True, max_length=max_text_len)["input_ids"]
    text_table = pa.Table.from_pydict({
        "product_id": [p["product_id"] for p in products],
        "text": texts,
        "input_ids": [list(map(int, x)) for x in ids],
        "category": [p["category"] for p in products],
        "subcategory": [p["subcategory"] for p in products],
        "group_id": [p["group_id"] for p in products],
        "content_hash": [_sha(t) for t in texts],
    }, schema=TEXTS)
    pq.write_table(text_table, out / "texts-00000-of-00001.parquet")

    schema = images_schema(grid, feature_dim)
    rows = []
    counts = [images_per_product] if isinstance(images_per_product, int) else list(images_per_product)
    for i, p in enumerate(products):
        for k in range(counts[i % len(counts)]):
            rows.append((p, f"{p['product_id']}-{k}", patterns.image(p, rng, noise)))
    shards = np.array_split(np.arange(len(rows)), n_image_shards)
    for s, idx in enumerate(shards):
        sel = [rows[i] for i in idx]
        feats = np.stack([r[2] for r in sel]).astype(np.float16).reshape(-1) if sel else np.zeros(0, np.float16)
        n = grid * grid * feature_dim
        table = pa.Table.from_arrays([
            pa.array([r[1] for r in sel], pa.string()),
            pa.array([r[0]["product_id"] for r in sel], pa.string()),
            pa.array([f"fake://{r[1]}.jpg" for r in sel], pa.string()),
            pa.array([_sha(r[1]) for r in sel], pa.string()),
            pa.array([_sha("h" + r[1])[:16] for r in sel], pa.string()),
            pa.array([256] * len(sel), pa.int32()),
            pa.array([256] * len(sel), pa.int32()),
            pa.array([grid] * len(sel), pa.int16()),
            pa.array(["fake-cnn"] * len(sel), pa.string()),
            pa.array(["grid"] * len(sel), pa.string()),
            pa.FixedSizeListArray.from_arrays(pa.array(feats, pa.float16()), n),
        ], schema=schema)
        pq.write_table(table, out / f"images-{s:05d}-of-{n_image_shards:05d}.parquet", row_group_size=row_group_size)
    pq.write_table(REJECTS.empty_table(), out / "rejects-00000-of-00001.parquet")
    (out / "_run.json").write_text(json.dumps({"options": {
        "grid": grid, "cnn": "fake-cnn", "feature_dim": feature_dim, "max_text_len": max_text_len, "backbone": "minilm",
    }}))
    if success:
        (out / "_SUCCESS").write_text("")
    return out


TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def make_tiny_backbone(out: str | Path, layers: int = 2, hidden: int = 64, heads: int = 2, intermediate: int = 128,
                       with_mlm_head: bool = False, seed: int = 0) -> Path:
    """A random tiny BERT folder with the packaged WordPiece vocab. `with_mlm_head` writes the
    bert-base-uncased layout (BertForPreTraining: `bert.` prefixed encoder plus `cls.predictions.*`)."""
    import torch
    from transformers import BertConfig, BertForPreTraining, BertModel

    from fashionbert.model.backbone import resolve_backbone

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=intermediate, max_position_embeddings=128, type_vocab_size=2)
    model = BertForPreTraining(cfg) if with_mlm_head else BertModel(cfg)
    model.save_pretrained(str(out))
    src = resolve_backbone(None)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    return out

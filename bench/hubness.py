"""Hubness benchmark: how much the hubness correction (fashionbert/rank/hubness.py) adds to the itc cosine's Rank@1,
over temperatures, neighbour counts and banks. Prints figures; asserts nothing.

    python bench/hubness.py --features DIR --model DIR [--queries 1000] [--temperatures 0.02,0.03,0.05,0.07]
                            [--ks 10,32,0] [--rounds 1,5] [--marginals images] [--images first] [--min-photos 1]
                            [--bank held-out] [--vectors FILE]

Embeds the first image and the text of every held-out product (the training run's split; with `--bank training`
the training products' too), then ranks, by the cosine and by the corrected cosine at each temperature T,
neighbour count K (0: the whole bank) and number of rounds (the biases re-estimated over the other side's corrected
cosines; rank.hubness):
- sample-100: --queries held-out products, each against its true match and 100 others of its sub-category (the
  draw evaluate makes), text -> image and image -> text;
- the full gallery: every held-out text against every held-out image, and back (exact).
`--images all` ranks every held-out photo in the full gallery instead of each product's first (sample-100 keeps the
first: its pool has one image per product), and splits the gallery's Rank@1 into products with several photos and
products with one; `--marginals images,uniform` then compares weighing each text by its photos with weighing it one
(rank.hubness; on one image per product the two are the same). hm-dev has one photo per article: featurize it with
`--id-column product_code --text-columns prod_name,detail_desc` for a catalog whose colour variants are one
product's photos. `--min-photos N` (with `--images all`) keeps only the held-out products with at least N photos,
a catalog where every product has several (as Fashion-Gen's poses). `--bank held-out` takes each candidate's bias
over the held-out products themselves, the catalog being ranked: what evaluate and retrieve do. `--bank training`
takes it over the training products instead, a bank that shares no item with the queries (one round only: the
bank's own biases would be over a catalog nobody ranks).

Embedding is the slow part (~1 min for hm-dev's 1,662 held-out products on 2 cores, ~4 min with its training
products): --vectors FILE keeps the vectors (an .npz), and a rerun with the same file and model reads them instead.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fashionbert.data.feature_catalog import IndexedImages, open_catalog  # noqa: E402
from fashionbert.errors import UserError  # noqa: E402
from fashionbert.evaluation.evaluate import SplitOptions, held_out_products, rank_of_true  # noqa: E402
from fashionbert.evaluation.sample_hundred import draw_candidates, first_image_per_product  # noqa: E402
from fashionbert.model.loading import load_model  # noqa: E402
from fashionbert.rank.cross_encoder import CrossEncoderScorer  # noqa: E402
from fashionbert.rank.hubness import MARGINALS, Hubness, hubness_biases, neighbour_bias  # noqa: E402
from fashionbert.rank.neighbours import search  # noqa: E402
from fashionbert.rank.retrieve import dual_encoder_for, embed_all  # noqa: E402
from fashionbert.runtime import resolve_runtime  # noqa: E402

BANKS = ("held-out", "training")


def embed_products(features: list[str], model: str, with_training: bool, all_images: bool = False) -> dict:
    """Text and first-image vectors of the held-out products (and the training products'), with their
    sub-categories, under the model's version; with `all_images` also every held-out image's vector and its
    product's held-out position (`held_all_image`, `held_owner`)."""
    rt = resolve_runtime("auto", "auto", 0)
    loaded = load_model(model, rt)
    catalog = open_catalog(features, loaded)
    held_out, _ = held_out_products(SplitOptions(), loaded, catalog.texts.group_id)
    products, rows = first_image_per_product(catalog.index, np.arange(len(catalog.index)))
    scorer = CrossEncoderScorer(loaded.model, rt)
    dual = dual_encoder_for(scorer)
    out = {"version": np.asarray(loaded.version)}
    for side, keep in (("held", held_out[products]), ("train", ~held_out[products])):
        if side == "train" and not with_training:
            continue
        chosen = np.flatnonzero(keep)
        texts = [catalog.text_ids[p] for p in products[chosen]]
        images = IndexedImages(catalog.index, catalog.reader, rows[chosen])
        out[f"{side}_text"], out[f"{side}_image"] = embed_all(dual, texts, images, scorer.token_budget)
        out[f"{side}_subcategory"] = np.asarray([catalog.texts.subcategory[p] for p in products[chosen]])
    if all_images:
        held_products = products[held_out[products]]
        position = np.full(len(catalog.texts), -1)
        position[held_products] = np.arange(len(held_products))
        rows = np.flatnonzero(position[catalog.index.product] >= 0)
        out["held_owner"] = position[catalog.index.product[rows]]
        texts = [catalog.text_ids[p] for p in held_products]
        out["held_all_image"] = embed_all(dual, texts, IndexedImages(catalog.index, catalog.reader, rows),
                                          scorer.token_budget)[1]
    return out


def load_or_embed(a: argparse.Namespace) -> dict:
    with_training, all_images = a.bank == "training", a.images == "all"
    if a.vectors and Path(a.vectors).is_file():
        kept = dict(np.load(a.vectors))
        version = str(load_model(a.model, resolve_runtime("cpu", "fp32", 0)).version)
        if (str(kept["version"]) == version and (not with_training or "train_text" in kept)
                and (not all_images or "held_owner" in kept)):
            print(f"vectors: read from {a.vectors}", file=sys.stderr)
            return kept
    vectors = embed_products(a.features, a.model, with_training, all_images)
    if a.vectors:
        np.savez(a.vectors, **vectors)
    return vectors


def bias(bank: np.ndarray, items: np.ndarray, temperature: float, k: int) -> np.ndarray:
    """Each item's T log mean exp(cos / T) over its `k` nearest bank rows (0: all of them), exact."""
    found = search(bank, items, k or len(bank), "torch")
    return neighbour_bias(found, len(items), temperature)


def sample_hundred_rank1(sim: np.ndarray, draw, image_bias: np.ndarray, text_bias: np.ndarray) -> tuple[float, float]:
    """Rank@1 (%) both ways over one draw; `sim` is held-out texts x images, position = product."""
    t2i = [rank_of_true(sim[q, c] - image_bias[c]) == 1 for q, c in zip(draw.queries, draw.candidates)]
    i2t = [rank_of_true(sim[c, q] - text_bias[c]) == 1 for q, c in zip(draw.queries, draw.candidates)]
    return 100 * float(np.mean(t2i)), 100 * float(np.mean(i2t))


def gallery_rank1(sim: np.ndarray, image_bias: np.ndarray, text_bias: np.ndarray, owner: np.ndarray,
                  keep_texts: np.ndarray | None = None) -> tuple[float, float]:
    """Rank@1 (%) of every held-out text among every gallery image (first when one of its own images outscores every
    other product's) and of every gallery image among the texts (`owner`: each image's text), over the texts in
    `keep_texts` and their images (None: all); ties count against the true one."""
    t2i = sim - image_bias[None, :]
    own = owner[None, :] == np.arange(len(sim))[:, None]
    t2i_first = np.where(own, t2i, -np.inf).max(1) > np.where(own, -np.inf, t2i).max(1)
    i2t = sim.T - text_bias[None, :]
    true = i2t[np.arange(len(owner)), owner]
    i2t_first = (i2t >= true[:, None]).sum(1) == 1
    keep = np.ones(len(sim), dtype=bool) if keep_texts is None else keep_texts
    return tuple(100 * float(first.mean()) if len(first) else float("nan")
                 for first in (t2i_first[keep], i2t_first[keep[owner]]))


def with_min_photos(v: dict, n: int) -> dict:
    """The held-out vectors of the products with at least `n` photos only."""
    photos = np.bincount(v["held_owner"], minlength=len(v["held_text"]))
    keep = photos >= n
    position = np.cumsum(keep) - 1
    photo_kept = keep[v["held_owner"]]
    return {**v, **{f"held_{k}": v[f"held_{k}"][keep] for k in ("text", "image", "subcategory")},
            "held_all_image": v["held_all_image"][photo_kept], "held_owner": position[v["held_owner"][photo_kept]]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--features", action="append", required=True, metavar="DIR",
                   help="the featurize folder(s) the model trained on (repeat for several)")
    p.add_argument("--model", required=True, metavar="DIR", help="model folder (OUT/model of fashionbert train)")
    p.add_argument("--queries", type=int, default=1000, help="sample-100 query products (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample-100 draw (default 0)")
    p.add_argument("--temperatures", default="0.02,0.03,0.05,0.07",
                   help="comma-separated temperatures T (default 0.02,0.03,0.05,0.07)")
    p.add_argument("--ks", default="10,32,0", help="comma-separated neighbour counts K, 0 = the whole bank "
                                                   "(default 10,32,0)")
    p.add_argument("--rounds", default="1,5", help="comma-separated numbers of rounds (default 1,5)")
    p.add_argument("--marginals", default="images",
                   help="comma-separated text weights: images (its number of photos), uniform (default images)")
    p.add_argument("--images", choices=("first", "all"), default="first",
                   help="the full gallery's images: each held-out product's first, or all its photos (default first)")
    p.add_argument("--min-photos", type=int, default=1, metavar="N",
                   help="with --images all: only the held-out products with at least N photos (default 1: all)")
    p.add_argument("--bank", choices=BANKS, default="held-out",
                   help="whose texts and images each candidate's bias is over (default held-out)")
    p.add_argument("--vectors", metavar="FILE", help="an .npz to keep the vectors in and read them back from")
    a = p.parse_args()
    try:
        temperatures = [float(t) for t in a.temperatures.split(",")]
        ks = [int(k) for k in a.ks.split(",")]
        rounds = [int(r) for r in a.rounds.split(",")]
        marginals = a.marginals.split(",")
    except ValueError as exc:
        raise SystemExit(f"bench/hubness.py: --temperatures / --ks / --rounds: comma-separated numbers, e.g. "
                         f"0.03,0.05, 10,0 and 1,5 ({exc})")
    if any(t <= 0 for t in temperatures) or any(k < 0 for k in ks) or any(r < 1 for r in rounds) or a.queries < 1:
        raise SystemExit("bench/hubness.py: temperatures must be > 0, --ks >= 0, --rounds >= 1 and --queries >= 1")
    if not set(marginals) <= set(MARGINALS):
        raise SystemExit(f"bench/hubness.py: --marginals {a.marginals!r}: comma-separated, each one of "
                         f"{', '.join(MARGINALS)}")
    if a.min_photos < 1 or (a.min_photos > 1 and a.images != "all"):
        raise SystemExit("bench/hubness.py: --min-photos N takes N >= 1, and N > 1 needs --images all")
    if a.bank == "training" and (rounds != [1] or a.images == "all"):
        raise SystemExit("bench/hubness.py: --bank training takes --rounds 1 and --images first (later rounds and "
                         "the marginals need the bank's own biases over the catalog being ranked)")
    try:
        v = load_or_embed(a)
    except UserError as exc:
        raise SystemExit(f"bench/hubness.py: {exc}")
    if a.min_photos > 1:
        v = with_min_photos(v, a.min_photos)
    texts, images = v["held_text"], v["held_image"]
    bank_texts, bank_images = (texts, images) if a.bank == "held-out" else (v["train_text"], v["train_image"])
    sim = texts @ images.T
    gallery_images, owner = ((v["held_all_image"], v["held_owner"]) if a.images == "all"
                             else (images, np.arange(len(images))))
    gallery_sim = texts @ gallery_images.T
    photos = np.bincount(owner, minlength=len(texts))
    split = [photos > 1, photos == 1]  # the gallery split by the query's product, where it has both kinds
    subsets = [None] + (split if all(s.any() for s in split) else [])
    draw = draw_candidates(list(v["held_subcategory"]), a.queries, 100, 1, a.seed)[0]
    print(f"{len(texts)} held-out products; sample-100 over {len(draw.queries)} queries (seed {a.seed}); full "
          f"gallery over {len(gallery_images)} images ({int((photos > 1).sum())} products with several photos, "
          f"{int(photos[photos > 1].sum())} photos); bank: {a.bank} ({len(bank_texts)} products). Rank@1 (%), "
          f"text -> image / image -> text:\n")
    head = " | full gallery" + (": all | several photos | one photo" if len(subsets) > 1 else "")
    print(f"| ranked by | sample-100{head} |\n|{' --- |' * (2 + len(subsets))}")

    def row(label: str, pool: tuple[np.ndarray, np.ndarray], gallery: tuple[np.ndarray, np.ndarray], base=None):
        cells = [sample_hundred_rank1(sim, draw, *pool)] + [gallery_rank1(gallery_sim, *gallery, owner, keep)
                                                            for keep in subsets]
        text = " | ".join(f"{c[0]:.1f} / {c[1]:.1f}" + (f" ({c[0] - b[0]:+.1f} / {c[1] - b[1]:+.1f})" if base else "")
                          for c, b in zip(cells, base or cells))
        print(f"| {label} | {text} |")
        return cells
    zero = (np.zeros(len(images)), np.zeros(len(texts)))
    base = row("the cosine", zero, (np.zeros(len(gallery_images)), zero[1]))
    for t in temperatures:
        for k in ks:
            for r in rounds:
                for m in marginals:
                    hubness = Hubness(t, k or max(len(texts), len(gallery_images)), r, m)
                    if a.bank == "held-out":  # what retrieve and evaluate compute, over the catalog being ranked
                        pool = hubness_biases(texts, images, hubness, "torch")
                        gallery = pool if a.images == "first" else hubness_biases(texts, gallery_images, hubness,
                                                                                  "torch", image_text=owner)
                        pool, gallery = (pool.image, pool.text), (gallery.image, gallery.text)
                    else:
                        pool = gallery = (bias(bank_texts, images, t, k), bias(bank_images, texts, t, k))
                    label = (f"corrected, T {t:g}, K {k or 'all'}, {r} round{'s' if r > 1 else ''}"
                             + (f", {m} marginals" if a.images == "all" or len(marginals) > 1 else ""))
                    row(label, pool, gallery, base)


if __name__ == "__main__":
    main()

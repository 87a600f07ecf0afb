"""Hubness benchmark: how much the hubness correction (fashionbert/rank/hubness.py) adds to the itc cosine's Rank@1,
over temperatures, neighbour counts and banks. Prints figures; asserts nothing.

    python bench/hubness.py --features DIR --model DIR [--queries 1000] [--temperatures 0.02,0.03,0.05,0.07]
                            [--ks 10,32,0] [--rounds 1,5] [--bank held-out] [--vectors FILE]

Embeds the first image and the text of every held-out product (the training run's split; with `--bank training`
the training products' too), then ranks, by the cosine and by the corrected cosine at each temperature T,
neighbour count K (0: the whole bank) and number of rounds (the biases re-estimated over the other side's corrected
cosines; rank.hubness):
- sample-100: --queries held-out products, each against its true match and 100 others of its sub-category (the
  draw evaluate makes), text -> image and image -> text;
- the full gallery: every held-out text against every held-out image, and back (exact).
`--bank held-out` takes each candidate's bias over the held-out products themselves, the catalog being ranked: what
evaluate and retrieve do. `--bank training` takes it over the training products instead, a bank that shares no item
with the queries (one round only: the bank's own biases would be over a catalog nobody ranks).

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
from fashionbert.rank.hubness import Hubness, hubness_biases, neighbour_bias  # noqa: E402
from fashionbert.rank.neighbours import search  # noqa: E402
from fashionbert.rank.retrieve import dual_encoder_for, embed_all  # noqa: E402
from fashionbert.runtime import resolve_runtime  # noqa: E402

BANKS = ("held-out", "training")


def embed_products(features: list[str], model: str, with_training: bool) -> dict:
    """Text and first-image vectors of the held-out products (and the training products'), with their
    sub-categories, under the model's version."""
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
    return out


def load_or_embed(a: argparse.Namespace) -> dict:
    with_training = a.bank == "training"
    if a.vectors and Path(a.vectors).is_file():
        kept = dict(np.load(a.vectors))
        version = str(load_model(a.model, resolve_runtime("cpu", "fp32", 0)).version)
        if str(kept["version"]) == version and (not with_training or "train_text" in kept):
            print(f"vectors: read from {a.vectors}", file=sys.stderr)
            return kept
    vectors = embed_products(a.features, a.model, with_training)
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


def gallery_rank1(sim: np.ndarray, image_bias: np.ndarray, text_bias: np.ndarray) -> tuple[float, float]:
    """Rank@1 (%) of every held-out text among every held-out image and back; ties count against the true one."""
    t2i = sim - image_bias[None, :]
    i2t = sim.T - text_bias[None, :]
    return tuple(100 * float(((m >= np.diag(m)[:, None]).sum(1) == 1).mean()) for m in (t2i, i2t))


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
    p.add_argument("--bank", choices=BANKS, default="held-out",
                   help="whose texts and images each candidate's bias is over (default held-out)")
    p.add_argument("--vectors", metavar="FILE", help="an .npz to keep the vectors in and read them back from")
    a = p.parse_args()
    try:
        temperatures = [float(t) for t in a.temperatures.split(",")]
        ks = [int(k) for k in a.ks.split(",")]
        rounds = [int(r) for r in a.rounds.split(",")]
    except ValueError as exc:
        raise SystemExit(f"bench/hubness.py: --temperatures / --ks / --rounds: comma-separated numbers, e.g. "
                         f"0.03,0.05, 10,0 and 1,5 ({exc})")
    if any(t <= 0 for t in temperatures) or any(k < 0 for k in ks) or any(r < 1 for r in rounds) or a.queries < 1:
        raise SystemExit("bench/hubness.py: temperatures must be > 0, --ks >= 0, --rounds >= 1 and --queries >= 1")
    if a.bank == "training" and rounds != [1]:
        raise SystemExit("bench/hubness.py: --bank training takes --rounds 1 (later rounds need the bank's own "
                         "biases over the catalog being ranked)")
    try:
        v = load_or_embed(a)
    except UserError as exc:
        raise SystemExit(f"bench/hubness.py: {exc}")
    texts, images = v["held_text"], v["held_image"]
    bank_texts, bank_images = (texts, images) if a.bank == "held-out" else (v["train_text"], v["train_image"])
    sim = texts @ images.T
    draw = draw_candidates(list(v["held_subcategory"]), a.queries, 100, 1, a.seed)[0]
    zero_i, zero_t = np.zeros(len(images)), np.zeros(len(texts))
    print(f"{len(texts)} held-out products; sample-100 over {len(draw.queries)} queries (seed {a.seed}); bank: "
          f"{a.bank} ({len(bank_texts)} products). Rank@1 (%), text -> image / image -> text:\n")
    print("| ranked by | sample-100 | full gallery |\n| --- | --- | --- |")
    base = sample_hundred_rank1(sim, draw, zero_i, zero_t), gallery_rank1(sim, zero_i, zero_t)
    print(f"| the cosine | {base[0][0]:.1f} / {base[0][1]:.1f} | {base[1][0]:.1f} / {base[1][1]:.1f} |")
    for t in temperatures:
        for k in ks:
            for r in rounds:
                if a.bank == "held-out":  # what retrieve and evaluate compute
                    b = hubness_biases(texts, images, Hubness(t, k or len(texts), r), "torch")
                    image_bias, text_bias = b.image, b.text
                else:
                    image_bias, text_bias = bias(bank_texts, images, t, k), bias(bank_images, texts, t, k)
                s = sample_hundred_rank1(sim, draw, image_bias, text_bias)
                g = gallery_rank1(sim, image_bias, text_bias)
                print(f"| corrected, T {t:g}, K {k or 'all'}, {r} round{'s' if r > 1 else ''} | {s[0]:.1f} / "
                      f"{s[1]:.1f} ({s[0] - base[0][0]:+.1f} / {s[1] - base[0][1]:+.1f}) | {g[0]:.1f} / {g[1]:.1f} "
                      f"({g[0] - base[1][0]:+.1f} / {g[1] - base[1][1]:+.1f}) |")


if __name__ == "__main__":
    main()

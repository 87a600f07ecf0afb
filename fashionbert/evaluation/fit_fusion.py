"""fashionbert fuse: fit a model folder's ranking score on held-out products.

    fashionbert fuse --features DIR --model DIR [--queries 500]

The ranking score of retrieve, score-pairs and evaluate is P(aligned) = sigmoid(a x TIA margin + b x itc cosine
+ c), three numbers in MODEL/score_fusion.json (with the cosine hubness-corrected unless --hubness-temperature 0 or
the correction ranks the held-out queries worse) (fashionbert/model/score_fusion.py says why). Training fits them at every
validation and saves them with the checkpoint; this command fits them for a model folder after the fact: a
model trained before the file existed (which ranks by TIA alone), a checkpoint saved between validations, or
a refit on more held-out queries than training's quick validation used. It scores each query text against its
image and up to --candidates same-sub-category images of held-out products (the training run's split, as
`fashionbert evaluate` reads it), fits, reports text->image Rank@1 by each head and by the fused score
(cross-fitted), and replaces MODEL/score_fusion.json atomically. The model version changes with it.

Imports torch, numpy and pyarrow only.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np

from fashionbert.data import storage
from fashionbert.data.feature_catalog import open_catalog
from fashionbert.errors import UserError
from fashionbert.evaluation.evaluate import SplitOptions, add_split_arguments, held_out_products
from fashionbert.evaluation.quick_validation import validate
from fashionbert.evaluation.sample_hundred import build_sample_hundred
from fashionbert.model.loading import load_model, model_version
from fashionbert.rank.hubness import HubnessOptions, add_hubness_arguments
from fashionbert.runtime import RuntimeOptions, add_runtime_arguments, resolve_runtime, stage_config


@dataclasses.dataclass(frozen=True)
class FuseConfig(SplitOptions, HubnessOptions, RuntimeOptions):
    features: list[str] = dataclasses.field(default_factory=list)  # featurize output folders
    model: str = ""
    queries: int = 500
    candidates: int = 100
    max_pool: int = 2000
    seed: int = 0


def config_from_args(args: argparse.Namespace) -> FuseConfig:
    return stage_config(FuseConfig, args)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = FuseConfig()
    g = parser.add_argument_group("inputs and outputs")
    g.add_argument("--features", action="append", required=True, metavar="DIR",
                   help="featurize output folder(s) the model trained on (its held-out products are fitted on)")
    g.add_argument("--model", required=True, metavar="DIR",
                   help="model folder (OUT/model or a checkpoint of `fashionbert train`); its score_fusion.json is "
                        "written or replaced")
    add_split_arguments(parser)
    g = parser.add_argument_group("pairs to fit on")
    g.add_argument("--queries", type=int, default=d.queries,
                   help="held-out query products; each gives its true pair and up to --candidates negatives "
                        "(default %(default)s)")
    g.add_argument("--candidates", type=int, default=d.candidates,
                   help="other held-out products per query, same sub-category first (default %(default)s)")
    g.add_argument("--max-pool", type=int, default=d.max_pool,
                   help="held-out images kept in memory as candidates (default %(default)s)")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of the query and candidate draw (default 0)")
    add_hubness_arguments(parser, fits=True)
    add_runtime_arguments(parser)


def run(args: FuseConfig) -> dict:
    t_start = time.time()
    for name in ("queries", "candidates", "max_pool"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    if storage.is_remote(args.model):
        raise UserError(f"--model {args.model}: fuse writes score_fusion.json into the model folder, so it must be a "
                        f"local folder; copy it here (e.g. `gsutil -m cp -r {args.model} DIR`), fuse DIR, then upload "
                        f"DIR")
    hubness = args.hubness  # checked before any work
    rt = resolve_runtime(args.device, args.precision, args.num_threads)
    loaded = load_model(args.model, rt)
    if not loaded.has_itc_head:
        raise UserError(f"--model {loaded.folder} has no itc head (trained with --itc-dim 0): its ranking score is "
                        f"the TIA head alone and there is nothing to fuse")
    catalog = open_catalog(args.features, loaded)
    held_out, split_info = held_out_products(args, loaded, catalog.texts.group_id)
    rows = np.flatnonzero(held_out[catalog.index.product])
    s100 = build_sample_hundred(catalog.texts, catalog.index, rows, catalog.reader, queries=args.queries,
                                candidates=args.candidates, max_pool=args.max_pool, seed=args.seed)
    if s100 is None:
        raise UserError("fewer than 2 held-out products with an image in --features: nothing to fit on; use --split "
                        "all, a larger --val-fraction, or featurize more products")
    previous = loaded.fusion
    metrics, fusion = validate(loaded.model, s100, loaded.config, rt, hubness)
    fusion = dataclasses.replace(fusion, fitted=fusion.fitted | {"source": "fashionbert fuse", "split": split_info,
                                                                 "seed": args.seed})
    fusion.save(loaded.folder)
    return {
        "model": str(loaded.folder), "version_before": loaded.version,
        "version": model_version(loaded.folder, loaded.step),
        "previous": previous.to_dict(), "fusion": fusion.to_dict(), "ranking_score": fusion.describe(),
        "validation": {k: v for k, v in metrics.items() if k != "ranking"},
        "seconds": round(time.time() - t_start, 3),
    }

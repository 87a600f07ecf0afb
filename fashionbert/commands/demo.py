"""The first thing a new user runs (`./run_pipeline.sh demo`): the nightly flow on the synthetic catalog.

A second run reuses the catalog and carries unchanged features over (`--previous`), so it is quick.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import TYPE_CHECKING

from fashionbert.errors import UserError
from fashionbert.runtime import stage_config

if TYPE_CHECKING:  # training imports torch: the demo imports it when it trains
    from fashionbert.train.config import TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_OUT = os.path.join(REPO, "demo-out")  # README's `demo-out/`, ignored by git


def _catalog(out: str, products: int, seed: int) -> str:
    from fashionbert.data import synth

    folder = os.path.join(out, "catalog")
    manifest = os.path.join(folder, "manifest.csv")
    stamp = os.path.join(folder, "_synth.json")
    wanted = {"products": products, "seed": seed, "generator": synth.GENERATOR_VERSION}
    if os.path.isfile(manifest) and os.path.isfile(stamp):
        with open(stamp) as fh:
            if json.load(fh) == wanted:
                return manifest
    synth.write_catalog(folder, products, seed)
    with open(stamp, "w") as fh:
        json.dump(wanted, fh)
    return manifest


# Short on purpose: the demo shows the flow within ~10 minutes on 2 cores (training ~5 of them); real training
# runs far longer. Validation once, at the end: on a CPU each one costs as much as ~20 training steps.
DEMO_TRAIN = {"steps": 160, "batch_size": 16, "lr": 3e-4, "tia_warmup": 0.2, "val_fraction": 0.2, "val_every": 0,
              "val_queries": 50, "checkpoint_every": 0}


# Evaluation and retrieval settings sized so the whole demo stays within minutes on 2 cores.
DEMO_EVAL = {"queries": 50, "draws": 1, "recall_k": 10}
DEMO_RETRIEVE = {"top_k": 10, "recall_k": 10, "overwrite": True}
RECIPE_STAMP = "_demo_recipe.json"


def _unchanged(counts: dict) -> bool:
    images, texts = counts["images"], counts["text_rows"]
    return not (images["computed"] or images["deleted"] or texts["computed"] or texts["deleted"])


def _recipe(config: TrainConfig) -> dict:
    """Everything training runs with but its folders: a model is reused only for the same recipe."""
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in ("features", "out", "progress")}


def _train(features: str, out: str, reuse: bool) -> dict:
    """Train, or reuse the last demo's model when the features are unchanged and it was trained with these
    settings (a model from an older demo recipe is retrained)."""
    from fashionbert.train import trainer
    from fashionbert.train.config import TrainConfig

    config = TrainConfig(features=[features], out=out, **DEMO_TRAIN)
    model = os.path.join(out, "model")
    summary_path = os.path.join(out, "summary.json")
    stamp = os.path.join(out, RECIPE_STAMP)
    if reuse and os.path.isfile(os.path.join(model, "config.json")) and os.path.isfile(summary_path) \
            and os.path.isfile(stamp):
        with open(stamp) as fh:
            same_recipe = json.load(fh) == _recipe(config)
        if same_recipe:
            with open(summary_path) as fh:
                return {**json.load(fh), "reused": True}
    if os.path.isdir(out):
        import shutil

        shutil.rmtree(out)  # features or recipe changed: the old checkpoints must not be resumed
    summary = trainer.run(config)
    with open(stamp, "w") as fh:
        json.dump(_recipe(config), fh)
    return summary


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    out: str = DEFAULT_OUT
    products: int = 300
    seed: int = 0


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    return stage_config(DemoConfig, args)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = DemoConfig()
    parser.add_argument("--out", default=d.out, help="demo output folder (default %(default)s)")
    parser.add_argument("--products", type=int, default=d.products, help="synthetic products (default %(default)s)")
    parser.add_argument("--seed", type=int, default=d.seed)


def run(config: DemoConfig) -> dict:
    from fashionbert.data import publish
    from pipelines.config import FeaturizeConfig
    from pipelines.featurize import run as featurize

    out = config.out
    manifest = _catalog(out, config.products, config.seed)
    features = os.path.join(out, "features")
    previous = features if publish.is_complete(features) else None
    cfg = FeaturizeConfig(catalog=manifest, out=features, previous=previous, overwrite=True)
    summary = featurize(cfg)
    trained = _train(features, os.path.join(out, "train"), reuse=previous is not None and _unchanged(summary["counts"]))
    from fashionbert.evaluation import evaluate, report
    from fashionbert.rank import retrieve

    model = os.path.join(out, "train", "model")
    metrics_path = os.path.join(out, "metrics.json")
    metrics = evaluate.run(evaluate.EvaluateConfig(features=[features], model=model, out=metrics_path, **DEMO_EVAL))
    tables = os.path.join(out, "retrieval")
    retrieve.run(retrieve.RetrieveConfig(features=[features], model=model, out=tables, **DEMO_RETRIEVE))
    page = os.path.join(out, "report.html")
    report.run(report.ReportConfig(retrieval=tables, metrics=metrics_path, training=os.path.join(out, "train"),
                                   features=[features], out=page))
    return {"catalog": manifest, "features": features, "featurize": summary, "train": trained, "model": model,
            "metrics_path": metrics_path, "metrics": metrics, "retrieval": tables, "report": page}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="run_pipeline.sh demo", description=__doc__.split("\n")[0])
    add_arguments(parser)
    config = config_from_args(parser.parse_args(argv))
    from fashionbert.logs import setup_logging

    setup_logging()
    try:
        result = run(config)
    except UserError as err:
        print(f"demo: error: {err}", file=sys.stderr)
        return 2
    c = result["featurize"]["counts"]
    print("\nDemo finished. Outputs:")
    print(f"  catalog   {result['catalog']}")
    print(f"  features  {result['features']}  ({c['accepted_images']} images, {c['texts']} texts, "
          f"{c['rejected_rows']} rejects; computed {c['images']['computed']}, carried {c['images']['carried']})")
    print(f"  run info  {os.path.join(result['features'], '_run.json')}")
    t = result["train"]
    val = t.get("validation") or {}
    reused = " (reused: features unchanged)" if t.get("reused") else ""
    print(f"  model     {result['model']}{reused}  step {t.get('final_step')}, validation sample-100 Rank@1 "
          f"text->image {val.get('rank1_t2i')}, TIA AUC {val.get('tia_auc')}")
    print(f"  curves    {os.path.join(os.path.dirname(result['model']), 'training_curves.png')}")
    print(f"  metrics   {result['metrics_path']}")
    print(f"  tables    {os.path.join(result['retrieval'], 'text_to_image.parquet')}, "
          f"{os.path.join(result['retrieval'], 'image_to_text.parquet')}")
    print(f"  report    {result['report']}")
    print("Headline metrics (a demo-length model: expect modest numbers):")
    from fashionbert.evaluation.evaluate import headline

    for name, value in headline(result["metrics"]).items():
        print(f"  {name:32s} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The first thing a new user runs (`./run_pipeline.sh demo`): the nightly flow on the synthetic catalog.

A second run reuses the catalog and carries unchanged features over (`--previous`), so it is quick.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import UserError

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo-out")


def _catalog(out: str, products: int, seed: int) -> str:
    from . import synth

    folder = os.path.join(out, "catalog")
    manifest = os.path.join(folder, "manifest.csv")
    stamp = os.path.join(folder, "_synth.json")
    wanted = {"products": products, "seed": seed}
    if os.path.isfile(manifest) and os.path.isfile(stamp):
        with open(stamp) as fh:
            if json.load(fh) == wanted:
                return manifest
    synth.write_catalog(folder, products, seed)
    with open(stamp, "w") as fh:
        json.dump(wanted, fh)
    return manifest


def run(out: str, products: int, seed: int) -> dict:
    from pipelines.config import FeaturizeConfig
    from pipelines.featurize import run as featurize

    from . import publish

    manifest = _catalog(out, products, seed)
    features = os.path.join(out, "features")
    previous = features if publish.is_complete(features) else None
    cfg = FeaturizeConfig(catalog=manifest, out=features, previous=previous, overwrite=True)
    summary = featurize(cfg)
    return {"catalog": manifest, "features": features, "featurize": summary}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="run_pipeline.sh demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help="demo output folder (default %(default)s)")
    parser.add_argument("--products", type=int, default=300, help="synthetic products (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        result = run(args.out, args.products, args.seed)
    except UserError as err:
        print(f"demo: error: {err}", file=sys.stderr)
        return 2
    c = result["featurize"]["counts"]
    print("\nDemo finished. Outputs:")
    print(f"  catalog   {result['catalog']}")
    print(f"  features  {result['features']}  ({c['accepted_images']} images, {c['texts']} texts, "
          f"{c['rejected_rows']} rejects; computed {c['images']['computed']}, carried {c['images']['carried']})")
    print(f"  run info  {os.path.join(result['features'], '_run.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`fashionbert synth`: write the built-in synthetic catalog (fashionbert/data/synth.py draws it)."""
from __future__ import annotations

import argparse
import dataclasses

from fashionbert.errors import UserError
from fashionbert.runtime import stage_config


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    out: str = ""
    products: int = 500
    seed: int = 0


def config_from_args(args: argparse.Namespace) -> SynthConfig:
    return stage_config(SynthConfig, args)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = SynthConfig()
    parser.add_argument("--out", required=True, help="folder to write the catalog into")
    parser.add_argument("--products", type=int, default=d.products, help="number of products (default %(default)s)")
    parser.add_argument("--seed", type=int, default=d.seed,
                        help="random seed; the same seed gives the same catalog")


def run(config: SynthConfig) -> dict:
    from fashionbert.data import synth

    if config.products <= 0:
        raise UserError(f"--products must be positive, got {config.products}")
    return {"products": config.products, "manifest": synth.write_catalog(config.out, config.products, config.seed)}

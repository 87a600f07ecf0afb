"""`fashionbert` command line: one subcommand per stage; each reads named inputs and writes under --out.

Heavy imports (Beam, torch) happen inside the subcommand that needs them, so `--help` is instant and the
GPU box (no Beam) can still run training and scoring.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from .errors import UserError


def _synth(args: argparse.Namespace) -> None:
    from . import synth

    if args.products <= 0:
        raise UserError(f"--products must be positive, got {args.products}")
    path = synth.write_catalog(args.out, args.products, args.seed)
    print(f"synthetic catalog: {args.products} products -> {path}")


def _featurize(args: argparse.Namespace, beam_args: list[str]) -> None:
    from pipelines.config import config_from_args
    from pipelines.featurize import run

    summary = run(config_from_args(args), beam_args)
    c = summary["counts"]
    print(f"featurize: {c['input_rows']} catalog rows -> {c['accepted_images']} images, {c['texts']} texts, "
          f"{c['rejected_rows']} rejects; images computed {c['images']['computed']}, carried "
          f"{c['images']['carried']}, deleted {c['images']['deleted']} ({summary['elapsed_s']} s) -> {args.out}")


def _train(args: argparse.Namespace) -> None:
    from . import train

    summary = train.run(args)
    print(json.dumps(summary, indent=2, default=str))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fashionbert", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="write the built-in synthetic catalog (manifest.csv + images/)")
    s.add_argument("--out", required=True, help="folder to write the catalog into")
    s.add_argument("--products", type=int, default=500, help="number of products (default %(default)s)")
    s.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same catalog")

    from pipelines.config import add_arguments as featurize_arguments

    f = sub.add_parser(
        "featurize", help="catalog -> Parquet feature shards (Apache Beam)",
        description="Catalog -> images/texts/rejects Parquet shards + _run.json. Unrecognised options (--runner, "
                    "--direct_num_workers, --project, --setup_file, ...) go to Beam's PipelineOptions.")
    featurize_arguments(f)

    from . import nightly

    n = sub.add_parser("nightly", help="scheduled run: incremental featurize against latest, ... , move latest",
                       description=nightly.__doc__)
    nightly.add_arguments(n)
    b = sub.add_parser("backfill", help="like nightly, but recompute everything from scratch",
                       description=nightly.__doc__)
    nightly.add_arguments(b)

    try:
        from . import train
    except ImportError:
        train = None
    if train is not None and hasattr(train, "add_arguments"):
        t = sub.add_parser("train", help="train FashionBERT on featurize outputs (PyTorch)")
        train.add_arguments(t)
    return parser


class _QuietBeamImports(logging.Filter):
    """Beam warns on import that Google Cloud client libraries are absent: true, and irrelevant unless the
    user runs on Dataflow (where setup.py installs them). Keep stderr for messages that need action."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "apitools not found" not in record.getMessage()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_QuietBeamImports())
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args, extra = parser.parse_known_args(argv)
    if args.command in ("nightly", "backfill"):
        from . import nightly

        return nightly.main(argv[1:], from_scratch=args.command == "backfill")
    if extra and args.command != "featurize":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from schemas import SchemaError

    try:
        if args.command == "synth":
            _synth(args)
        elif args.command == "featurize":
            _featurize(args, extra)
        elif args.command == "train":
            _train(args)
    except (UserError, SchemaError) as err:
        print(f"fashionbert {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fashionbert {args.command}: interrupted; no partial output was published", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

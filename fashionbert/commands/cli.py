"""`fashionbert` command line: one subcommand per stage; each reads named inputs and writes under --out.

Heavy imports (Beam, torch) happen inside the subcommand that needs them, so `--help` is instant and the
GPU box (no Beam) can still run training and scoring.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from fashionbert.errors import UserError


def _synth(args: argparse.Namespace) -> None:
    from fashionbert.data import synth

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


def _run_module(name: str, args: argparse.Namespace) -> None:
    import importlib

    summary = importlib.import_module(name).run(args)
    print(json.dumps(summary, indent=2, default=str))


MODULE_COMMANDS = {"train": "fashionbert.train.trainer", "fuse": "fashionbert.evaluation.fit_fusion",
                   "score-pairs": "fashionbert.rank.score_pairs", "evaluate": "fashionbert.evaluation.evaluate",
                   "retrieve": "fashionbert.rank.retrieve", "report": "fashionbert.evaluation.report"}


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

    from fashionbert.commands import nightly

    for name, help_text in (
        ("nightly", "scheduled run: incremental featurize against latest, train (optional), retrieval tables, "
                    "evaluate, then move latest"),
        ("backfill", "like nightly, but featurize everything from scratch"),
    ):
        nightly.add_arguments(sub.add_parser(name, help=help_text, description=nightly.__doc__,
                                             formatter_class=argparse.RawDescriptionHelpFormatter))

    from fashionbert.evaluation import evaluate
    from fashionbert.evaluation import fit_fusion as fuse
    from fashionbert.evaluation import report
    from fashionbert.rank import retrieve, score_pairs
    from fashionbert.train import trainer as train

    for name, module, help_text in (
        ("train", train, "train FashionBERT on featurize outputs (PyTorch)"),
        ("fuse", fuse, "fit a model folder's ranking score (TIA margin + itc cosine) on held-out products"),
        ("score-pairs", score_pairs, "the ranking score P(aligned) for given (product_id, image_id) pairs"),
        ("evaluate", evaluate, "sample-100, TIA and full-gallery metrics -> metrics.json"),
        ("retrieve", retrieve, "two-stage retrieval tables: text_to_image.parquet, image_to_text.parquet"),
        ("report", report, "static HTML page: sample queries with their top images, metrics, training curves"),
    ):
        module.add_arguments(sub.add_parser(name, help=help_text, description=module.__doc__))
    return parser


class _QuietBeamImports(logging.Filter):
    """Beam warns on import that Google Cloud client libraries are absent: true, and irrelevant unless the
    user runs on Dataflow (where setup.py installs them). Keep stderr for messages that need action."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "apitools not found" not in record.getMessage()


def quiet_beam_import_warning() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_QuietBeamImports())


def main(argv: list[str] | None = None) -> int:
    quiet_beam_import_warning()
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args, extra = parser.parse_known_args(argv)
    if args.command in ("nightly", "backfill"):
        from fashionbert.commands import nightly

        return nightly.main(argv[1:], from_scratch=args.command == "backfill")
    if extra and args.command != "featurize":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from schemas import SchemaError

    try:
        if args.command == "synth":
            _synth(args)
        elif args.command == "featurize":
            _featurize(args, extra)
        else:
            _run_module(MODULE_COMMANDS[args.command], args)
    except (UserError, SchemaError) as err:
        print(f"fashionbert {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fashionbert {args.command}: interrupted; no partial output was published", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`fashionbert` command line: one subcommand per stage; each reads named inputs and writes under --out.

Heavy imports (Beam, torch) happen inside the subcommand that needs them, so `--help` is instant and the
GPU box (no Beam) can still run training and scoring.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys

from fashionbert.errors import UserError


# subcommand: (module with add_arguments and config_from_args, module with run(config), help)
STAGES = {
    "synth": ("fashionbert.commands.synth", "fashionbert.commands.synth",
              "write the built-in synthetic catalog (manifest.csv + images/)"),
    "featurize": ("pipelines.config", "pipelines.featurize", "catalog -> Parquet feature shards (Apache Beam)"),
    "train": ("fashionbert.train.config", "fashionbert.train.trainer",
              "train FashionBERT on featurize outputs (PyTorch)"),
    "fuse": ("fashionbert.evaluation.fit_fusion", "fashionbert.evaluation.fit_fusion",
             "fit a model folder's ranking score (TIA margin + itc cosine) on held-out products"),
    "score-pairs": ("fashionbert.rank.score_pairs", "fashionbert.rank.score_pairs",
                    "the ranking score P(aligned) for given (product_id, image_id) pairs"),
    "evaluate": ("fashionbert.evaluation.evaluate", "fashionbert.evaluation.evaluate",
                 "sample-100, TIA and full-gallery metrics -> metrics.json"),
    "retrieve": ("fashionbert.rank.retrieve", "fashionbert.rank.retrieve",
                 "two-stage retrieval tables: text_to_image.parquet, image_to_text.parquet"),
    "report": ("fashionbert.evaluation.report", "fashionbert.evaluation.report",
               "static HTML page: sample queries with their top images, metrics, training curves"),
}
FEATURIZE_DESCRIPTION = ("Catalog -> images/texts/rejects Parquet shards + _run.json. Unrecognised options (--runner, "
                         "--direct_num_workers, --project, --setup_file, ...) go to Beam's PipelineOptions.")


def _print_result(command: str, config, result: dict) -> None:
    if command == "synth":
        print(f"synthetic catalog: {result['products']} products -> {result['manifest']}")
    elif command == "featurize":
        c = result["counts"]
        print(f"featurize: {c['input_rows']} catalog rows -> {c['accepted_images']} images, {c['texts']} texts, "
              f"{c['rejected_rows']} rejects; images computed {c['images']['computed']}, carried "
              f"{c['images']['carried']}, deleted {c['images']['deleted']} ({result['elapsed_s']} s) -> {config.out}")
    else:
        print(json.dumps(result, indent=2, default=str))


def _run_stage(command: str, args: argparse.Namespace, beam_args: list[str]) -> None:
    """Parses the namespace into the stage's config and runs it; only featurize takes Beam's options."""
    options, runner = (importlib.import_module(name) for name in STAGES[command][:2])
    config = options.config_from_args(args)
    result = runner.run(config, beam_args) if command == "featurize" else runner.run(config)
    _print_result(command, config, result)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fashionbert", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (options, runner, help_text) in STAGES.items():
        if name == "train":
            _add_nightly_commands(sub)  # after featurize, the stage they start with
        description = FEATURIZE_DESCRIPTION if name == "featurize" else importlib.import_module(runner).__doc__
        importlib.import_module(options).add_arguments(sub.add_parser(name, help=help_text, description=description))
    return parser


def _add_nightly_commands(sub: argparse._SubParsersAction) -> None:
    from fashionbert.commands import nightly

    for name, help_text in (
        ("nightly", "scheduled run: incremental featurize against latest, train (optional), retrieval tables, "
                    "evaluate, then move latest"),
        ("backfill", "like nightly, but featurize everything from scratch"),
    ):
        nightly.add_arguments(sub.add_parser(name, help=help_text, description=nightly.__doc__,
                                             formatter_class=argparse.RawDescriptionHelpFormatter))


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
        _run_stage(args.command, args, extra)
    except (UserError, SchemaError) as err:
        print(f"fashionbert {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fashionbert {args.command}: interrupted; no partial output was published", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

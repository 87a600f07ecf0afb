"""`fashionbert` command line: one subcommand per stage; each reads named inputs and writes under --out.

Heavy imports (Beam, torch) happen inside the subcommand that needs them: `fashionbert --help`, `--version` and a
mistyped command answer without them, and the GPU box (no Beam) can still run training and scoring. Each
subcommand's options are parsed by its own parser, so a bad option shows that subcommand's usage.

Exit codes (fashionbert/errors.py): 0 ok, 1 a stage failed, 2 bad usage or input, 75 busy (the work folder is locked
by another run; try again later), 130 interrupted.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import sys
import time

from fashionbert.errors import EXIT_USAGE, UserError
from fashionbert.logs import setup_logging

# subcommand: (module with add_arguments and config_from_args, module with run(config), help)
STAGES = {
    "synth": ("fashionbert.commands.synth", "fashionbert.commands.synth",
              "write the built-in synthetic catalog (manifest.csv + images/)"),
    "featurize": ("pipelines.config", "pipelines.featurize", "catalog -> Parquet feature shards (Apache Beam)"),
    "train": ("fashionbert.train.config", "fashionbert.train.trainer",
              "train FashionBERT on featurize outputs (PyTorch)"),
    "distill": ("fashionbert.train.distill", "fashionbert.train.distill",
                "a student with fewer encoder layers trained on a teacher's scores (faster re-ranking)"),
    "fuse": ("fashionbert.evaluation.fit_fusion", "fashionbert.evaluation.fit_fusion",
             "fit a model folder's ranking score (TIA margin + itc cosine) on held-out products"),
    "score-pairs": ("fashionbert.rank.score_pairs", "fashionbert.rank.score_pairs",
                    "the ranking score P(aligned) for given (product_id, image_id) pairs (Beam with --runner)"),
    "evaluate": ("fashionbert.evaluation.evaluate", "fashionbert.evaluation.evaluate",
                 "sample-100, TIA and full-gallery metrics -> metrics.json"),
    "retrieve": ("fashionbert.rank.retrieve", "fashionbert.rank.retrieve",
                 "two-stage retrieval tables: text_to_image.parquet, image_to_text.parquet (Beam with --runner)"),
    "report": ("fashionbert.evaluation.report", "fashionbert.evaluation.report",
               "static HTML page: sample queries with their top images, metrics, training curves"),
    "explain": ("fashionbert.evaluation.explain", "fashionbert.evaluation.explain",
                "token -> patch attention maps of given pairs: pictures, an HTML page and attention.parquet"),
}
# fashionbert/commands/nightly.py parses these itself.
NIGHTLY = {
    "nightly": "scheduled run: incremental featurize against latest, train (optional), retrieval tables, evaluate, "
               "then move latest",
    "backfill": "like nightly, but featurize everything from scratch",
}
FEATURIZE_DESCRIPTION = ("Catalog -> images/texts/rejects Parquet shards + _run.json. Unrecognised options (--runner, "
                         "--direct_num_workers, --project, --setup_file, ...) go to Beam's PipelineOptions.")
# Stages that take Beam's options: with any, their Beam pipeline runs (pipelines/, imported only then); without,
# retrieve and score-pairs run in this process (the GPU box without Beam, nightly, evaluate).
BEAM_STAGES = {"featurize": "pipelines.featurize", "retrieve": "pipelines.retrieve",
               "score-pairs": "pipelines.score_pairs"}
BEAM_EPILOG = ("Options this stage does not know are Beam's (--runner, --direct_num_workers, --project, "
               "--setup_file, ...): with any of them it runs as a Beam pipeline whose workers read the features and "
               "the model themselves; without, in this process. With workers on other machines every path must be a "
               "URI they can reach (gs://, s3://), or pass --shared-filesystem when the local paths are mounted at "
               "the same place on every worker.")
DISTRIBUTION = "fashionbert-pipeline"  # setup.py's name
# The config fields a stage's start line names: what it reads and where it writes.
IO_FIELDS = ("catalog", "previous", "features", "model", "pairs", "retrieval", "metrics", "training", "out")


def version() -> str:
    """The installed distribution's version; the package's own when it runs from a checkout."""
    from importlib import metadata

    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        import fashionbert

        return fashionbert.__version__


def _print_result(command: str, config, result: dict) -> None:
    if command == "synth":
        print(f"synthetic catalog: {result['products']} products -> {result['manifest']}")
    elif command == "featurize":
        c = result["counts"]
        print(f"featurize: {c['input_rows']} catalog rows -> {c['accepted_images']} images, {c['texts']} texts"
              f"{f' (+{v} training variants)' if (v := c.get('text_variants')) else ''}, "
              f"{c['rejected_rows']} rejects; images computed {c['images']['computed']}, carried "
              f"{c['images']['carried']}, deleted {c['images']['deleted']} ({result['elapsed_s']} s) -> {config.out}")
    else:
        print(json.dumps(result, indent=2, default=str))


class _Version(argparse.Action):
    """--version: looks the version up only when asked."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                 help="print the version and exit"):
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog} {version()}")
        parser.exit()


def _start_line(command: str, config) -> str:
    fields = {f.name for f in dataclasses.fields(config)} if dataclasses.is_dataclass(config) else set()
    named = []
    for name in IO_FIELDS:
        value = getattr(config, name, None) if name in fields else None
        if value:
            named.append(f"{name}={','.join(map(str, value)) if isinstance(value, (list, tuple)) else value}")
    return f"{command}: start " + " ".join(named)


def _counts(command: str, result: dict) -> str:
    """The figures of a stage's end line."""
    get = result.get
    if command == "synth":
        return f"{get('products')} products"
    if command == "featurize":
        c = get("counts", {})
        images = c.get("images", {})
        return (f"{c.get('input_rows')} catalog rows -> {c.get('accepted_images')} images ({images.get('computed')} "
                f"computed, {images.get('carried')} carried), {c.get('texts')} texts, {c.get('rejected_rows')} rejects")
    if command in ("train", "distill"):
        return (f"step {get('final_step')}/{get('total_steps')}, {get('train_images')} training images, "
                f"{get('validation_images')} held out")
    if command == "retrieve":
        c = get("counts", {})
        return (f"{c.get('text_queries')} text queries, {c.get('image_queries')} image queries, "
                f"{c.get('cross_encoder_pairs')} pairs scored")
    if command == "evaluate":
        s100, gallery = get("sample100", {}), get("full_gallery") or {}
        line = f"sample-100 {s100.get('queries')} queries x {s100.get('draws')} draws, {s100.get('pairs_scored')} pairs"
        if gallery:
            line += (f"; full gallery {gallery.get('texts')} texts x {gallery.get('images')} images, "
                     f"{gallery.get('cost', {}).get('cross_encoder_pairs')} pairs")
        return line + " scored"
    if command == "score-pairs":
        return f"{get('pairs')} pairs: {get('scored')} scored, {get('rejected')} rejected"
    if command == "report":
        return f"{get('text_queries')} text queries, {get('image_queries')} image queries -> {get('out')}"
    if command == "explain":
        return f"{get('pairs')} pairs: {get('explained')} explained, {get('rejected')} rejected -> {get('out')}"
    if command == "fuse":
        return f"{get('ranking_score')}"
    return ""


def _run_stage(command: str, args: argparse.Namespace, beam_args: list[str]) -> None:
    """Parses the namespace into the stage's config and runs it, with a start and an end line in the log; with Beam
    options, as the stage's Beam pipeline."""
    options = importlib.import_module(STAGES[command][0])
    config = options.config_from_args(args)
    beam = command == "featurize" or bool(beam_args)
    runner = importlib.import_module(BEAM_STAGES[command] if beam else STAGES[command][1])
    stage_log = logging.getLogger(runner.__name__)
    stage_log.info(_start_line(command, config))
    t_start = time.time()
    result = runner.run(config, beam_args) if beam else runner.run(config)
    stage_log.info(f"{command}: done in {time.time() - t_start:.1f} s: {_counts(command, result or {})}")
    _print_result(command, config, result)


def _not_beam_options(extra: list[str]) -> str | None:
    """Why `extra` (what the stage's parser did not know) are not all Beam options, or None."""
    try:
        from pipelines.rerank import unknown_beam_args
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("apache_beam"):
            raise
        return f"unrecognized arguments: {' '.join(extra)} (Beam, whose options a stage passes on, is not installed)"
    return unknown_beam_args(extra)


# ============================================================================================ parsers
def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: the subcommands' names and one-line help (their options are parsed by
    `stage_parser`, which imports the stage's module)."""
    parser = argparse.ArgumentParser(prog="fashionbert", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action=_Version)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug log lines too")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, _, help_text) in STAGES.items():
        if name == "train":  # after featurize, the stage nightly starts with
            for nightly_name, nightly_help in NIGHTLY.items():
                sub.add_parser(nightly_name, help=nightly_help, add_help=False)
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def stage_parser(command: str) -> argparse.ArgumentParser:
    """A subcommand's own parser, with its options (imports the stage's options module)."""
    if command in NIGHTLY:
        from fashionbert.commands import nightly

        parser = argparse.ArgumentParser(prog=f"fashionbert {command}", description=nightly.__doc__,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        nightly.add_arguments(parser)
        return parser
    options, runner, _ = STAGES[command]
    description = FEATURIZE_DESCRIPTION if command == "featurize" else importlib.import_module(runner).__doc__
    parser = argparse.ArgumentParser(prog=f"fashionbert {command}", description=description,
                                     epilog=BEAM_EPILOG if command in BEAM_STAGES and command != "featurize" else None)
    importlib.import_module(options).add_arguments(parser)
    return parser


def split_command(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the top-level options and the command, the command's own arguments)."""
    for i, arg in enumerate(argv):
        if not arg.startswith("-"):
            return argv[:i + 1], argv[i + 1:]
    return argv, []


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top, rest = split_command(argv)
    args = build_parser().parse_args(top)  # --help, --version and mistakes exit here
    command = args.command
    setup_logging(verbose=args.verbose)
    if command in NIGHTLY:
        if "-h" in rest or "--help" in rest:
            stage_parser(command).parse_args(["--help"])
        from fashionbert.commands import nightly

        return nightly.main(rest, from_scratch=command == "backfill")
    parser = stage_parser(command)
    # The Beam stages take options they do not know: Beam's.
    stage_args, extra = parser.parse_known_args(rest) if command in BEAM_STAGES else (parser.parse_args(rest), [])
    if extra and command != "featurize":
        problem = _not_beam_options(extra)
        if problem:
            parser.error(problem)  # the stage's usage and the words argparse uses, exit status 2
    from schemas import SchemaError

    try:
        _run_stage(command, stage_args, extra)
    except (UserError, SchemaError) as err:
        print(f"fashionbert {command}: error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", EXIT_USAGE)
    except KeyboardInterrupt:
        print(f"fashionbert {command}: interrupted; no partial output was published", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Scheduled (nightly) and from-scratch (backfill) runs over one work folder.

    fashionbert nightly  --catalog SRC --workdir DIR [--model DIR | --train] [options]
    fashionbert backfill --catalog SRC --workdir DIR [--model DIR | --train] [options]

    WORKDIR/
      runs/<run-id>/      one folder per run:
        features/           featurize output: nightly carries unchanged rows over from latest's, backfill
                            recomputes all
        train/              only with --train: `fashionbert train` output; train/model/ is the run's model
        retrieval/          text_to_image.parquet, image_to_text.parquet (run_id column = <run-id>)
        score_cache/        retrieve.parquet, evaluate.parquet: the pair margins and embeddings each stage used; the
                            next nightly run reuses latest's for the same model, so it scores only what changed
        metrics.json        `fashionbert evaluate` output (not with --skip-evaluate)
        summary.json        status, model, counts, metrics, timings, per-stage details
      latest -> runs/<run-id>   the last successful run; moved atomically, only on success
      last-run.json       the newest run's summary whatever its outcome: ok, failed, held by the quality gate,
                          or refused before any work (no model, a bad option); "running" while one runs
      .lock               held for the whole run: a second run on the same folder exits at once

Stages: featurize, train (only with --train), retrieve, evaluate (unless --skip-evaluate). The model is
--model DIR, or with --train the one trained on this run's features, or else the model the latest successful
run used. Any failure exits non-zero naming the stage and leaves `latest` where it was. Options of the later
stages pass through as one quoted string each: --train-args, --retrieve-args, --eval-args.

The quality gate: when evaluate ran on the same held-out split and protocol as latest's run, `latest` moves only
if neither direction's sample-100 Rank@1 fell more than --max-regression points below latest's.

Exit codes: 0 ok; 1 a stage failed; 2 bad usage or input (nothing run); 3 the quality gate held `latest`;
75 the work folder is locked by another run (try again later).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import importlib
import json
import logging
import os
import shlex
import shutil
import sys
import time
import traceback
from typing import TYPE_CHECKING

from fashionbert.data import publish, storage
from fashionbert.errors import EXIT_HELD, EXIT_STAGE_FAILED, Busy, UserError

if TYPE_CHECKING:  # the stages import torch and Beam, so nightly imports them when they run
    from fashionbert.evaluation.evaluate import EvaluateConfig
    from fashionbert.rank.retrieve import RetrieveConfig
    from fashionbert.train.config import TrainConfig
    from pipelines.config import FeaturizeConfig

log = logging.getLogger(__name__)
# Nightly's settings of a later stage, under the user's pass-through options (which win). One checkpoint is what
# evaluate needs (it reads the training split from it); a nightly run never resumes, so older ones would only fill
# the disk every night.
TRAIN_DEFAULTS = {"keep_checkpoints": 1}
# Sized so that evaluation costs ~25k cross-encoder pairs: minutes on 2 CPU cores (~40 pairs/s), seconds on a
# GPU. evaluate's own defaults (1000 queries x 3 draws, whole gallery, recall-k 100) cost hours on a CPU.
# Drawn by product id, so that each night evaluates the same queries against the same candidates where the catalog
# did not change them: the quality gate compares like for like, and the score cache serves those pairs.
EVAL_DEFAULTS = {"queries": 100, "draws": 1, "gallery_max": 100, "recall_k": 20, "draw_by": "product-id"}
DEFAULT_TOP_K, DEFAULT_RECALL_K = 50, 100
# sample-100 Rank@1 on nightly's 100 held-out queries moves by ~1 point when a few percent of the catalog changes
# under the same model; a fall of more than 5 points is a broken model or broken features, not noise.
DEFAULT_MAX_REGRESSION = 5.0
GATED = ("sample100_t2i_rank1", "sample100_i2t_rank1")  # the headline figures the gate compares
CACHE_COUNTS = ("pairs_scored", "pairs_reused", "embeddings_computed", "embeddings_reused")


def as_argv(values: dict) -> list[str]:
    """Option values as a command line writes them (`{"gallery_max": 100}` -> `--gallery-max 100`): how --help and
    summary.json show nightly's settings beside the user's pass-through options."""
    return [arg for name, value in values.items() for arg in (f"--{name.replace('_', '-')}", str(value))]


@dataclasses.dataclass(frozen=True)
class PassThrough:
    """One later stage's options, given to nightly as a single string and parsed by that stage's own parser."""

    option: str  # nightly's option holding them
    command: str  # the `fashionbert` subcommand that receives them
    module: str  # the module with its add_arguments and config_from_args
    reserved: tuple[str, ...]  # options nightly sets itself, refused in the string
    required: tuple[str, ...]  # the reserved options its parser requires (nightly fills them per run)
    owner: str = "the nightly run"  # who sets the reserved options (bench/quality.py passes train options too)
    folder_hint: str = "each run reads and writes its own folder WORKDIR/runs/<run-id>/"  # for a reserved folder option


PASS_THROUGH = {
    "train": PassThrough("--train-args", "train", "fashionbert.train.config", ("--features", "--out", "--resume"),
                         ("--features", "--out")),
    "retrieve": PassThrough("--retrieve-args", "retrieve", "fashionbert.rank.retrieve",
                            ("--features", "--model", "--out", "--overwrite", "--run-id", "--top-k", "--recall-k",
                             "--score-cache", "--save-scores"),
                            ("--features", "--model", "--out")),
    "evaluate": PassThrough("--eval-args", "evaluate", "fashionbert.evaluation.evaluate",
                            ("--features", "--model", "--out", "--score-cache", "--save-scores"),
                            ("--features", "--model", "--out")),
}


def attach_pass_through(argv: list[str], options: tuple[str, ...] = tuple(p.option for p in PASS_THROUGH.values())
                        ) -> list[str]:
    """`--train-args X` -> `--train-args=X`. Why: argparse takes a lone value that starts with '-' (`--train-args
    --no-matching-only`) for an option of its own and stops with 'expected one argument'."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in options and i + 1 < len(argv):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


# Each run keeps what its cross-encoder and dual encoder computed, one file per stage (a stage saves only what it
# used), and the next nightly run reads latest's files: it scores only pairs and embeds only items new to the model.
SCORE_CACHE_DIR = "score_cache"
SCORE_CACHE_FILES = {"retrieve": "retrieve.parquet", "evaluate": "evaluate.parquet"}


class QualityHeld(Exception):
    """Every stage succeeded but the metrics fell too far: the run stays, `latest` does not move."""


class StageFailed(Exception):
    def __init__(self, stage: str, cause: BaseException):
        super().__init__(f"stage '{stage}' failed: {_one_line(cause)}")
        self.stage, self.cause = stage, cause


def _one_line(exc: BaseException) -> str:
    from schemas import SchemaError

    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    if isinstance(exc, (UserError, SchemaError)):
        return str(exc)
    # Not a message written for users: the type tells a maintainer where to look; the traceback is in summary.json.
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


# ============================================================================================ work folder
@contextlib.contextmanager
def workdir_lock(workdir: str):
    """An flock on WORKDIR/.lock: released by the kernel even when the holder is killed, so a crashed
    run never blocks the next night's."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, ".lock")
    fh = open(path, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise Busy(f"--workdir {workdir} is locked by {holder}; wait for that run to finish (two runs must not "
                   f"interleave on one work folder)") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}")
    fh.flush()
    try:
        yield
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def latest_run(workdir: str) -> str | None:
    link = os.path.join(workdir, "latest")
    return os.path.realpath(link) if os.path.isdir(link) else None


def point_latest(workdir: str, run_dir: str) -> None:
    """Swap the `latest` symlink in one rename: readers see the old run or the new one."""
    tmp = os.path.join(workdir, f".latest-{os.getpid()}")
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.symlink(os.path.relpath(run_dir, workdir), tmp)
    os.replace(tmp, os.path.join(workdir, "latest"))


def _write_json(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2, default=str)
    os.replace(tmp, path)


def _save_summary(summary: dict, run_dir: str, workdir: str) -> None:
    _write_json(os.path.join(run_dir, "summary.json"), summary)
    _write_json(os.path.join(workdir, "last-run.json"), summary)


def _read_summary(run_dir: str) -> dict:
    try:
        with open(os.path.join(run_dir, "summary.json")) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


# ============================================================================================ model choice
def _is_model(folder: str) -> bool:
    return storage.exists(storage.join(folder, "config.json"))


def resolve_model(config: NightlyConfig, latest: str | None) -> dict:
    """Which model the run scores with, decided before any work so that a missing one costs nothing."""
    if config.train is not None:
        return {"source": "--train", "path": None}
    if config.model:
        path = config.model if storage.is_remote(config.model) else os.path.realpath(os.path.expanduser(config.model))
        if not _is_model(storage.resolve(path, "--model")):
            raise UserError(f"--model {config.model}: no config.json there; point it at OUT/model of `fashionbert "
                            f"train`, or pass --train")
        return {"source": "--model", "path": path}
    used = (_read_summary(latest).get("model") or {}).get("path") if latest else None
    if not used:
        raise UserError(f"no model to score with: --workdir {config.workdir} has no successful run that used one; "
                        f"pass --model DIR or --train")
    if not _is_model(used):
        raise UserError(f"the model the latest run used, {used}, is gone (no config.json); pass --model DIR or --train")
    return {"source": f"latest run {os.path.basename(latest)}", "path": used}


# ============================================================================================ pass-through options
class _StageParser(argparse.ArgumentParser):
    """A later stage's own parser, whose mistakes are one-line UserErrors naming nightly's option. No
    abbreviations: `--feat` must not sneak past the reserved-option check as a prefix of --features."""

    def __init__(self, spec: PassThrough):
        super().__init__(prog=spec.option, add_help=False, allow_abbrev=False)
        self.spec = spec

    def error(self, message: str):
        raise UserError(f"{self.spec.option}: {message}; `fashionbert {self.spec.command} --help` lists its options")


# Why each option nightly sets itself is refused inside a pass-through string, and what to do instead.
_RESERVED_HINTS = {"--top-k": "pass --top-k to nightly itself", "--recall-k": "pass --recall-k to nightly itself",
                   "--model": "pass --model to nightly itself",
                   "--score-cache": "each run reuses latest's scores and saves its own under runs/<run-id>/score_cache/",
                   "--save-scores": "each run reuses latest's scores and saves its own under runs/<run-id>/score_cache/"}


def split_pass_through(spec: PassThrough, text: str) -> list[str]:
    try:
        argv = shlex.split(text or "")
    except ValueError as exc:
        raise UserError(f"{spec.option} {text!r}: {exc}; quote it as one string, e.g. {spec.option}=\"--opt value\"")
    for token in argv:
        name = token.split("=", 1)[0]
        if name in spec.reserved:
            raise UserError(f"{spec.option}: {name} is set by {spec.owner} itself; "
                            f"{_RESERVED_HINTS.get(name, spec.folder_hint)}")
    return argv


def parse_pass_through(spec: PassThrough, argv: list[str], defaults: dict):
    """The stage's config from the user's `argv`, read by the stage's own parser over nightly's `defaults` (so the
    user's options win). The options nightly fills per run get placeholders here; each stage replaces them."""
    options = importlib.import_module(spec.module)
    parser = _StageParser(spec)
    options.add_arguments(parser)
    parser.set_defaults(**defaults)
    placeholders = [arg for name in spec.required for arg in (name, name.lstrip("-").upper())]
    return options.config_from_args(parser.parse_args([*placeholders, *argv]))


# ============================================================================================ config
@dataclasses.dataclass(frozen=True)
class NightlyConfig:
    """A nightly or backfill run: the configs of its stages, complete but for what each run decides (its folders,
    the model, the run id), and the pass-through options as given (summary.json records them)."""

    workdir: str
    featurize: FeaturizeConfig  # catalog and column mapping; out and previous are the run's
    retrieve: RetrieveConfig
    train: TrainConfig | None = None  # None: no --train
    evaluate: EvaluateConfig | None = None  # None: --skip-evaluate
    model: str | None = None  # --model
    from_scratch: bool = False  # backfill: featurize everything, carry nothing over
    beam_args: list[str] = dataclasses.field(default_factory=list)  # featurize's Beam runner options
    train_args: list[str] = dataclasses.field(default_factory=list)
    retrieve_args: list[str] = dataclasses.field(default_factory=list)
    eval_args: list[str] = dataclasses.field(default_factory=list)
    max_regression: float = DEFAULT_MAX_REGRESSION  # quality gate, Rank@1 points
    keep_runs: int | None = None  # prune to this many run folders after each run; None keeps all


def _check_retrieval(top_k: int, recall_k: int) -> None:
    if top_k < 1:
        raise UserError(f"--top-k {top_k}: must be >= 1")
    if recall_k < top_k:
        raise UserError(f"--recall-k {recall_k} is below --top-k {top_k}: re-ranking can only order what "
                        f"recall found; raise --recall-k to at least --top-k")


def config_from_args(args: argparse.Namespace, beam_args: list[str], from_scratch: bool) -> NightlyConfig:
    """The run's config from nightly's parsed options. Every mistake in the later stages' options surfaces here,
    before featurize spends its hour."""
    from pipelines.config import config_from_args as featurize_config

    _check_retrieval(args.top_k, args.recall_k)
    if args.max_regression < 0:
        raise UserError(f"--max-regression {args.max_regression}: must be >= 0 (Rank@1 points); pass a large value, "
                        f"e.g. 100, to let any result move latest")
    if args.keep_runs is not None and args.keep_runs < 1:
        raise UserError(f"--keep-runs {args.keep_runs}: must be >= 1 (the run just made is always kept); omit it to "
                        f"keep every run")
    train_args = split_pass_through(PASS_THROUGH["train"], args.train_args)
    retrieve_args = split_pass_through(PASS_THROUGH["retrieve"], args.retrieve_args)
    eval_args = split_pass_through(PASS_THROUGH["evaluate"], args.eval_args)
    if train_args and not args.train:
        raise UserError("--train-args given without --train; add --train (or drop --train-args)")
    if eval_args and args.skip_evaluate:
        raise UserError("--eval-args given with --skip-evaluate; drop one of them")
    featurize = featurize_config(args, catalog=args.catalog, out="", previous=None, overwrite=False)
    train = None
    if args.train:
        # The backbone must be the one featurize tokenized with (same vocabulary), so it follows featurize's option.
        train = parse_pass_through(PASS_THROUGH["train"], train_args, {
            **TRAIN_DEFAULTS, "backbone": featurize.backbone, "progress": featurize.progress})
    retrieve = parse_pass_through(PASS_THROUGH["retrieve"], retrieve_args,
                                  {"top_k": args.top_k, "recall_k": args.recall_k, "progress": featurize.progress})
    evaluate = None if args.skip_evaluate else parse_pass_through(PASS_THROUGH["evaluate"], eval_args, {
        **EVAL_DEFAULTS, "progress": featurize.progress})
    return NightlyConfig(workdir=args.workdir, featurize=featurize, retrieve=retrieve, train=train, evaluate=evaluate,
                         model=args.model, from_scratch=from_scratch, beam_args=beam_args, train_args=train_args,
                         retrieve_args=retrieve_args, eval_args=eval_args, max_regression=args.max_regression,
                         keep_runs=args.keep_runs)


# ============================================================================================ stages
@dataclasses.dataclass
class RunContext:
    config: NightlyConfig
    run_id: str
    run_dir: str
    latest: str | None
    model: dict  # {"source", "path", and "version" once retrieve has loaded it}
    features: str | None = None


def _featurize_stage(ctx: RunContext) -> dict:
    from pipelines.featurize import run as featurize

    previous = None
    if not ctx.config.from_scratch and ctx.latest:
        candidate = os.path.join(ctx.latest, "features")
        previous = candidate if publish.is_complete(candidate) else None
    cfg = dataclasses.replace(ctx.config.featurize, out=os.path.join(ctx.run_dir, "features"), previous=previous)
    summary = featurize(cfg, ctx.config.beam_args)
    ctx.features = cfg.out
    return {"previous": previous, "counts": summary["counts"], "elapsed_s": summary["elapsed_s"]}


def _train_stage(ctx: RunContext) -> dict:
    from fashionbert.train import trainer as train

    out = os.path.join(ctx.run_dir, "train")
    result = train.run(dataclasses.replace(ctx.config.train, features=[ctx.features], out=out))
    ctx.model["path"] = os.path.realpath(result["model_dir"])
    return {"out": out, "model": ctx.model["path"], "final_step": result["final_step"],
            "train_images": result["train_images"], "validation_images": result["validation_images"],
            "validation": result["validation"], "argv": ctx.config.train_args}


def _cache_files(ctx: RunContext, stage: str) -> tuple[list[str], str]:
    """The score-cache files `stage` reads (latest's, and this run's earlier stages'; none for a backfill, which
    computes everything) and the one it writes."""
    folder = os.path.join(ctx.run_dir, SCORE_CACHE_DIR)
    os.makedirs(folder, exist_ok=True)
    order = ["retrieve", "evaluate"]
    inputs = [os.path.join(folder, SCORE_CACHE_FILES[s]) for s in order[:order.index(stage)]]
    if not ctx.config.from_scratch and ctx.latest:
        inputs += [os.path.join(ctx.latest, SCORE_CACHE_DIR, SCORE_CACHE_FILES[s]) for s in order]
    return [f for f in inputs if os.path.isfile(f)], os.path.join(folder, SCORE_CACHE_FILES[stage])


def _retrieve_stage(ctx: RunContext) -> dict:
    from fashionbert.rank import retrieve

    out = os.path.join(ctx.run_dir, "retrieval")
    inputs, save = _cache_files(ctx, "retrieve")
    result = retrieve.run(dataclasses.replace(ctx.config.retrieve, features=[ctx.features], model=ctx.model["path"],
                                              out=out, run_id=ctx.run_id, score_cache=inputs, save_scores=save))
    ctx.model["version"] = result["model"]["version"]
    return {"out": out, "model_version": result["model"]["version"], "counts": result["counts"],
            "options": result["options"], "index_used": result["index_used"], "phases_s": result["seconds"],
            "score_cache": result["score_cache"]}


def _evaluate_stage(ctx: RunContext) -> dict:
    from fashionbert.evaluation import evaluate

    out = os.path.join(ctx.run_dir, "metrics.json")
    inputs, save = _cache_files(ctx, "evaluate")
    metrics = evaluate.run(dataclasses.replace(ctx.config.evaluate, features=[ctx.features], model=ctx.model["path"],
                                               out=out, score_cache=inputs, save_scores=save))
    cache = metrics["score_cache"]
    return {"out": out, "headline": evaluate.headline(metrics), "split": metrics["split"],
            "argv": [*as_argv(EVAL_DEFAULTS), *ctx.config.eval_args],
            "counts": {k: cache[k] for k in CACHE_COUNTS}, "score_cache": {k: cache[k] for k in ("inputs", "saved")}}


STAGES = [("featurize", _featurize_stage), ("train", _train_stage), ("retrieve", _retrieve_stage),
          ("evaluate", _evaluate_stage)]


def _wanted(stage: str, config: NightlyConfig) -> bool:
    return {"train": config.train is not None, "evaluate": config.evaluate is not None}.get(stage, True)


def rollup(stages: dict) -> dict:
    """The figures monitoring charts, flat, from whichever stages finished."""
    counts: dict = {}
    feat = stages.get("featurize", {}).get("counts")
    if feat:
        counts.update(catalog_rows=feat["input_rows"], images=feat["accepted_images"], texts=feat["texts"],
                      rejects=feat["rejected_rows"], rejects_by_reason=feat["rejects_by_stage_reason"],
                      images_computed=feat["images"]["computed"], images_carried=feat["images"]["carried"],
                      images_deleted=feat["images"]["deleted"], texts_computed=feat["text_rows"]["computed"],
                      texts_carried=feat["text_rows"]["carried"], texts_deleted=feat["text_rows"]["deleted"])
        storage = feat.get("storage") or {}  # featurize links latest's image files rather than copying their rows
        counts.update(images_linked=feat["images"].get("linked", 0),
                      feature_bytes_written=storage.get("bytes_written"), feature_bytes_linked=storage.get("bytes_linked"),
                      feature_bytes_copied=storage.get("bytes_copied"))
    tables = stages.get("retrieve", {}).get("counts")
    if tables:
        counts.update({k: tables[k] for k in ("text_queries", "image_queries", "text_to_image_rows",
                                              "image_to_text_rows", "cross_encoder_pairs")})
    # What the cross-encoder and the dual encoder ran (and what the score cache spared them), retrieve + evaluate.
    cached = [stages[s]["counts"] for s in ("retrieve", "evaluate") if "pairs_scored" in stages.get(s, {}).get("counts", {})]
    if cached:
        counts.update({k: sum(c[k] for c in cached) for k in CACHE_COUNTS})
    return {"counts": counts, "metrics": stages.get("evaluate", {}).get("headline", {}),
            "timings_s": {name: s["seconds"] for name, s in stages.items() if "seconds" in s}}


# ============================================================================================ quality gate
def quality_gate(summary: dict, latest: str | None, max_regression: float) -> dict:
    """Whether this run may replace `latest`: {"passed": bool, "why": str, ...}. Rank@1 is compared in points
    (percent) and only like for like: the same held-out split and evaluate options as latest's run, else there is
    nothing to hold the run against and it passes, saying why."""
    current = summary.get("stages", {}).get("evaluate", {})
    if current.get("status") != "ok":
        return {"passed": True, "compared": False, "why": "no evaluate stage this run"}
    if latest is None:
        return {"passed": True, "compared": False, "why": "no previous successful run"}
    previous_summary = _read_summary(latest)
    previous = previous_summary.get("stages", {}).get("evaluate", {})
    if previous.get("status") != "ok":
        return {"passed": True, "compared": False, "why": f"latest run {os.path.basename(latest)} has no metrics"}

    def protocol(stage: dict) -> dict:
        return {"split": {k: v for k, v in (stage.get("split") or {}).items() if k != "from"},
                "argv": stage.get("argv")}

    if protocol(current) != protocol(previous):
        return {"passed": True, "compared": False,
                "why": f"latest run {os.path.basename(latest)} was evaluated on another split or with other options"}
    figures, falls = {}, []
    for name in GATED:
        now, before = current["headline"].get(name), previous["headline"].get(name)
        if now is None or before is None:
            continue
        drop = round(100 * (before - now), 2)
        figures[name] = {"latest": before, "this_run": now, "drop_points": drop}
        if drop > max_regression:
            falls.append(f"{name} fell {drop} points ({100 * before:.1f} -> {100 * now:.1f})")
    passed = not falls
    why = ("; ".join(falls) + f": more than --max-regression {max_regression} below latest run "
           f"{os.path.basename(latest)}") if falls else f"within --max-regression {max_regression} of latest"
    return {"passed": passed, "compared": True, "why": why, "against": os.path.basename(latest),
            "max_regression": max_regression, "figures": figures}


# ============================================================================================ pruning
def prune_runs(workdir: str, keep: int, protect: set[str]) -> list[str]:
    """Remove all but the `keep` newest run folders, never `latest`, never one in `protect` (the running run, and
    any run whose folder holds a model latest or this run scores with). Run ids start with a UTC timestamp, so
    name order is age order. Returns the removed run ids."""
    runs_dir = os.path.join(workdir, "runs")
    if keep is None or not os.path.isdir(runs_dir):
        return []
    latest = latest_run(workdir)
    keep_paths = {os.path.realpath(p) for p in protect | ({latest} if latest else set())}
    names = sorted((n for n in os.listdir(runs_dir) if os.path.isdir(os.path.join(runs_dir, n))), reverse=True)
    removed = []
    for name in names[keep:]:
        path = os.path.realpath(os.path.join(runs_dir, name))
        if any(path == kept or kept.startswith(path + os.sep) for kept in keep_paths):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(name)
        log.info("pruned run %s (--keep-runs %d)", name, keep)
    return removed


# ============================================================================================ run
def _run_stages(ctx: RunContext, summary: dict) -> None:
    for name, stage in STAGES:
        if not _wanted(name, ctx.config):
            summary["stages"][name] = {"status": "skipped"}
            continue
        log.info("stage %s: start", name)
        t0 = time.time()
        try:
            result = stage(ctx)
        except (Exception, KeyboardInterrupt) as exc:
            seconds = round(time.time() - t0, 2)
            summary["stages"][name] = {"status": "failed", "error": _one_line(exc), "seconds": seconds,
                                       "traceback": traceback.format_exc(limit=8)}
            log.error("stage %s: failed after %.1f s: %s", name, seconds, _one_line(exc))
            raise StageFailed(name, exc) from exc
        summary["stages"][name] = {"status": "ok", **result, "seconds": round(time.time() - t0, 2)}
        log.info("stage %s: done in %.1f s%s", name, time.time() - t0, _stage_counts(name, result))


def _stage_counts(name: str, result: dict) -> str:
    """The few figures an operator reads in a stage's end line."""
    c = result.get("counts") or {}
    if name == "featurize" and c:
        return (f": {c['accepted_images']} images ({c['images']['computed']} computed, {c['images']['carried']} "
                f"carried), {c['texts']} texts, {c['rejected_rows']} rejects")
    if name == "train":
        return f": step {result['final_step']}, model {result['model']}"
    if name == "retrieve" and c:
        return (f": {c['text_queries']} text and {c['image_queries']} image queries, "
                f"{c.get('pairs_scored', c['cross_encoder_pairs'])} pairs scored, {c.get('pairs_reused', 0)} reused")
    if name == "evaluate":
        h = result.get("headline") or {}
        t2i, i2t = h.get("sample100_t2i_rank1"), h.get("sample100_i2t_rank1")
        if t2i is not None and i2t is not None:
            return (f": sample-100 Rank@1 t2i {100 * t2i:.1f}, i2t {100 * i2t:.1f}; {c.get('pairs_scored')} pairs "
                    f"scored, {c.get('pairs_reused')} reused")
    return ""


def _timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _refusal(kind: str, catalog: str | None, error: BaseException) -> dict:
    return {"run_id": None, "kind": kind, "catalog": catalog, "status": "refused", "error": str(error),
            "started": _timestamp(), "finished": _timestamp(), "stages": {}}


def record_refusal(workdir: str, kind: str, catalog: str | None, error: BaseException) -> None:
    """last-run.json for a run refused before any work (no model, a bad option), so monitoring does not keep
    showing the previous run's "ok". Written under the lock; when another run holds it, that run owns the file."""
    try:
        with workdir_lock(workdir):
            _write_json(os.path.join(workdir, "last-run.json"), _refusal(kind, catalog, error))
    except (UserError, OSError):
        pass


def _model_paths(*summaries: dict) -> set[str]:
    return {s["model"]["path"] for s in summaries if (s.get("model") or {}).get("path")}


def run(config: NightlyConfig) -> dict:
    workdir = os.path.abspath(config.workdir)
    kind = "backfill" if config.from_scratch else "nightly"
    with workdir_lock(workdir):
        latest = latest_run(workdir)
        try:
            model = resolve_model(config, latest)
        except UserError as err:
            _write_json(os.path.join(workdir, "last-run.json"), _refusal(kind, config.featurize.catalog, err))
            err.recorded = True  # main must not record it again
            raise
        run_id = publish.new_run_id()
        run_dir = os.path.join(workdir, "runs", run_id)
        os.makedirs(run_dir)
        ctx = RunContext(config, run_id, run_dir, latest, model)
        summary = {"run_id": run_id, "kind": kind, "catalog": config.featurize.catalog, "status": "running",
                   "started": _timestamp(), "model": model, "options": _options(config), "stages": {}}
        log.info("%s run %s: start (catalog %s, model %s)", kind, run_id, config.featurize.catalog,
                 model["path"] or "trained by this run")
        t_run = time.time()
        # Written now so that a run killed outright still shows in last-run.json: "running", never finished.
        _save_summary(summary, run_dir, workdir)
        try:
            _run_stages(ctx, summary)
            summary["gate"] = quality_gate(summary, latest, config.max_regression)
            if not summary["gate"]["passed"]:
                summary["status"] = "held"
                summary["error"] = f"quality gate: {summary['gate']['why']}"
                raise QualityHeld(summary["error"])
            summary["status"] = "ok"
        except StageFailed as err:
            summary["status"] = "failed"
            summary["failed_stage"] = err.stage
            summary["error"] = str(err)
            raise
        finally:
            summary.update(rollup(summary["stages"]))
            summary["seconds"] = round(time.time() - t_run, 2)
            summary["finished"] = _timestamp()
            _save_summary(summary, run_dir, workdir)
            if summary["status"] == "ok":
                point_latest(workdir, run_dir)
            now_latest = latest_run(workdir)
            pruned = prune_runs(workdir, config.keep_runs,
                                {run_dir, *_model_paths(summary, _read_summary(now_latest) if now_latest else {})})
            if pruned:
                summary["pruned"] = pruned
                _save_summary(summary, run_dir, workdir)
            log.info("%s run %s: %s in %.1f s", kind, run_id, summary["status"], summary["seconds"])
        return summary


def _options(config: NightlyConfig) -> dict:
    return {"top_k": config.retrieve.top_k, "recall_k": config.retrieve.recall_k, "train_args": config.train_args,
            "retrieve_args": config.retrieve_args, "eval_args": config.eval_args,
            "skip_evaluate": config.evaluate is None}


# ============================================================================================ command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pipelines.config import CATALOG_HELP
    from pipelines.config import add_arguments as featurize_arguments

    parser.add_argument("--catalog", required=True, help=CATALOG_HELP)
    parser.add_argument("--workdir", required=True,
                        help="work folder holding runs/, latest, last-run.json and the lock")
    m = parser.add_argument_group("model (default: the one the latest successful run used)")
    which = m.add_mutually_exclusive_group()
    which.add_argument("--model", metavar="DIR", help="score with this model folder (OUT/model of `fashionbert train`)")
    which.add_argument("--train", action="store_true",
                       help="train a model on this run's features first (into runs/<run-id>/train/; its backbone is "
                            "featurize's --backbone) and score with it")
    m.add_argument("--train-args", default="", metavar="'OPTS'",
                   help="`fashionbert train` options for --train, one quoted string, e.g. --train-args='--steps 400 "
                        f"--batch-size 32'; nightly adds {' '.join(as_argv(TRAIN_DEFAULTS))} first (yours win)")
    r = parser.add_argument_group("retrieval tables")
    r.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help="rows per query (default %(default)s)")
    r.add_argument("--recall-k", type=int, default=DEFAULT_RECALL_K,
                   help="candidates per query the cross-encoder re-ranks; the run's cost grows linearly with it "
                        "(default %(default)s)")
    r.add_argument("--retrieve-args", default="", metavar="'OPTS'",
                   help="other `fashionbert retrieve` options, one quoted string, e.g. --retrieve-args='--device cuda "
                        "--index hnsw'")
    e = parser.add_argument_group("evaluation (metrics.json; headline figures go into summary.json)")
    e.add_argument("--skip-evaluate", action="store_true", help="no evaluate stage")
    e.add_argument("--eval-args", default="", metavar="'OPTS'",
                   help=f"`fashionbert evaluate` options, one quoted string; nightly adds "
                        f"{' '.join(as_argv(EVAL_DEFAULTS))} first (about 25k cross-encoder pairs: minutes on a CPU), "
                        f"yours win. For a model trained elsewhere, --eval-args='--split all' evaluates on every product")
    k = parser.add_argument_group("quality gate and housekeeping")
    k.add_argument("--max-regression", type=float, default=DEFAULT_MAX_REGRESSION, metavar="POINTS",
                   help="hold latest (exit 3, summary.json says why) when either direction's sample-100 Rank@1 falls "
                        "more than this many points below latest's, evaluated on the same split and options; a large "
                        "value, e.g. 100, lets any result through (default %(default)s)")
    k.add_argument("--keep-runs", type=int, default=None, metavar="N",
                   help="after the run, remove all but the N newest run folders; never latest, this run, nor a run "
                        "holding the model latest scores with (default: keep every run)")
    featurize_arguments(parser, with_outputs=False)


def main(argv: list[str] | None = None, from_scratch: bool = False) -> int:
    name = "backfill" if from_scratch else "nightly"
    parser = argparse.ArgumentParser(prog=f"fashionbert {name}", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args, beam_args = parser.parse_known_args(attach_pass_through(list(sys.argv[1:] if argv is None else argv)))
    try:
        summary = run(config_from_args(args, beam_args, from_scratch))
    except StageFailed as err:
        print(f"fashionbert {name}: {err}; latest left unchanged", file=sys.stderr)
        return EXIT_STAGE_FAILED
    except QualityHeld as err:
        print(f"fashionbert {name}: {err}; latest left unchanged", file=sys.stderr)
        return EXIT_HELD
    except UserError as err:
        # A busy work folder's last-run.json belongs to the run holding it.
        if not getattr(err, "recorded", False) and not isinstance(err, Busy):
            record_refusal(os.path.abspath(args.workdir), name, args.catalog, err)
        print(f"fashionbert {name}: error: {err}", file=sys.stderr)
        return err.exit_code
    print(f"{name} run {summary['run_id']} ok in {summary['seconds']} s -> {os.path.join(args.workdir, 'latest')}")
    return 0

"""Quality benchmark: reproduces README's "What quality to expect" table on hm-dev in one command. Prints figures;
asserts nothing.

    python bench/quality.py --catalog ../shared/data/hm-dev/articles.csv --work DIR [--label L] [--train-args "..."]
    python bench/quality.py --catalog ../shared/data/hm-dev/articles.csv --work DIR --label L --seeds 0,1 [...]
    python bench/quality.py --work DIR --summary
    python bench/quality.py --catalog ../shared/data/hm-dev/articles.csv --work DIR --plan [--steps S] [...]
    python bench/quality.py --catalog ../shared/data/hm-dev/articles.csv --work DIR --fit-budget [--seeds 0,1] [...]

Stages, each skipped when its output is already complete:
1. featurize the catalog into DIR/features with the README's hm-dev column mapping (or --features FOLDER); --cnn and
   --image-size choose other image features, featurized into DIR/features-<cnn>-<size> (training's FLOPs do not
   change: the patches stay 8x8 of 1286 values); --text-variants adds featurize's training-only texts, into
   DIR/features-tv-<hash of the variants> (its images linked from DIR/features when that is complete);
2. train with the README recipe (2,400 matching-only steps, the first 1,520 the itc task alone, batch 32, lr 3e-4, ...)
   into DIR/train-<label>; --train-args adds
   `fashionbert train` options on top of the recipe (an ablation), --retrain trains again;
3. evaluate into DIR/eval-<label>.json: sample-100 (300 queries, 1 draw) and the full gallery (500 held-out
   products, recall-k 10 on CPU; 1000 and 100 on a GPU).

Prints a markdown table: sample-100 Rank@1/5/10 (%) both ways by the ranking score, the itc cosine alone and the TIA
head alone, then the full gallery ranked two-stage (re-ranked by the score) and by the recall embedding alone; how
many sample-100 queries each ranking misses to their own colour variant; how alike TIA and the cosine rank (their
per-query correlation, and the Rank@1 of an oracle taking whichever head is right); training steps and wall
minutes. Appends the run's figures to DIR/quality.jsonl, so an ablation is a series of runs with different
--label/--train-args;
--summary prints one row per label (its latest run) from that file.

--plan trains nothing to keep: it times --plan-steps itc-alone steps and as many joint ones of the run's options on
this host (a short run into DIR/plan-<label>, removed after), then prints how many minutes the run would train and how
many steps at its split the budget (--budget-minutes, 45) holds here. Why: the budget is minutes on 2 cores, and the
same steps take ~26 min on a Xeon with native bf16 and ~3x that in fp32 on a CPU without it, so a longer recipe (or a
slower option) is checked against the day's host before a 45-minute run, not after. Writes DIR/plan-<label>.json.

--fit-budget runs the plan first (or reuses DIR/plan-<label>.json made on this CPU for the same options), then
trains and evaluates the run at the steps the budget holds here at its split: cut where the recipe's 2,400 steps are
over it, more where they are under it (never more than --steps when that is given): the recipe as the budget allows
it on the day's host, in one command. The run's record and table keep the plan's figures (`budget_plan`).

--seeds 0,1 runs the same options once per seed (train's --seed; seed 0 is the plain run, label L, the others
L-seed<k>, so a finished single run is reused) and prints one row per seed and the table of their mean, which it
appends as label L-mean. Why: at the recipe's budget a seed moves a 1000-query Rank@1 by up to 4 points, more than
most options do, so a single run's difference under ~3 points is not a finding.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fashionbert.commands.nightly import PassThrough, attach_pass_through, parse_pass_through, split_pass_through  # noqa: E402
from fashionbert.data import publish  # noqa: E402
from fashionbert.errors import UserError  # noqa: E402
from fashionbert.evaluation.evaluate import RANK_KS  # noqa: E402
from fashionbert.train.config import TrainConfig  # noqa: E402
from pipelines.config import CNN_NAMES, FeaturizeConfig, format_variants, parse_variants  # noqa: E402

# README's training command for the table (the options beyond --features/--out). The budget is what 2 CPU cores
# train in 45 minutes (README, "The budget"): on the 2-core Xeon with AMX, where training runs eager attention in
# bf16, the 2,400 steps take ~26 min alone (1,520 itc-alone steps at ~0.47 s, 880 joint ones at ~0.88 s). The earlier
# recipes are `--steps 1200` (the FLOPs of the 600-step one, before eager attention made the steps ~2.2x faster),
# `--steps 880 --train-args "--itc-warmup 0"` and `--steps 600 --train-args "--no-matching-only --itc-warmup 0"` (its
# tia_warmup stays): itc_warmup is the fraction 760/1200 = 1520/2400, so that another --steps keeps the split.
RECIPE = {"steps": 2400, "batch_size": 32, "lr": 3e-4, "matching_only": True, "itc_warmup": 760 / 1200,
          "tia_warmup": 0.2, "val_fraction": 0.2, "val_every": 0, "val_queries": 200, "checkpoint_every": 0,
          "num_threads": 2}
BUDGET_MINUTES = 45.0  # README "The budget": what 2 CPU cores train in 45 minutes with nothing else running
TRAIN_ARGS = PassThrough("--train-args", "train", "fashionbert.train.config", ("--features", "--out", "--resume"),
                         ("--features", "--out"), owner="bench/quality.py",
                         folder_hint="it trains on --features (or WORK/features) into WORK/train-<label>")
# The table's rows: key in the figures, what it is ranked by (SHORT: the same in a few words).
ROWS = (("score", "the ranking score (TIA + itc fused; what the tables use)"),
        ("itc", "the itc cosine alone (`by_head.itc`)"),
        ("itc_hub", "the itc cosine, hubness-corrected (`by_head.itc_hub`)"),
        ("tia", "the TIA head alone (`by_head.tia`)"),
        ("gallery_two_stage", "full gallery, two-stage (recall, then re-rank by the score)"),
        ("gallery_recall_only", "full gallery, recall only (the embedding cosine)"),
        ("gallery_recall_hub", "full gallery, recall only, hubness-corrected cosine"))
SHORT = {"score": "score", "itc": "itc", "itc_hub": "itc hubness-corrected", "tia": "TIA",
         "gallery_two_stage": "gallery two-stage", "gallery_recall_only": "gallery recall-only",
         "gallery_recall_hub": "gallery recall-only hubness-corrected"}
OPTIONAL_ROWS = ("itc_hub", "gallery_recall_hub")  # evaluate with --hubness-temperature 0 (or older) has none
QUALITY_LOG = "quality.jsonl"
# featurize's image features: the table's runs use its defaults unless --cnn/--image-size say otherwise
DEFAULT_CNN, DEFAULT_IMAGE_SIZE = FeaturizeConfig.cnn, FeaturizeConfig.image_size


# ============================================================================================ figures and tables
def figures(metrics: dict) -> dict:
    """The table's numbers from an evaluate metrics dict: per row and direction, Rank@1/5/10 in % (rows a model
    lacks, e.g. itc without an itc head, are left out)."""
    s100 = metrics["sample100"]
    sources = {"score": s100, **s100.get("by_head", {})}
    out = {name: {d: [_pct(sources[name][d][f"rank{k}"]["mean"]) for k in RANK_KS] for d in ("t2i", "i2t")}
           for name in ("score", "itc", "itc_hub", "tia") if name in sources}
    variants = s100.get("variants")
    if variants:  # evaluate before it reported them has none
        out["variants"] = {"with_variant": _pct(variants["queries_with_variant"]["mean"]),
                           **{name: {d: _pct(variants[name][d]["mean"]) for d in ("t2i", "i2t")}
                              for name in ("score", "itc", "tia") if name in variants}}
    heads = s100.get("heads", {})
    if heads:  # evaluate before it reported them has none
        out["heads"] = {key: {d: round(heads[key][d]["mean"], 3) if key == "heads_correlation"
                              else _pct(heads[key][d]["mean"]) for d in ("t2i", "i2t")} for key in heads}
    gallery = metrics.get("full_gallery")
    if gallery:
        for name, key in (("gallery_two_stage", "two_stage"), ("gallery_recall_only", "recall_only"),
                          ("gallery_recall_hub", "recall_hub")):
            if key in gallery:  # recall_hub: evaluate before the hubness correction has none
                out[name] = {d: [_pct(gallery[key][d][f"rank{k}"]) for k in RANK_KS] for d in ("t2i", "i2t")}
    return out


def _pct(x: float) -> float:
    return round(100.0 * x, 2)


def _cell(values: list[float] | None) -> str:
    return " / ".join(f"{v:.1f}" for v in values) if values else "n/a"


def format_table(record: dict) -> str:
    """A run's markdown table (the README's, with the full-gallery rows) and its training line; for a mean over
    seeds (mean_record) the mean's, and each seed's Rank@1 under it."""
    fig, sizes = record["figures"], record["sizes"]
    seeds = record.get("seeds")
    over = (f", the mean of {len(seeds)} seeds ({', '.join(map(str, seeds))}: runs "
            f"{', '.join(f'`{label}`' for label in record['seed_labels'])})" if seeds else "")
    lines = [f"Label `{record['label']}`{over}, {_options(record)}. Rank@1/5/10 "
             f"(%): sample-100 over {sizes['sample100_queries']} queries x {sizes['draws']} draw; full gallery "
             f"{sizes.get('gallery_texts', 'n/a')} texts x {sizes.get('gallery_images', 'n/a')} images, "
             f"recall-k {sizes['recall_k']}.", "",
             "| ranked by | text -> image | image -> text |", "| --- | --- | --- |"]
    for key, what in ROWS:
        if key in OPTIONAL_ROWS and key not in fig:
            continue
        row = fig.get(key, {})
        lines.append(f"| {what} | {_cell(row.get('t2i'))} | {_cell(row.get('i2t'))} |")
    if seeds:
        per_seed = "; ".join(
            f"{SHORT[key]} " + ", ".join(f"{r1[key]['t2i']:.1f} / {r1[key]['i2t']:.1f} (seed {seed})"
                                         for seed, r1 in zip(seeds, record["per_seed_rank1"]))
            for key, _ in ROWS if all(key in r1 for r1 in record["per_seed_rank1"]))
        lines += ["", f"Rank@1 of each seed, text -> image / image -> text: {per_seed}."]
    variants = fig.get("variants")
    if variants:
        tops = ", ".join(f"{label} {variants[name]['t2i']:.1f} / {variants[name]['i2t']:.1f}"
                         for name, label in (("score", "score"), ("itc", "itc"), ("tia", "TIA")) if name in variants)
        lines += ["", f"Sample-100 queries whose top candidate is their own colour variant (same group), % text -> "
                      f"image / image -> text: {tops}; {variants['with_variant']:.1f}% of the queries have a variant "
                      f"among their candidates."]
    heads = fig.get("heads", {})
    if "heads_correlation" in heads:
        corr, either = heads["heads_correlation"], heads["either_head_rank1"]
        lines += ["", f"TIA and the itc cosine, per query: correlation of their scores over its candidates "
                      f"{corr['t2i']:.2f} / {corr['i2t']:.2f}; Rank@1 of whichever head is right (an oracle, about "
                      f"the most a fusion could reach) {either['t2i']:.1f} / {either['i2t']:.1f}."]
    machine = f", {record['precision']}" if record.get("precision") else ""
    machine += f" ({record['cpu']})" if record.get("cpu") else ""
    each = " a seed (mean)" if seeds else ""
    budget = "inside" if record["train_minutes"] <= BUDGET_MINUTES else "over"
    lines += ["", f"Training: {record['steps']} steps in {record['train_minutes']:.1f} min{each} on {record['device']}"
                  f"{machine} ({budget} the {BUDGET_MINUTES:.0f}-minute budget, as wall minutes: a shared host "
                  f"inflates them); evaluation {record['eval_minutes']:.1f} min{each}."]
    fitted = record.get("budget_plan")
    if fitted:
        seconds = fitted["step_seconds"]
        held = "what" if record["steps"] == fitted["budget_steps"] else "--steps' cap on what"
        lines += ["", f"--fit-budget: {record['steps']} steps, {held} the {fitted['budget_minutes']:.0f}-minute budget "
                      f"holds on this host at the run's split by its plan ({fitted['time']}: itc-alone steps "
                      f"{seconds['itc_alone']:.2f} s, joint {seconds['joint']:.2f} s, start-up, validation and export "
                      f"{fitted['fixed_seconds'] / 60:.1f} min; the run as given, {fitted['steps']} steps, "
                      f"~{fitted['run_minutes']:.1f} min)."]
    return "\n".join(lines)


def _changes(record: dict) -> tuple[str | None, str]:
    """What the run changed over the recipe: its image features where not featurize's defaults (else None), and its
    train args."""
    features, made = record.get("features") or {}, []
    if features and (features["cnn"], features["image_size"]) != (DEFAULT_CNN, DEFAULT_IMAGE_SIZE):
        made.append(f"--cnn {features['cnn']} --image-size {features['image_size']}")
    if features.get("text_variants"):
        made.append(f"--text-variants '{features['text_variants']}'")
    return " ".join(made) or None, " ".join(record["train_args"]) or "(recipe)"


def _options(record: dict) -> str:
    features, train_args = _changes(record)
    return (f"features `{features}`, " if features else "") + f"train args `{train_args}`"


def format_summary(records: list[dict]) -> str:
    """One markdown row per label (its latest run): Rank@1 (%) by score / itc / TIA both ways, and the full gallery's
    two-stage / recall-only Rank@1 both ways."""
    latest = {r["label"]: r for r in records}  # the file is in run order: later runs of a label win

    def rank1(fig: dict, keys: tuple[str, ...], d: str) -> str:
        return " / ".join(f"{fig[k][d][0]:.1f}" if k in fig else "n/a" for k in keys)

    lines = ["| label | options | steps | text->image R@1 score / itc / TIA | image->text R@1 score / itc / TIA | "
             "gallery text->image R@1 two-stage / recall-only | gallery image->text R@1 two-stage / recall-only | "
             "train min |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in latest.values():
        fig = r["figures"]
        heads, gallery = ("score", "itc", "tia"), ("gallery_two_stage", "gallery_recall_only")
        features, train_args = _changes(r)
        options = f"features {features}, {train_args}" if features else train_args
        if r.get("seeds"):
            options = f"mean of seeds {', '.join(map(str, r['seeds']))}: {options}"
        lines.append(f"| {r['label']} | {options} | {r['steps']} | "
                     f"{rank1(fig, heads, 't2i')} | {rank1(fig, heads, 'i2t')} | {rank1(fig, gallery, 't2i')} | "
                     f"{rank1(fig, gallery, 'i2t')} | {r['train_minutes']:.1f} |")
    return "\n".join(lines)


# ============================================================================================ stages
def train_config(a: argparse.Namespace, features: Path, out: Path) -> TrainConfig:
    """The README recipe, then --train-args over it (train's own parser), then this script's --steps/--backbone."""
    config = _over_recipe(a)
    steps = a.steps or config.steps or (None if config.epochs else RECIPE["steps"])
    return dataclasses.replace(config, features=[str(features)], out=str(out), steps=steps,
                               epochs=None if a.steps else config.epochs)


def _over_recipe(a: argparse.Namespace) -> TrainConfig:
    """--train-args over the recipe, by train's own parser; steps only where the user gave them (--epochs in
    --train-args replaces the recipe's)."""
    recipe = {k: v for k, v in RECIPE.items() if k != "steps"}
    return parse_pass_through(TRAIN_ARGS, split_pass_through(TRAIN_ARGS, a.train_args),
                              {**recipe, "backbone": a.backbone})


def features_folder(a: argparse.Namespace, variants: bool = True) -> Path:
    """--features as given; else WORK/features for the default image features, WORK/features-<cnn>-<size> for others
    (so one WORK holds an ablation over image features as well as over training options), and -tv-<hash> after
    either with --text-variants (`variants=False`: the folder without them)."""
    if a.features:
        return Path(a.features)
    name = "features" if (a.cnn, a.image_size) == (DEFAULT_CNN, DEFAULT_IMAGE_SIZE) else \
        f"features-{a.cnn}-{a.image_size}"
    if variants and text_variants(a):
        name += "-tv-" + hashlib.sha256(format_variants(text_variants(a)).encode()).hexdigest()[:8]
    return Path(a.work) / name


def text_variants(a: argparse.Namespace) -> tuple[tuple[str, ...], ...]:
    return parse_variants(a.text_variants or "")


def featurize_stage(a: argparse.Namespace, out: Path) -> None:
    """--features as given, else `out` (features_folder), featurized from --catalog unless already complete."""
    if a.features:
        if not publish.is_complete(out):
            raise UserError(f"--features {out}: not a complete featurize output (no _SUCCESS)")
        return
    if publish.is_complete(out):
        made_from = json.loads((out / "_run.json").read_text())["catalog"]["source"]
        if a.catalog and not _same_catalog(made_from, a.catalog):
            raise UserError(f"{out} was featurized from {made_from}, not --catalog {a.catalog}; use another --work "
                            f"or remove {out}")
        made_with = features_options(out)
        if (made_with["cnn"], made_with["image_size"]) != (a.cnn, a.image_size):
            raise UserError(f"{out} holds --cnn {made_with['cnn']} --image-size {made_with['image_size']} features, "
                            f"not --cnn {a.cnn} --image-size {a.image_size}; remove {out} to featurize it again")
        if made_with["text_variants"] != format_variants(text_variants(a)):
            raise UserError(f"{out} holds --text-variants {made_with['text_variants']!r}, not "
                            f"{format_variants(text_variants(a))!r}; remove {out} to featurize it again")
        _log(f"featurize: reusing {out} (from {made_from})")
        return
    if not a.catalog:
        raise UserError(f"give --catalog (to featurize into {out}) or --features FOLDER")
    from pipelines.featurize import run as featurize

    # an absolute path in _run.json, so that a later run from another folder recognises the catalog
    catalog = a.catalog if "://" in a.catalog or a.catalog.startswith("synthetic:") else os.path.abspath(a.catalog)
    plain = features_folder(a, variants=False)  # the same images without variants: link them, do not recompute them
    previous = str(plain) if text_variants(a) and publish.is_complete(plain) and _same_catalog(
        json.loads((plain / "_run.json").read_text())["catalog"]["source"], catalog) else None
    cfg = FeaturizeConfig(catalog=catalog, out=str(out), overwrite=True, id_column=a.id_column, previous=previous,
                          text_variants=text_variants(a),
                          text_columns=tuple(c.strip() for c in a.text_columns.split(",") if c.strip()),
                          category_column=a.category_column or None, subcategory_column=a.subcategory_column or None,
                          group_column=a.group_column or None, backbone=a.backbone, cnn=a.cnn,
                          image_size=a.image_size, progress=sys.stderr.isatty())
    t0 = time.time()
    summary = featurize(cfg)
    _log(f"featurize: {summary['counts']['accepted_images']} images, {summary['counts']['rejected_rows']} rejects "
         f"in {(time.time() - t0) / 60:.1f} min -> {out}")


def features_options(folder: Path) -> dict:
    """The image-feature options and text variants a featurize output was made with (its _run.json)."""
    options = json.loads((folder / "_run.json").read_text())["options"]
    return {"cnn": options.get("cnn", DEFAULT_CNN), "image_size": options.get("image_size", DEFAULT_IMAGE_SIZE),
            "text_variants": format_variants(options.get("text_variants") or ())}


def _same_catalog(a: str, b: str) -> bool:
    return a == b or os.path.abspath(a) == os.path.abspath(b)


# Options that do not change the trained model: a finished run is reused whatever they were.
_RUN_ONLY = ("out", "resume", "progress", "prefetch", "num_threads", "keep_checkpoints", "checkpoint_every")


def train_stage(config: TrainConfig, retrain: bool) -> dict:
    """Train unless OUT already holds a finished run (summary.json is written after OUT/model) with the same
    options; its summary."""
    out = Path(config.out)
    summary = out / "summary.json"
    if summary.is_file() and (out / "model").is_dir() and not retrain:
        from fashionbert.model.loading import training_options
        from fashionbert.train.state import run_options

        saved, _ = training_options(out / "model")
        now = run_options(config, saved.get("world_size", 1))  # as the run recorded them
        differ = [f"{k} {saved[k]!r} there, {v!r} now" for k, v in now.items()
                  if k in saved and k not in _RUN_ONLY and saved[k] != v]
        if differ:
            raise UserError(f"{out} was trained with other options ({'; '.join(differ)}); pass --retrain to replace "
                            f"it, or another --label")
        _log(f"train: reusing {out} (--retrain to train again)")
        return json.loads(summary.read_text())
    from fashionbert.train.trainer import run as train

    shutil.rmtree(out, ignore_errors=True)  # a killed or replaced run: start clean (train refuses old checkpoints)
    return train(config)


def evaluate_stage(a: argparse.Namespace, features: Path, train: TrainConfig, out: Path) -> dict:
    import torch

    from fashionbert.evaluation.evaluate import EvaluateConfig, run as evaluate

    gpu = torch.cuda.is_available() and train.device != "cpu"  # a GPU affords the larger gallery and recall
    config = EvaluateConfig(features=[str(features)], model=str(Path(train.out) / "model"), out=str(out),
                            queries=a.queries, draws=1, gallery_max=a.gallery_max or (1000 if gpu else 500),
                            recall_k=a.recall_k or (100 if gpu else 10), device=train.device,
                            precision=train.precision, num_threads=train.num_threads)
    return evaluate(config)


def check_plan(a: argparse.Namespace, config: TrainConfig) -> int:
    """--plan's own option checks, before anything is featurized -> the run's itc-alone steps."""
    from fashionbert.train.state import itc_alone_steps

    if not config.steps:
        raise UserError("--plan and --fit-budget time a run of a given length: give --steps (not --epochs in "
                        "--train-args)")
    if a.plan_steps < 3:
        raise UserError(f"--plan-steps {a.plan_steps}: give 3 or more (each kind's first step is left out)")
    return itc_alone_steps(config, config.steps)  # checked: a bad --itc-warmup fails here


def plan_stage(a: argparse.Namespace, config: TrainConfig) -> dict:
    """Times the run's two kinds of steps on this host -> the plan: the run's predicted minutes and the steps the
    budget holds at its split (also written to WORK/plan-<label>.json).

    A short run of the same options into WORK/plan-<label> (removed after): --plan-steps itc-alone steps, when the
    run has any, then as many joint ones, with the mining bank (--mining-bank) from its first joint step, then the
    final validation and model export the run does too. A step's time is the wall time from the metrics record
    before it to its own (data, forward, backward, optimizer, logging); each kind's median leaves out its first step
    (lazy allocations), and what the short run spent outside its steps (start-up, validation, export) is counted
    once, as the run spends it once."""
    from fashionbert.train.trainer import run as train

    n_itc = check_plan(a, config)
    sample_itc = a.plan_steps if n_itc else 0
    out = Path(a.work) / f"plan-{a.label}"
    shutil.rmtree(out, ignore_errors=True)
    sample = dataclasses.replace(config, out=str(out), steps=sample_itc + a.plan_steps, itc_warmup=sample_itc,
                                 mining_bank_after=0, val_every=0, checkpoint_every=0, keep_checkpoints=1)
    _log(f"plan: timing {sample_itc} itc-alone and {a.plan_steps} joint steps of this run's options in {out}")
    try:
        summary = train(sample)
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    ends = [r["time"] for r in records if r.get("kind") == "train"]
    walls = [later - earlier for earlier, later in zip(ends, ends[1:])]  # steps 2.. of the short run
    itc_s = statistics.median(walls[:sample_itc - 1]) if sample_itc else 0.0
    joint_s = statistics.median(walls[sample_itc:])  # the joint steps after the first
    fixed_s = max(0.0, summary["seconds"] - sample_itc * itc_s - a.plan_steps * joint_s)
    as_count = config.itc_warmup >= 1  # --itc-warmup in steps, not a fraction of the run
    plan = {"label": a.label, "train_args": shlex.split(a.train_args), "features": config.features,
            "steps": config.steps, "itc_steps": n_itc,
            "step_seconds": {"itc_alone": round(itc_s, 3), "joint": round(joint_s, 3)},
            "fixed_seconds": round(fixed_s, 1), "budget_minutes": a.budget_minutes, "itc_as_count": as_count,
            **budget_fit(fixed_s, itc_s, joint_s, config.steps, n_itc, as_count, a.budget_minutes),
            "sample_steps": {"itc_alone": sample_itc, "joint": a.plan_steps}, "mining_bank": config.mining_bank,
            "device": summary["device"], "precision": summary.get("precision"), "cpu": cpu_description(),
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    (Path(a.work) / f"plan-{a.label}.json").write_text(json.dumps(plan, indent=2, sort_keys=True) + "\n")
    return plan


def budget_fit(fixed_s: float, itc_s: float, joint_s: float, steps: int, n_itc: int, itc_as_count: bool,
               budget_minutes: float) -> dict:
    """A run's minutes from its step times, and the most steps `budget_minutes` hold: at the run's split when
    --itc-warmup is a fraction, else its itc-alone steps kept and the rest of the budget in joint steps."""
    run_minutes = (fixed_s + n_itc * itc_s + (steps - n_itc) * joint_s) / 60
    budget_s = budget_minutes * 60 - fixed_s
    if itc_as_count:
        joint = math.floor((budget_s - n_itc * itc_s) / joint_s)
        budget_steps = n_itc + joint if joint >= 1 else 0  # no joint step left: no run of this shape fits
        budget_itc = n_itc if budget_steps else 0
    else:
        share = n_itc / steps
        budget_steps = max(0, math.floor(budget_s / (share * itc_s + (1 - share) * joint_s)))
        budget_itc = round(share * budget_steps)
    return {"run_minutes": round(run_minutes, 1), "budget_steps": budget_steps, "budget_itc_steps": budget_itc}


def format_plan(plan: dict) -> str:
    """The plan in words: step times, the run's minutes against the budget, and what the budget holds here."""
    steps, itc, seconds = plan["steps"], plan["itc_steps"], plan["step_seconds"]
    machine = f"{plan['device']}, {plan['precision']} ({plan['cpu']})"
    timed = (f"{plan['sample_steps']['itc_alone']} itc-alone steps at a median {seconds['itc_alone']:.2f} s and "
             if itc else "") + f"{plan['sample_steps']['joint']} joint steps at {seconds['joint']:.2f} s"
    bank = (" (the mining bank from their first one: --mining-bank-after's steps without it take a little less)"
            if plan["mining_bank"] else "")
    inside = "inside" if plan["run_minutes"] <= plan["budget_minutes"] else "over"
    split = f" ({itc} itc-alone, {steps - itc} joint)" if itc else ""
    holds, holds_itc = plan["budget_steps"], plan["budget_itc_steps"]
    kept = "its itc-alone steps kept" if plan.get("itc_as_count") else "at this split"
    fits = (f"~{holds} steps {kept} on this host" + (f" ({holds_itc} itc-alone, {holds - holds_itc} joint)"
                                                     if itc else "") + f": --steps {holds}" if holds else
            "no run of this shape on this host")
    return "\n".join([
        f"Plan for `{plan['label']}`, train args `{' '.join(plan['train_args']) or '(recipe)'}`, on {machine}:",
        f"- timed {timed}{bank}; start-up, final validation and export {plan['fixed_seconds'] / 60:.1f} min;",
        f"- this run, {steps} steps{split}: ~{plan['run_minutes']:.1f} min, {inside} the "
        f"{plan['budget_minutes']:.0f}-minute budget;",
        f"- the budget holds {fits}.",
        "Minutes are this host's with nothing else running; a run sharing the cores takes longer."])


# ============================================================================================ command
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True, metavar="DIR", help="folder for features, trainings, evaluations and "
                                                                 f"{QUALITY_LOG}")
    ap.add_argument("--summary", action="store_true", help=f"print one row per label from WORK/{QUALITY_LOG}; run nothing")
    g = ap.add_argument_group("features")
    g.add_argument("--catalog", help="catalog to featurize into WORK/features (skipped when it is complete)")
    g.add_argument("--features", metavar="DIR", help="an existing featurize output instead")
    g.add_argument("--id-column", default="article_id")
    g.add_argument("--text-columns", default="prod_name,colour_group_name,detail_desc")
    g.add_argument("--category-column", default="product_group_name")
    g.add_argument("--subcategory-column", default="product_type_name")
    g.add_argument("--group-column", default="product_code")
    g.add_argument("--text-variants", default="", metavar="COLS;COLS...",
                   help="featurize's training-only texts (e.g. 'product_type_name,colour_group_name,"
                        "graphical_appearance_name,detail_desc;colour_group_name,prod_name,garment_group_name,"
                        "index_group_name'), into WORK/features-tv-<hash>; scoring keeps --text-columns' text")
    g.add_argument("--backbone", default="minilm", help="text backbone of featurize and train (default minilm)")
    g.add_argument("--cnn", choices=CNN_NAMES, default=DEFAULT_CNN,
                   help="featurize's patch CNN (default %(default)s; another goes to WORK/features-<cnn>-<size>)")
    g.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE,
                   help="featurize's square input size (default %(default)s; hm-dev's photos are 360x540, so 512 keeps "
                        "nearly all their pixels)")
    g = ap.add_argument_group("training")
    g.add_argument("--label", default="default", help="names the run: WORK/train-<label>, WORK/eval-<label>.json")
    g.add_argument("--train-args", default="", metavar="'OPTS'",
                   help="`fashionbert train` options over the recipe, one quoted string, e.g. --train-args '--neg-ratio 2'")
    g.add_argument("--steps", type=int, help=f"training steps (default the recipe's {RECIPE['steps']})")
    g.add_argument("--retrain", action="store_true", help="train again even if WORK/train-<label> is complete")
    g.add_argument("--seeds", type=seed_list, metavar="K,K,...",
                   help="one run per seed (train's --seed), labels <label> for seed 0 and <label>-seed<k> for the "
                        "others, and the table of their mean (label <label>-mean); a seed moves a 1000-query Rank@1 "
                        "by up to 4 points at the recipe's budget, so compare options on two seeds or more")
    g.add_argument("--plan", action="store_true",
                   help="time this run's steps on this host and print its minutes against the budget and how many "
                        "steps the budget holds; trains nothing to keep, evaluates nothing")
    g.add_argument("--plan-steps", type=int, default=20, metavar="N",
                   help="--plan times N itc-alone and N joint steps (default %(default)s)")
    g.add_argument("--fit-budget", action="store_true",
                   help="train the run at the steps the budget holds on this host at its split (fewer or more than "
                        "the recipe's; never more than --steps where given): times its steps as --plan does, or reuses "
                        "WORK/plan-<label>.json made on this CPU for the same options, then trains and evaluates")
    g.add_argument("--budget-minutes", type=float, default=BUDGET_MINUTES,
                   help="--plan's and --fit-budget's budget in minutes (default %(default)s: the README's)")
    g = ap.add_argument_group("evaluation")
    g.add_argument("--queries", type=int, default=300, help="sample-100 queries, one draw (default 300)")
    g.add_argument("--gallery-max", type=int, help="full-gallery products (default 500 on CPU, 1000 on a GPU)")
    g.add_argument("--recall-k", type=int, help="full-gallery recall-k (default 10 on CPU, 100 on a GPU)")
    return ap.parse_args(attach_pass_through(list(sys.argv[1:] if argv is None else argv), (TRAIN_ARGS.option,)))


def seed_list(text: str) -> tuple[int, ...]:
    """--seeds '0,1' -> (0, 1)."""
    try:
        seeds = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        seeds = ()
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: give distinct seeds >= 0, comma-separated, e.g. 0,1")
    return seeds


def prepare(a: argparse.Namespace, check=None) -> tuple[Path, TrainConfig]:
    """The checks of the options (and `check(config)`, a mode's own), then the features (featurized unless
    complete) -> their folder and the run's train config, made first so that a bad option costs nothing."""
    work = Path(a.work)
    if not re.fullmatch(r"[A-Za-z0-9._-]+", a.label):
        raise UserError(f"--label {a.label!r}: use letters, digits, '.', '_' and '-' (it names folders)")
    work.mkdir(parents=True, exist_ok=True)
    if a.features and ((a.cnn, a.image_size) != (DEFAULT_CNN, DEFAULT_IMAGE_SIZE) or text_variants(a)):
        raise UserError("--cnn/--image-size/--text-variants choose how --catalog is featurized; --features is "
                        "featurized already")
    features = features_folder(a)
    config = train_config(a, features, work / f"train-{a.label}")
    if check:
        check(config)
    featurize_stage(a, features)
    return features, config


def run(a: argparse.Namespace) -> dict:
    """Featurize, train, evaluate -> the run's record (also appended to WORK/quality.jsonl)."""
    work = Path(a.work)
    features, config = prepare(a)
    summary = train_stage(config, a.retrain)
    metrics = evaluate_stage(a, features, config, work / f"eval-{a.label}.json")
    gallery = metrics.get("full_gallery", {})
    record = {
        "label": a.label, "train_args": shlex.split(a.train_args), "steps": summary["final_step"],
        "train_minutes": round(summary["seconds"] / 60, 2), "eval_minutes": round(metrics["seconds"] / 60, 2),
        "device": summary["device"], "precision": summary.get("precision"), "cpu": cpu_description(),
        "model_version": metrics["model"]["version"], "features": features_options(features),
        "sizes": {"sample100_queries": metrics["sample100"]["queries"], "draws": metrics["sample100"]["draws"],
                  "gallery_texts": gallery.get("texts"), "gallery_images": gallery.get("images"),
                  "recall_k": gallery.get("recall_k")},
        "figures": figures(metrics),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if getattr(a, "budget_plan", None):
        record["budget_plan"] = a.budget_plan
    append_log(work, record)
    return record


def seed_label(label: str, seed: int) -> str:
    """The label of one seed's run: the label itself for train's default seed (a run without --seed is that seed, so
    a finished single run is reused), else <label>-seed<k>."""
    return label if seed == TrainConfig.seed else f"{label}-seed{seed}"


def run_seeds(a: argparse.Namespace) -> tuple[list[dict], dict]:
    """run() once per --seeds seed (train's --seed added to --train-args), then their mean (mean_record), appended to
    WORK/quality.jsonl as label <label>-mean -> (the seeds' records, the mean's)."""
    given = {token.split("=", 1)[0] for token in split_pass_through(TRAIN_ARGS, a.train_args)}
    if "--seed" in given:
        raise UserError("--train-args sets --seed and --seeds asks for several; give the seeds to --seeds alone")
    records = []
    for seed in a.seeds:
        extra = "" if seed == TrainConfig.seed else f" --seed {seed}"
        records.append(run(argparse.Namespace(**{**vars(a), "label": seed_label(a.label, seed),
                                                  "train_args": f"{a.train_args}{extra}".strip()})))
    mean = mean_record(f"{a.label}-mean", a.seeds, shlex.split(a.train_args), records)
    append_log(Path(a.work), mean)
    return records, mean


def mean_record(label: str, seeds: tuple[int, ...], train_args: list[str], records: list[dict]) -> dict:
    """One record for runs that differ only in their seed: figures and minutes averaged, each seed's Rank@1 kept."""
    first = records[0]
    rank1 = [{key: {d: r["figures"][key][d][0] for d in ("t2i", "i2t")} for key, _ in ROWS if key in r["figures"]}
             for r in records]
    fitted = {"budget_plan": first["budget_plan"]} if "budget_plan" in first else {}
    return {**{k: first.get(k) for k in ("steps", "device", "precision", "cpu", "features", "sizes")}, **fitted,
            "label": label, "train_args": train_args, "seeds": list(seeds),
            "seed_labels": [r["label"] for r in records], "model_versions": [r["model_version"] for r in records],
            "train_minutes": round(statistics.fmean([r["train_minutes"] for r in records]), 2),
            "eval_minutes": round(statistics.fmean([r["eval_minutes"] for r in records]), 2),
            "figures": mean_figures([r["figures"] for r in records]), "per_seed_rank1": rank1,
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def mean_figures(figs: list):
    """The element-wise mean of several runs' figures (nested dicts and lists of numbers); a key that some run lacks
    (e.g. an older evaluate's) is left out."""
    head = figs[0]
    if isinstance(head, dict):
        return {k: mean_figures([f[k] for f in figs]) for k in head if all(k in f for f in figs)}
    if isinstance(head, list):
        return [mean_figures(list(column)) for column in zip(*figs)]
    return round(statistics.fmean(figs), 3)


def cpu_description() -> str:
    """The CPU's model name and whether it multiplies bf16 natively: minutes, the budget's unit, depend on both (a CPU
    without AVX512-BF16/AMX trains in fp32, ~1.3x slower per recipe step than one with it), so each run records them."""
    from fashionbert.runtime import cpu_has_native_bf16

    name = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores, {'native' if cpu_has_native_bf16() else 'no native'} bf16"


def append_log(work: Path, record: dict) -> None:
    with open(work / QUALITY_LOG, "a") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")


def read_log(work: Path) -> list[dict]:
    path = work / QUALITY_LOG
    if not path.is_file():
        raise UserError(f"{path}: no runs yet; run this script without --summary first")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plan(a: argparse.Namespace) -> dict:
    """Featurize if needed, then time the run's steps (plan_stage) -> the plan."""
    if a.seeds:
        raise UserError("--plan times one run, and a seed does not change its minutes: drop --seeds")
    _, config = prepare(a, check=lambda config: check_plan(a, config))
    return plan_stage(a, config)


def fit_budget(a: argparse.Namespace) -> argparse.Namespace:
    """--fit-budget: the run's steps set to what the budget holds on this host at its split (never more than --steps
    where the user gave it) -> the options to run,
    with the plan's figures in `budget_plan` for the run's record. The plan is WORK/plan-<label>.json where that was
    made on this CPU for the same options (so a rerun, or the next seed, trains the same steps), else timed now.
    Why: the recipe's 2,400 steps fit the budget on a Xeon with AMX (~26 min) but not on slower CPUs (~57 min on an
    AMD EPYC with AVX512-BF16, ~128 in fp32 on one without), and a run over the budget is not the README's recipe;
    on the Xeon the budget holds ~3,800 steps, and a faster step buying more steps is the budget's rule, not a breach
    of it."""
    _, config = prepare(a, check=lambda config: check_plan(a, config))
    plan = reusable_plan(a, config)
    if plan:
        _log(f"fit-budget: reusing {Path(a.work) / f'plan-{a.label}.json'} (remove it to time the steps again)")
    else:
        plan = plan_stage(a, config)
    print(format_plan(plan), file=sys.stderr, flush=True)
    if not plan["budget_steps"]:
        raise UserError(f"the {a.budget_minutes:.0f}-minute budget holds no run of this shape on this host (its "
                        f"itc-alone steps alone fill it): give --itc-warmup as a fraction, or fewer itc-alone steps")
    ceiling = steps_given(a)
    steps = plan["budget_steps"] if ceiling is None else min(ceiling, plan["budget_steps"])
    _log(f"fit-budget: training {steps} steps at the run's split (the run as given: {config.steps}"
         + (f"; --steps {ceiling} caps it)" if ceiling is not None else ")"))
    kept = {k: plan[k] for k in ("steps", "budget_steps", "budget_itc_steps", "run_minutes", "step_seconds",
                                 "fixed_seconds", "budget_minutes", "time")}
    return argparse.Namespace(**{**vars(a), "steps": steps, "budget_plan": kept})


def steps_given(a: argparse.Namespace) -> int | None:
    """The run's --steps where the user gave them (this script's, or train's in --train-args), else None."""
    return a.steps or _over_recipe(a).steps


def reusable_plan(a: argparse.Namespace, config: TrainConfig) -> dict | None:
    """WORK/plan-<label>.json if it timed these options (steps, train args, features, budget, --plan-steps) on this
    CPU, else None."""
    path = Path(a.work) / f"plan-{a.label}.json"
    try:
        plan = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    want = {"steps": config.steps, "train_args": shlex.split(a.train_args), "features": config.features,
            "budget_minutes": a.budget_minutes, "cpu": cpu_description(),
            "sample_steps": {"itc_alone": a.plan_steps if plan.get("itc_steps") else 0, "joint": a.plan_steps}}
    return plan if all(plan.get(k) == v for k, v in want.items()) else None


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        if a.plan and a.fit_budget:
            raise UserError("--plan times the run and trains nothing; --fit-budget trains it at what the budget holds: "
                            "give one")
        if a.summary:
            print(format_summary(read_log(Path(a.work))))
        elif a.plan:
            print(format_plan(plan(a)))
        else:
            if a.fit_budget:
                a = fit_budget(a)
            if a.seeds:
                records, mean = run_seeds(a)
                print(format_summary(records) + "\n\n" + format_table(mean))
            else:
                print(format_table(run(a)))
    except UserError as exc:
        print(f"bench/quality.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())

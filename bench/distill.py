"""Distillation benchmark: README's "A faster cross-encoder" table in one command. Prints figures; asserts nothing.

    python bench/distill.py --teacher /work/q/train-halves/model --work DIR [--layers 2,3,1] [--steps 150]

For each student size in --layers order, the same budget: `fashionbert distill --teacher T --layers N` (train's
batches and schedule, --steps x --batch-size positives; --keep-recall as distill's default, or --no-keep-recall) into
WORK/student-N (WORK/student-N-own-recall with --no-keep-recall; resumed when a run there was cut short, reused when
it finished), then its evaluation (the teacher's after the first student's distillation). Then, for the
teacher and every student:
- cross-encoder pairs/s: bench/score.py's measurement (`CrossEncoderScorer` on real shapes, 8 pairs per image),
  --rounds rounds round-robin over the models, best round kept (the machine is shared: the best round is the least
  disturbed one, and round-robin spreads a slow spell over all models);
- sample-100 Rank@1/5/10 both ways by each model's ranking score on the teacher's held-out products: `fashionbert
  evaluate` as bench/quality.py runs it (one draw, seed 0), --queries queries, no full gallery (an evaluation of
  the same model version and query count is reused).
Prints a markdown table and writes WORK/distill-bench.json (after every stage, so a cut run leaves what it measured).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.quality import figures  # noqa: E402
from bench.score import scorer_pairs_per_s, throughput_inputs  # noqa: E402
from fashionbert.errors import UserError  # noqa: E402
from fashionbert.evaluation.evaluate import EvaluateConfig, run as evaluate  # noqa: E402
from fashionbert.logs import setup_logging  # noqa: E402
from fashionbert.model.loading import load_model  # noqa: E402
from fashionbert.runtime import resolve_runtime  # noqa: E402
from fashionbert.train import checkpoint as ckpt  # noqa: E402
from fashionbert.train.distill import DistillConfig, chosen_layers, run as distill  # noqa: E402

RESULT = "distill-bench.json"


def student_name(a: argparse.Namespace, layers: int) -> str:
    return f"student-{layers}" + ("" if a.keep_recall else "-own-recall")


def distill_stage(a: argparse.Namespace, layers: int, work: Path) -> dict:
    out = work / student_name(a, layers)
    summary = out / "summary.json"
    latest = ckpt.latest_checkpoint(out)
    if latest is not None:  # a folder of another budget is neither resumed nor reused
        saved = json.loads((latest / ckpt.STATE_JSON).read_text())["options"]
        wanted = {"lr": a.lr, "temperature": a.temperature, "keep_recall": a.keep_recall,
                  "hidden_weight": a.hidden_weight, "batch_size": a.batch_size}
        differ = {k: (saved.get(k), v) for k, v in wanted.items() if saved.get(k) != v}
        if differ:
            raise UserError(f"{out} holds a run with other options ({differ}: (there, asked)); use another --work")
    if summary.is_file() and (out / "model").is_dir():
        done = json.loads(summary.read_text())
        if done["final_step"] == a.steps:
            _log(f"distill: reusing {out}")
            teacher = load_model(a.teacher, resolve_runtime("cpu", "auto", a.threads)).config
            return {**done, "teacher_layers": chosen_layers(int(teacher.bert["num_hidden_layers"]), layers)}
    config = DistillConfig(teacher=a.teacher, layers=layers, out=str(out), steps=a.steps, batch_size=a.batch_size,
                           lr=a.lr, temperature=a.temperature, keep_recall=a.keep_recall,
                           hidden_weight=a.hidden_weight,
                           val_queries=a.val_queries, val_every=0,
                           checkpoint_every=a.checkpoint_every, num_threads=a.threads, progress=False,
                           resume=ckpt.latest_checkpoint(out) is not None)
    return distill(config)


def evaluate_stage(a: argparse.Namespace, name: str, model: Path, features: list[str], work: Path) -> dict:
    out = work / f"eval-{name}.json"
    rt = resolve_runtime("cpu", "auto", a.threads)
    version = load_model(model, rt).version
    if out.is_file():
        done = json.loads(out.read_text())
        if done["model"]["version"] == version and done["sample100"]["queries"] == a.queries:
            _log(f"evaluate: reusing {out}")
            return done
    return evaluate(EvaluateConfig(features=features, model=str(model), out=str(out), queries=a.queries, draws=1,
                                   gallery=False, device="cpu", precision="auto", num_threads=a.threads,
                                   progress=False))


def pairs_per_s(a: argparse.Namespace, models: dict[str, Path]) -> dict[str, float]:
    """Best of --rounds round-robin measurements per model."""
    rt = resolve_runtime("cpu", "auto", a.threads)
    loaded = {name: load_model(folder, rt).model for name, folder in models.items()}
    best = {name: 0.0 for name in models}
    with tempfile.TemporaryDirectory() as tmp:
        text_ids, feats, pairs = throughput_inputs(Path(tmp), a.pairs)
        for r in range(a.rounds):
            for name, model in loaded.items():
                rate, _ = scorer_pairs_per_s(model, rt, text_ids, feats, pairs)
                best[name] = max(best[name], rate)
                _log(f"pairs/s round {r + 1}: {name} {rate:.1f}")
    return best


def table(record: dict) -> str:
    """The markdown table: throughput, Rank@1/5/10 by the ranking score, Rank@1 as a share of the teacher's, and
    Rank@1 by each head alone (with --keep-recall the student's itc embeddings are the teacher's; with
    --no-keep-recall they run through its fewer layers too)."""
    rows = dict(sorted(record["models"].items(), key=lambda kv: -kv[1]["layers"]))
    teacher = rows["teacher"]
    lines = ["| model (teacher layers) | pairs/s | x teacher | text->image R@1/5/10 | image->text R@1/5/10 "
             "| R@1 vs teacher t2i / i2t | R@1 t2i / i2t, itc alone | R@1 t2i / i2t, TIA alone | distil min |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, m in rows.items():
        fig = m["figures"]
        ratio = [100 * fig["score"][d][0] / max(teacher["figures"]["score"][d][0], 1e-9) for d in ("t2i", "i2t")]
        rate = m.get("pairs_per_s")
        speed = f"{rate:.1f} | {rate / teacher['pairs_per_s']:.2f}x" if rate and teacher.get("pairs_per_s") else "n/a | n/a"
        heads = [" / ".join(f"{fig[h][d][0]:.1f}" for d in ("t2i", "i2t")) if h in fig else "n/a" for h in ("itc", "tia")]
        recall = {True: ", teacher's recall layers", False: ", own recall"}.get(m.get("keep_recall"), "")
        lines.append(f"| {name}: {m['layers']} layer{'s' if m['layers'] != 1 else ''}{' ' + str(m['teacher_layers']) if m.get('teacher_layers') else ''}{recall} "
                     f"| {speed} | {' / '.join(f'{v:.1f}' for v in fig['score']['t2i'])} | "
                     f"{' / '.join(f'{v:.1f}' for v in fig['score']['i2t'])} | {ratio[0]:.0f}% / {ratio[1]:.0f}% | "
                     f"{heads[0]} | {heads[1]} | {format(m['distill_minutes'], '.1f') if 'distill_minutes' in m else ''} |")
    return "\n".join(lines)


def run(a: argparse.Namespace) -> dict:
    """Distil and evaluate each student in --layers order (the teacher evaluated after the first), then the
    throughput of all; WORK/distill-bench.json is rewritten after each stage, so a cut run leaves what it measured."""
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    teacher = load_model(a.teacher, resolve_runtime("cpu", "auto", a.threads)).config
    record = {"teacher": a.teacher, "budget": {"steps": a.steps, "batch_size": a.batch_size, "lr": a.lr,
                                               "temperature": a.temperature, "val_queries": a.val_queries,
                                               "keep_recall": a.keep_recall, "hidden_weight": a.hidden_weight},
              "queries": a.queries, "models": {}}
    models = {}
    for n in [int(x) for x in a.layers.split(",") if x.strip()]:
        summary = distill_stage(a, n, work)
        record["features"] = json.loads((Path(summary["checkpoint"]) / ckpt.STATE_JSON).read_text())["options"]["features"]
        runs = [(student_name(a, n), Path(summary["model_dir"]), summary)]
        if not models:
            runs.insert(0, ("teacher", Path(a.teacher), None))
        for name, folder, s in runs:
            models[name] = folder
            metrics = evaluate_stage(a, name, folder, record["features"], work)
            entry = {"layers": int(teacher.bert["num_hidden_layers"]), "figures": figures(metrics),
                     "model_version": metrics["model"]["version"], "eval_minutes": round(metrics["seconds"] / 60, 2)}
            if s is not None:
                entry.update(layers=n, teacher_layers=s["teacher_layers"], distill_minutes=round(s["seconds"] / 60, 2),
                             validation=s["validation"], keep_recall=a.keep_recall)
            record["models"][name] = entry
            _save(work, record, t0)
    for name, rate in pairs_per_s(a, models).items():
        record["models"][name]["pairs_per_s"] = rate
    _save(work, record, t0)
    return record


def _save(work: Path, record: dict, t0: float) -> None:
    record["minutes"] = round((time.time() - t0) / 60, 1)
    (work / RESULT).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", required=True, metavar="DIR", help="the model folder to distil")
    ap.add_argument("--work", required=True, metavar="DIR", help=f"folder for the students, evaluations and {RESULT}")
    ap.add_argument("--layers", default="2,3,1", help="student sizes, in the order they run (default 2,3,1: the goal's first)")
    g = ap.add_argument_group("the budget (the same for every student)")
    g.add_argument("--steps", type=int, default=150, help="distillation steps (default %(default)s)")
    g.add_argument("--batch-size", type=int, default=32, help="positives per step (default %(default)s)")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default %(default)s)")
    g.add_argument("--temperature", type=float, default=DistillConfig.temperature, help="kd_tia's T (default %(default)s)")
    g.add_argument("--keep-recall", action=argparse.BooleanOptionalAction, default=DistillConfig.keep_recall,
                   help="distill's --keep-recall: the teacher's frozen layers for the recall passes (default %(default)s)")
    g.add_argument("--hidden-weight", type=float, default=DistillConfig.hidden_weight,
                   help="distill's --hidden-weight, kd_hidden's (default %(default)s)")
    g.add_argument("--val-queries", type=int, default=50,
                   help="held-out queries the student's score fusion is refitted on (default %(default)s)")
    g.add_argument("--checkpoint-every", type=int, default=50, help="checkpoints, to resume a cut run (default %(default)s)")
    g = ap.add_argument_group("measurements")
    g.add_argument("--queries", type=int, default=100, help="sample-100 queries, one draw (default %(default)s)")
    g.add_argument("--pairs", type=int, default=512, help="pairs per throughput measurement (default %(default)s)")
    g.add_argument("--rounds", type=int, default=3, help="throughput rounds, best kept (default %(default)s)")
    g.add_argument("--threads", type=int, default=2, help="torch threads (default %(default)s)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    setup_logging()
    try:
        record = run(a)
    except UserError as exc:
        print(f"bench/distill.py: error: {exc}", file=sys.stderr)
        return 2
    print(f"Teacher {a.teacher}; budget per student: {a.steps} steps x {a.batch_size} positives (+ as many mined "
          f"negatives), lr {a.lr}, T {a.temperature}, hidden weight {a.hidden_weight}, "
          f"{'--keep-recall' if a.keep_recall else '--no-keep-recall'}; sample-100 over {a.queries} held-out queries, one draw; "
          f"{record['minutes']} min in all.\n")
    print(table(record))
    return 0


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())

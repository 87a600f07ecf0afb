"""Nightly benchmark: what a night with a few changes costs against a night from scratch. Prints figures;
asserts nothing.

    python bench/nightly.py --catalog ../shared/data/hm-dev/articles.csv --model MODEL --work DIR \
        [--products 2500] [--top-k 10] [--recall-k 10] [--check]

1. Night 1: `fashionbert nightly` over --products rows of the catalog (a seeded sample) into a fresh work folder,
   with --model (trained on the same column mapping, e.g. bench/quality.py's WORK/train-<label>/model).
2. Night 2, on a copy of that catalog where 1% of the products changed (half a new text, half a new photo, taken
   from a catalog row outside the sample), 0.5% were added and 0.5% removed.
3. With --check, a from-scratch `fashionbert retrieve` (no score cache) over night 2's features: night 2's tables
   must equal it.

Prints per night: wall seconds, seconds per stage, cross-encoder pairs scored and reused, embeddings computed and
reused, feature bytes written; then night 2 / night 1 ratios, and with --check how many table rows agree.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HM_MAPPING = ["--id-column", "article_id", "--text-columns", "prod_name,colour_group_name,detail_desc",
              "--category-column", "product_group_name", "--subcategory-column", "product_type_name",
              "--group-column", "product_code"]


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def read_catalog(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    base = path.parent.resolve()
    for row in rows:  # absolute, so the sampled copies can live anywhere
        row["image"] = str(base / row["image"])
    return list(reader.fieldnames or []), rows


def write_catalog(path: Path, fields: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def night_two(rows: list[dict], spare: list[dict], changed: float, churn: float, rng: random.Random) -> tuple[list[dict], dict]:
    """Night 1's rows with `changed` of them edited (half text, half photo), `churn` added and `churn` removed."""
    n = len(rows)
    n_changed, n_churn = max(2, round(changed * n)), max(1, round(churn * n))
    rows = [dict(r) for r in rows]
    picked = rng.sample(range(n), n_changed + n_churn)
    edit, remove = picked[:n_changed], set(picked[n_changed:])
    photos = spare[n_churn:n_churn + n_changed // 2]
    for k, i in enumerate(edit):
        if k < n_changed - n_changed // 2:
            rows[i]["detail_desc"] = (rows[i]["detail_desc"] + " Now in organic cotton.").strip()
        else:
            rows[i]["image"] = photos[k - (n_changed - n_changed // 2)]["image"]
    kept = [r for i, r in enumerate(rows) if i not in remove]
    return kept + spare[:n_churn], {"new_texts": n_changed - n_changed // 2, "new_images": n_changed // 2,
                                    "added": n_churn, "removed": n_churn}


def nightly(catalog: Path, work: Path, model: str, a: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "fashionbert.commands.cli", "nightly", "--catalog", str(catalog), "--workdir",
           str(work), "--model", model, "--top-k", str(a.top_k), "--recall-k", str(a.recall_k), *HM_MAPPING,
           "--no-progress"]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        sys.exit(f"nightly failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads((work / "last-run.json").read_text())
    summary["wall_s"] = round(wall, 1)
    return summary


def describe(summary: dict) -> dict:
    c = summary.get("counts", {})
    return {"wall_s": summary["wall_s"],
            **{f"{name}_s": stage.get("seconds") for name, stage in summary["stages"].items() if "seconds" in stage},
            "pairs_scored": c.get("pairs_scored"), "pairs_reused": c.get("pairs_reused"),
            "embeddings_computed": c.get("embeddings_computed"), "embeddings_reused": c.get("embeddings_reused"),
            "images_computed": c.get("images_computed"), "images_linked": c.get("images_linked"),
            "feature_bytes_written": c.get("feature_bytes_written"), "feature_bytes_linked": c.get("feature_bytes_linked")}


def compare_tables(night: Path, reference: Path) -> dict:
    import numpy as np

    from schemas import read_table

    out = {}
    for name in ("text_to_image.parquet", "image_to_text.parquet"):
        a = read_table(str(night / name), "retrieval").to_pydict()
        b = read_table(str(reference / name), "retrieval").to_pydict()
        rows_a = list(zip(a["query_id"], a["rank"], a["candidate_id"]))
        rows_b = list(zip(b["query_id"], b["rank"], b["candidate_id"]))
        same = sum(x == y for x, y in zip(rows_a, rows_b)) if len(rows_a) == len(rows_b) else 0
        scores = {(q, c): s for q, c, s in zip(a["query_id"], a["candidate_id"], a["score"])}
        diffs = [abs(scores[(q, c)] - s) for q, c, s in zip(b["query_id"], b["candidate_id"], b["score"])
                 if (q, c) in scores]
        out[name] = {"rows": len(rows_b), "same_rows": same, "max_score_diff": float(np.max(diffs)) if diffs else None}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--catalog", required=True, type=Path, help="hm-dev articles.csv (column mapping above)")
    ap.add_argument("--model", required=True, help="model folder trained on the same column mapping")
    ap.add_argument("--work", required=True, type=Path, help="a fresh folder for the catalogs and the work folder")
    ap.add_argument("--products", type=int, default=2500, help="catalog rows in night 1 (default %(default)s)")
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--recall-k", type=int, default=10)
    ap.add_argument("--changed", type=float, default=0.01, help="fraction of products edited on night 2")
    ap.add_argument("--churn", type=float, default=0.005, help="fraction added, and fraction removed, on night 2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true", help="compare night 2's tables with a from-scratch retrieve")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))

    if a.work.exists() and any(a.work.iterdir()):
        sys.exit(f"--work {a.work}: not empty; give a fresh folder (night 1 must start from nothing)")
    a.work.mkdir(parents=True, exist_ok=True)
    fields, rows = read_catalog(a.catalog)
    rng = random.Random(a.seed)
    rng.shuffle(rows)
    sample, spare = rows[:a.products], rows[a.products:]
    first, second = a.work / "catalog-night1.csv", a.work / "catalog-night2.csv"
    write_catalog(first, fields, sample)
    rows2, changes = night_two(sample, spare, a.changed, a.churn, rng)
    write_catalog(second, fields, rows2)
    work = a.work / "workdir"

    _log(f"night 1: {len(sample)} products")
    one = describe(nightly(first, work, a.model, a))
    _log(f"night 1: {json.dumps(one)}")
    _log(f"night 2: {changes}")
    summary2 = nightly(second, work, a.model, a)
    two = describe(summary2)
    _log(f"night 2: {json.dumps(two)}")
    report = {"products": len(sample), "changes": changes, "night1": one, "night2": two,
              "pairs_ratio": round(two["pairs_scored"] / one["pairs_scored"], 4) if one["pairs_scored"] else None,
              "wall_ratio": round(two["wall_s"] / one["wall_s"], 4)}
    if a.check:
        run2 = work / "runs" / summary2["run_id"]
        reference = a.work / "scratch-retrieval"
        _log("check: from-scratch retrieve over night 2's features")
        subprocess.run([sys.executable, "-m", "fashionbert.commands.cli", "retrieve", "--features",
                        str(run2 / "features"), "--model", a.model, "--out", str(reference), "--top-k", str(a.top_k),
                        "--recall-k", str(a.recall_k), "--no-progress"], cwd=ROOT, check=True, capture_output=True)
        report["check"] = compare_tables(run2 / "retrieval", reference)
    print(json.dumps(report, indent=2))
    print(f"\nnight 2 / night 1: cross-encoder pairs {report['pairs_ratio']}, wall time {report['wall_ratio']}")


if __name__ == "__main__":
    main()

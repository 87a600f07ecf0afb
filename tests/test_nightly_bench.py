"""bench/nightly.py: night 2's catalog has the changes it says (edited texts and photos, added and removed rows), and
the table comparison counts agreeing rows and the largest score difference."""
from __future__ import annotations

import random

import pyarrow as pa
import pyarrow.parquet as pq

from bench import nightly as bench
from schemas import RETRIEVAL


def _rows(n: int, start: int = 0) -> list[dict]:
    return [{"article_id": f"a{i:04d}", "detail_desc": f"text {i}", "image": f"/img/{i}.jpg"}
            for i in range(start, start + n)]


def test_night_two_changes_what_it_reports():
    night1, spare = _rows(400), _rows(50, start=1000)
    night2, changes = bench.night_two(night1, spare, changed=0.01, churn=0.005, rng=random.Random(0))
    assert changes == {"new_texts": 2, "new_images": 2, "added": 2, "removed": 2}
    before = {r["article_id"]: r for r in night1}
    after = {r["article_id"]: r for r in night2}
    assert len(set(before) - set(after)) == 2 and set(after) - set(before) == {"a1000", "a1001"}
    kept = set(before) & set(after)
    assert sum(after[a]["detail_desc"] != before[a]["detail_desc"] for a in kept) == 2
    new_photos = [after[a]["image"] for a in kept if after[a]["image"] != before[a]["image"]]
    assert len(new_photos) == 2 and set(new_photos) <= {r["image"] for r in spare[2:]}  # not an added row's photo
    assert night1[0] == _rows(1)[0]  # night 1's rows are not edited in place


def _table(path, rows):
    n = len(rows)
    pq.write_table(pa.Table.from_pydict({
        "query_id": [r[0] for r in rows], "query_kind": ["text"] * n, "rank": [r[1] for r in rows],
        "candidate_id": [r[2] for r in rows], "score": [r[3] for r in rows], "recall_score": [0.5] * n,
        "stage": ["rerank"] * n, "model_version": ["v"] * n, "run_id": ["r"] * n}, schema=RETRIEVAL), path)


def test_compare_tables_counts_agreeing_rows(tmp_path):
    for folder, swap in (("night", False), ("scratch", True)):
        (tmp_path / folder).mkdir()
        rows = [("q1", 1, "i1", 0.9), ("q1", 2, "i2", 0.8), ("q2", 1, "i3", 0.7)]
        if swap:  # a near-tie ordered the other way
            rows = [("q1", 1, "i2", 0.8005), ("q1", 2, "i1", 0.9), ("q2", 1, "i3", 0.7)]
        for name in ("text_to_image.parquet", "image_to_text.parquet"):
            _table(tmp_path / folder / name, rows)
    result = bench.compare_tables(tmp_path / "night", tmp_path / "scratch")
    assert result["text_to_image.parquet"]["rows"] == 3 and result["text_to_image.parquet"]["same_rows"] == 1
    assert abs(result["image_to_text.parquet"]["max_score_diff"] - 0.0005) < 1e-6

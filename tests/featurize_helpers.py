"""Shared helpers for featurize tests: run the pipeline (in-process on the FnApiRunner by default) and read outputs."""
from __future__ import annotations

import csv
import glob
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.config import FeaturizeConfig
from pipelines.featurize import run

HM_DEV = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "hm-dev")
HM_COLUMNS = dict(id_column="article_id", text_columns=("prod_name", "colour_group_name", "detail_desc"),
                  category_column="product_group_name", subcategory_column="product_type_name",
                  group_column="product_code")


def featurize(catalog: str, out: str, beam_args: list[str] | None = None, **kw) -> dict:
    """One featurize run, on the in-process FnApiRunner unless `beam_args` name another runner."""
    cfg = FeaturizeConfig(catalog=str(catalog), out=str(out), progress=False, **kw)
    return run(cfg, beam_args or ["--runner=FnApiRunner"])


def read_kind(out: str, kind: str) -> pa.Table:
    files = sorted(glob.glob(os.path.join(str(out), f"{kind}-*.parquet")))
    return pa.concat_tables([pq.read_table(f) for f in files])


def run_info(out: str) -> dict:
    with open(os.path.join(str(out), "_run.json")) as fh:
        return json.load(fh)


def read_manifest(manifest: str) -> list[dict]:
    with open(manifest, newline="") as fh:
        return list(csv.DictReader(fh))


def write_manifest(manifest: str, rows: list[dict]) -> None:
    with open(manifest, "w", newline="") as fh:
        writer = csv.DictWriter(fh, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def synthetic_row(manifest: str, seed: int, index: int) -> dict:
    """A new synthetic product's manifest row, its image written next to the catalog's others."""
    from fashionbert.data import synth

    p = synth.render_product(seed, index)
    with open(os.path.join(os.path.dirname(manifest), "images", f"{p.image_id}.png"), "wb") as fh:
        fh.write(p.image_bytes)
    return {"product_id": p.product_id, "image_id": p.image_id, "image": f"images/{p.image_id}.png",
            "title": p.title, "description": p.description, "category": p.category, "subcategory": p.subcategory}


def hm_subset(folder: str, n: int, hm_dev: str = HM_DEV) -> str:
    """The first n hm-dev rows as a manifest of absolute image paths (never a copy of the images)."""
    path = os.path.join(str(folder), f"hm-{n}.csv")
    with open(os.path.join(hm_dev, "articles.csv"), newline="") as fin, open(path, "w", newline="") as fout:
        reader = csv.DictReader(fin)
        writer = csv.DictWriter(fout, reader.fieldnames)
        writer.writeheader()
        for i, row in enumerate(reader):
            if i >= n:
                break
            row["image"] = os.path.abspath(os.path.join(hm_dev, row["image"]))
            writer.writerow(row)
    return path


def live_view(out: str) -> dict:
    """A featurize output as every reader sees it (`fashionbert.data.features`, the report's catalog info): texts,
    the image index in order with each image's product, its patch features, and the report's maps."""
    import numpy as np

    from fashionbert.data.features import FeatureReader, index_images, load_texts, open_feature_folder
    from fashionbert.evaluation.report import read_catalog_info

    folder = open_feature_folder(out)
    texts = load_texts([folder])
    index = index_images([folder], texts)
    features = FeatureReader(index.shards, folder.num_patches, folder.feature_dim).read(
        index.shard, index.row_group, index.row)
    report_texts, sources, image_product = read_catalog_info([str(out)])
    return {
        "texts": {pid: ([a.tolist() for a in texts.input_ids[i]], texts.subcategory[i], texts.group_id[i])
                  for pid, i in texts.index.items()},
        "image_ids": index.image_ids,
        "image_products": [texts.product_ids[p] for p in index.product],
        "features": features.view(np.uint16),  # bitwise
        "skipped": (index.skipped_no_text, index.skipped_duplicate),
        "report": (report_texts, {k: v[0] for k, v in sources.items()}, image_product),
    }


def assert_same_view(got: dict, want: dict) -> None:
    import numpy as np

    for key in ("texts", "image_ids", "image_products", "skipped", "report"):
        assert got[key] == want[key], key
    assert got["features"].shape == want["features"].shape and np.array_equal(got["features"], want["features"])

"""Shared helpers for featurize tests: run the pipeline in-process on the FnApiRunner and read outputs."""
from __future__ import annotations

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


def featurize(catalog: str, out: str, **kw) -> dict:
    cfg = FeaturizeConfig(catalog=str(catalog), out=str(out), progress=False, **kw)
    return run(cfg, ["--runner=FnApiRunner"])


def read_kind(out: str, kind: str) -> pa.Table:
    files = sorted(glob.glob(os.path.join(str(out), f"{kind}-*.parquet")))
    return pa.concat_tables([pq.read_table(f) for f in files])


def run_info(out: str) -> dict:
    with open(os.path.join(str(out), "_run.json")) as fh:
        return json.load(fh)

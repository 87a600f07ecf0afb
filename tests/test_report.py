"""The HTML report: sections, marked true matches, embedded thumbnails from every kind of image source (synthetic,
a path relative to the catalog folder, an unreadable one as a placeholder), and, in headless Chromium, that every
image on the page loads."""
from __future__ import annotations

import argparse
import base64
import io
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from fashionbert.errors import UserError
from fashionbert.evaluation import evaluate, report
from fashionbert.rank import retrieve
from tests.fake_features import make_tiny_backbone, write_fake_features
from tests.test_scoring import train_tiny_model

torch.set_num_threads(1)
N_PRODUCTS = 16
CHROMIUM_INSTALL = "apt-get update && apt-get install -y chromium"


def _set_sources(features: Path, catalog: Path) -> dict[str, str]:
    """Point the fake images at real sources: synthetic renders, PNG files relative to the catalog folder
    (recorded as _run.json options.catalog, as featurize does), and one remote URI nobody can read here."""
    (catalog / "images").mkdir(parents=True)
    (catalog / "manifest.csv").write_text("product_id,image\n")
    sources = {}
    for shard in sorted(features.glob("images-*.parquet")):
        table = pq.read_table(shard)
        new = []
        for iid in table.column("image_id").to_pylist():
            n = int(iid[1:6])
            if n % 3 == 0:
                src = f"synthetic:0:{n}"
            elif n == 1:
                src = "https://cdn.example.invalid/p1.jpg"
            else:
                src = f"images/{iid}.png"
                Image.new("RGB", (40 + n, 60), (10 * n, 120, 200)).save(catalog / src)
            new.append(src)
            sources[iid] = src
        table = table.set_column(table.schema.get_field_index("source"), table.schema.field("source"), pa.array(new, pa.string()))
        pq.write_table(table.replace_schema_metadata(pq.read_schema(shard).metadata), shard)
    run = json.loads((features / "_run.json").read_text())
    run["options"]["catalog"] = str(catalog / "manifest.csv")
    (features / "_run.json").write_text(json.dumps(run))
    return sources


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    features = write_fake_features(tmp / "features", n_products=N_PRODUCTS, feature_dim=16)
    sources = _set_sources(features, tmp / "catalog")
    model = train_tiny_model(tmp, features, make_tiny_backbone(tmp / "bert"), steps=3)
    p = argparse.ArgumentParser()
    retrieve.add_arguments(p)
    retrieve.run(retrieve.config_from_args(p.parse_args([
        "--features", str(features), "--model", str(model), "--out", str(tmp / "retrieval"), "--top-k", "10",
        "--recall-k", "12", "--device", "cpu"])))
    p = argparse.ArgumentParser()
    evaluate.add_arguments(p)
    evaluate.run(evaluate.config_from_args(p.parse_args([
        "--features", str(features), "--model", str(model), "--out", str(tmp / "metrics.json"), "--split", "all",
        "--queries", "8", "--draws", "2", "--candidates", "5", "--recall-k", "8", "--device", "cpu"])))
    p = argparse.ArgumentParser()
    report.add_arguments(p)
    args = p.parse_args(["--retrieval", str(tmp / "retrieval"), "--metrics", str(tmp / "metrics.json"),
                         "--training", str(model.parent), "--queries", "4", "--out", str(tmp / "report.html")])
    summary = report.run(report.config_from_args(args))
    return tmp, summary, sources


def test_report_sections_marks_and_embedded_images(built):
    tmp, summary, sources = built
    page = (tmp / "report.html").read_text()
    for heading in ("Metrics", "Sample-100", "Full gallery", "Training curves", "Text → image", "Image → text"):
        assert heading in page
    assert "two-stage, text → image" in page and "recall only (embedding cosine), image → text" in page
    assert "red plain" in page or "striped" in page or "floral" in page  # query texts are shown
    assert page.count("✓ true match") >= 1 and "class='true'" in page
    imgs = re.findall(r"<img src='([^']+)'", page)
    assert len(imgs) == 1 + 4 * 10 + 4  # the curves, 4 text queries x top 10, 4 image queries
    assert all(src.startswith("data:image/") for src in imgs)  # self-contained: nothing to fetch
    assert "https://" not in page
    for src in set(imgs):
        kind, data = src.split(",", 1)
        img = Image.open(io.BytesIO(base64.b64decode(data)))
        img.load()
        assert img.width > 0 and ("png" in kind) == (img.format == "PNG")
    # the one remote image is a labelled placeholder, the others were read (synthetic and relative paths)
    shown_remote = any(r"p00001-0" in m for m in re.findall(r"alt='([^']+)'", page))
    assert summary["placeholders"] == (1 if shown_remote else 0)
    assert summary["text_queries"] == 4 and summary["image_queries"] == 4


def test_sources_resolve_synthetic_relative_and_unreadable(built, tmp_path):
    tmp, _, sources = built
    base = report.catalog_folder({"catalog": str(tmp / "catalog" / "manifest.csv")})
    img, why = report.load_source(sources["p00003-0"], base)
    assert why is None and img.size[0] > 100  # synthetic:0:3 re-rendered
    img, why = report.load_source(sources["p00002-0"], base)
    assert why is None and img.size == (42, 60)
    assert report.load_source(sources["p00001-0"], base) == (None, "remote source")
    assert report.load_source("images/missing.png", base) == (None, "file not found")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    img, why = report.load_source(str(tmp_path / "broken.jpg"), None)
    assert img is None and why


def test_report_user_errors(built, tmp_path):
    tmp, _, _ = built
    p = argparse.ArgumentParser()
    report.add_arguments(p)

    def config(*argv):
        return report.config_from_args(p.parse_args(argv))

    with pytest.raises(UserError, match="no _SUCCESS"):
        report.run(config("--retrieval", str(tmp_path), "--out", str(tmp_path / "r.html")))
    with pytest.raises(UserError, match="training_curves.png"):
        report.run(config("--retrieval", str(tmp / "retrieval"), "--training", str(tmp_path),
                          "--out", str(tmp_path / "r.html")))
    with pytest.raises(UserError, match="--metrics"):
        report.run(config("--retrieval", str(tmp / "retrieval"), "--metrics", str(tmp_path / "none.json"),
                          "--out", str(tmp_path / "r.html")))


def test_images_load_in_headless_chromium(built):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip(f"chromium is not installed (Debian: {CHROMIUM_INSTALL}); the page's images were checked by "
                    f"decoding them in Python instead")
    tmp, summary, _ = built
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
             "--virtual-time-budget=10000", "--dump-dom", (tmp / "report.html").as_uri()],
            capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    body = re.search(r"<body[^>]*>", proc.stdout)
    assert body, proc.stdout[:2000]
    attrs = dict(re.findall(r'(data-images-[a-z]+)="([^"]*)"', body.group(0)))
    assert attrs.get("data-images-checked") == "1", body.group(0)
    assert int(attrs["data-images-total"]) >= summary["images"] and attrs["data-images-broken"] == "0"


def test_help_explains_the_options():
    parser = argparse.ArgumentParser()
    report.add_arguments(parser)
    text = parser.format_help()
    for opt in ("--retrieval", "--metrics", "--training", "--features", "--queries", "--top", "--out"):
        assert opt in text

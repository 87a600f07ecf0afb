"""The HTML report: sections, marked true matches, embedded thumbnails from every kind of image source (synthetic,
a path relative to the catalog folder, an unreadable one as a placeholder), and, in headless Chromium, that every
image on the page loads. With --model: a heatmap over every shown text -> image candidate and the query's words
marked, drawn over the images in Chromium. `fashionbert explain` (same model and sources): pictures, page,
attention.parquet and rejects for given pairs."""
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

import numpy as np
import pyarrow as pa
import pyarrow.csv  # noqa: F401 (pa.csv)
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from fashionbert.errors import UserError
from fashionbert.evaluation import evaluate, explain, heatmaps, report
from fashionbert.rank import retrieve, score_pairs
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
    args = p.parse_args(["--retrieval", str(tmp / "retrieval"), "--queries", "4", "--model", str(model),
                         "--out", str(tmp / "report-heat.html")])
    summary["with_model"] = report.run(report.config_from_args(args))
    return tmp, summary, sources


def test_report_sections_marks_and_embedded_images(built):
    tmp, summary, sources = built
    page = (tmp / "report.html").read_text()
    for heading in ("Metrics", "Sample-100", "Full gallery", "Training curves", "Text → image", "Image → text"):
        assert heading in page
    assert "two-stage, text → image" in page and "recall only (embedding cosine), image → text" in page
    assert "recall only, hubness-corrected cosine, text → image" in page  # evaluate reports it by default
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


def _body_in_chromium(page: Path) -> str:
    """The <body> tag of `page` after headless Chromium loaded it and its scripts ran (skips without chromium)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip(f"chromium is not installed (Debian: {CHROMIUM_INSTALL}); the page's images were checked by "
                    f"decoding them in Python instead")
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
             "--window-size=1400,1000", "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
            capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    body = re.search(r"<body[^>]*>", proc.stdout)
    assert body, proc.stdout[:2000]
    return body.group(0)


def test_images_load_in_headless_chromium(built):
    tmp, summary, _ = built
    body = _body_in_chromium(tmp / "report.html")
    attrs = dict(re.findall(r'(data-images-[a-z]+)="([^"]*)"', body))
    assert attrs.get("data-images-checked") == "1", body
    assert int(attrs["data-images-total"]) >= summary["images"] and attrs["data-images-broken"] == "0"


def test_heatmaps_render_over_their_images_in_headless_chromium(built):
    """Every overlay has its image's size and all its cells, and its hottest cell is what the browser shows on top
    at that cell's centre (heatmaps.CHECK_SCRIPT measures the laid-out page)."""
    tmp, summary, _ = built
    body = _body_in_chromium(tmp / "report-heat.html")
    attrs = dict(re.findall(r'(data-(?:images|heatmaps)-[a-z]+)="([^"]*)"', body))
    assert attrs.get("data-heatmaps-checked") == "1" and attrs.get("data-images-checked") == "1", body
    assert attrs["data-images-broken"] == "0"
    assert int(attrs["data-heatmaps-total"]) == summary["with_model"]["heatmaps"] == 4 * 10
    assert attrs["data-heatmaps-rendered"] == attrs["data-heatmaps-total"]


def test_report_with_model_draws_heatmaps_and_marks_words(built):
    tmp, summary, _ = built
    plain, page = (tmp / "report.html").read_text(), (tmp / "report-heat.html").read_text()
    assert "--model DIR" in plain and "class=heat" not in plain  # without --model: as before, plus how to get them
    assert page.count("<div class=heat ") == 4 * 10 and page.count("class=hot") == 4 * 10
    cells = re.findall(r"<div class=cells[^>]*>(.*?)</div></div>", page)
    assert len(cells) == 40 and all(c.count("<i") == 64 for c in cells)
    shares = [[float(x) for x in re.findall(r"patch \d+: ([\d.]+)%", c)] for c in cells]
    assert all(abs(sum(s) - 100) <= 64 * 0.05 for s in shares)  # each map sums to 1 (64 shares in %, rounded)
    qtexts = re.findall(r"<div class=qtext>(.*?)</div>", page)
    assert len(qtexts) == 4 and all("<mark class=att" in q for q in qtexts)
    # the marks sit on the original text: stripped of them, each query reads as in the plain report
    assert [re.sub(r"<[^>]+>", "", q) for q in qtexts] == re.findall(r"<div class=qtext>(.*?)</div>", plain)
    assert "https://" not in page and "<script src" not in page
    assert summary["with_model"]["text_queries"] == 4


def test_help_explains_the_options():
    parser = argparse.ArgumentParser()
    report.add_arguments(parser)
    text = parser.format_help()
    for opt in ("--retrieval", "--metrics", "--training", "--features", "--queries", "--top", "--model", "--method",
                "--out"):
        assert opt in text


# ============================================================================================ explain
def _explain(tmp: Path, pairs: Path, out: Path, *extra) -> dict:
    p = argparse.ArgumentParser()
    explain.add_arguments(p)
    return explain.run(explain.config_from_args(p.parse_args([
        "--features", str(tmp / "features"), "--model", str(tmp / "train-out" / "model"), "--pairs", str(pairs),
        "--out", str(out), "--device", "cpu", "--no-progress", "--size", "128", *extra])))


def _pairs_file(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("product_id,image_id\n" + "".join(f"{p},{i}\n" for p, i in rows))
    return path


EXPLAIN_ROWS = [("p00002", "p00002-0"), ("p00002", "p00003-0"), ("p99999", "p00002-0"), ("p00004", "p00001-0"),
                ("p00005", "nope")]


@pytest.fixture(scope="module")
def explained(built):
    tmp, _, _ = built
    pairs = _pairs_file(tmp / "explain-pairs.csv", EXPLAIN_ROWS)
    return tmp, pairs, _explain(tmp, pairs, tmp / "explain")


def test_explain_writes_pictures_page_and_maps_for_known_pairs(explained):
    from schemas import read_table

    tmp, pairs, summary = explained
    out = tmp / "explain"
    assert summary["explained"] == 3 and summary["rejected"] == 2 and summary["unreadable_images"] == 1
    assert summary["reject_reasons"] == {"unknown_product_id": 1, "unknown_image_id": 1}
    assert (out / "_SUCCESS").is_file() and sorted(p.name for p in (out / "pairs").iterdir()) == [
        "000000.png", "000001.png", "000003.png"]
    rejects = pq.read_table(out / "rejects.parquet").to_pydict()
    assert rejects["row"] == [2, 4] and rejects["reason"] == ["unknown_product_id", "unknown_image_id"]
    table = read_table(str(out / "attention.parquet"), "attention").to_pydict()
    assert table["row"] == [0, 1, 3] and table["image_id"] == ["p00002-0", "p00003-0", "p00001-0"]
    for patch_map, tokens, mass, rows in zip(table["patch_map"], table["tokens"], table["token_image_mass"],
                                             table["token_patch_maps"]):
        assert len(patch_map) == 64 and abs(sum(patch_map) - 1) < 1e-4
        assert len(tokens) == len(mass) == len(rows) and "[CLS]" not in tokens and "[SEP]" not in tokens
        assert all(abs(sum(r) - 1) < 1e-4 for r in rows) and all(0 < m < 1 for m in mass)
    texts, _, _ = report.read_catalog_info([str(tmp / "features")])
    assert " ".join(table["tokens"][0]) == texts["p00002"]  # the fake texts are whole WordPiece words
    # the score is score-pairs' ranking score of the same rows
    p = argparse.ArgumentParser()
    score_pairs.add_arguments(p)
    score_pairs.run(score_pairs.config_from_args(p.parse_args([
        "--features", str(tmp / "features"), "--model", str(tmp / "train-out" / "model"), "--pairs", str(pairs),
        "--out", str(tmp / "explain-scored.csv"), "--device", "cpu", "--no-progress"])))
    scored = pa.csv.read_csv(tmp / "explain-scored.csv").column("score").to_pylist()
    assert table["score"] == pytest.approx(scored, abs=1e-6)
    page = (out / "index.html").read_text()
    assert page.count("<div class=pair>") == 3 and page.count("<mark class=att") >= 3
    assert "P(aligned) = " in page and "https://" not in page and "not readable here: remote source" in page


def test_explain_picture_tints_the_hottest_patch(explained):
    from PIL import ImageChops

    tmp, _, _ = explained
    row = pq.read_table(tmp / "explain" / "attention.parquet").slice(0, 1).to_pylist()[0]
    picture = Image.open(tmp / "explain" / row["picture"]).convert("RGB")
    assert picture.size == (128, 128)
    base = report.catalog_folder({"catalog": str(tmp / "catalog" / "manifest.csv")})
    original, _ = report.load_source("images/p00002-0.png", base)
    diff = ImageChops.difference(picture, heatmaps.square_view(original, 128)).convert("L")
    cell = 128 // 8

    def change(patch: int) -> float:
        r, c = divmod(patch, 8)
        box = diff.crop((c * cell + 3, r * cell + 3, (c + 1) * cell - 3, (r + 1) * cell - 3))
        return sum(box.getdata()) / (box.width * box.height)

    hot, cold = int(np.argmax(row["patch_map"])), int(np.argmin(row["patch_map"]))
    assert change(hot) > 20 and change(cold) < 2  # the hottest patch tinted, one below an even share untouched


def test_explain_methods_and_user_errors(explained, tmp_path):
    tmp, pairs, summary = explained
    assert summary["method"] == "rollout"  # the default
    last = _explain(tmp, pairs, tmp_path / "last", "--method", "last")
    rolled = pq.read_table(tmp / "explain" / "attention.parquet").column("patch_map").to_pylist()
    table = pq.read_table(tmp_path / "last" / "attention.parquet").to_pydict()
    assert last["method"] == "last" and set(table["method"]) == {"last"}
    assert all(abs(sum(m) - 1) < 1e-4 for m in table["patch_map"]) and table["patch_map"] != rolled
    with pytest.raises(UserError, match="--overwrite"):
        _explain(tmp, pairs, tmp_path / "last")
    none_known = _explain(tmp, _pairs_file(tmp_path / "unknown.csv", [("p99999", "p00002-0")]), tmp_path / "none")
    assert none_known["explained"] == 0 and none_known["rejected"] == 1
    assert pq.read_table(tmp_path / "none" / "attention.parquet").num_rows == 0
    bad = tmp_path / "bad.csv"
    bad.write_text("product,image\np00002,p00002-0\n")
    with pytest.raises(UserError, match="product_id"):
        _explain(tmp, bad, tmp_path / "bad-out")
    with pytest.raises(UserError, match="no such file"):
        _explain(tmp, tmp_path / "none.csv", tmp_path / "bad-out")
    with pytest.raises(UserError, match="--size"):
        _explain(tmp, pairs, tmp_path / "bad-out", "--size", "4")
    with pytest.raises(UserError, match="--model"):
        p = argparse.ArgumentParser()
        explain.add_arguments(p)
        explain.run(explain.config_from_args(p.parse_args([
            "--features", str(tmp / "features"), "--model", str(tmp_path / "no-model"), "--pairs", str(pairs),
            "--out", str(tmp_path / "bad-out")])))


def test_explain_help_explains_the_options():
    from fashionbert.commands import cli

    text = cli.stage_parser("explain").format_help()
    for opt in ("--features", "--model", "--pairs", "--out", "--method", "--size", "--overwrite", "--device",
                "--precision"):
        assert opt in text
    assert "explain" in cli.build_parser().format_help()  # listed among the subcommands

"""fashionbert report: one static HTML page to look at a model's retrieval results.

    fashionbert report --retrieval DIR [--metrics metrics.json] [--training DIR] [--model DIR] --out report.html

Shows sample text queries with their top-10 images (scores, the true match marked), sample image queries with
their top-10 texts likewise, the metric tables of `fashionbert evaluate`, and the training curves plot that
`fashionbert train` writes (OUT/training_curves.png). With --model, each text query's images carry a heatmap of where
its words look over the 8x8 patches, and its most image-attending words are marked (fashionbert/model/attention.py
says what the maps are; `fashionbert explain` draws them for any pairs). Every image is embedded as a small base64
JPEG (the plot as PNG), so the page works when copied anywhere, with no server and no network.

Images are re-read from the catalog through each featurize row's `source`: a path (relative ones against the
catalog folder in the features' _run.json), `file.h5#ROW` (Fashion-Gen, read with h5py), or
`synthetic:SEED:INDEX` (re-rendered). A source that cannot be read here (a remote URI, a moved file) shows a
labelled placeholder, so the page never has a broken image.

Every input and --out may be a URI (gs://...; fashionbert/data/storage.py); the page is one object write there.
"""
from __future__ import annotations

import argparse
import base64
import dataclasses
import datetime
import html
import io
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from fashionbert.data import storage
from fashionbert.data.features import open_feature_folder
from fashionbert.errors import UserError
from fashionbert.evaluation import heatmaps
from fashionbert.runtime import stage_config

TOP = 10
CURVES = "training_curves.png"


# ============================================================================================ images
def catalog_folder(options: dict) -> str | None:
    """The folder relative image paths of a featurize run are relative to (the manifest's folder)."""
    catalog = str(options.get("catalog") or "")
    if not catalog or catalog.startswith("synthetic:"):
        return None
    if "://" in catalog:
        return catalog.rsplit("/", 1)[0]
    return catalog if os.path.isdir(catalog) else os.path.dirname(os.path.abspath(catalog))


def load_source(source: str, base: str | None):
    """-> (PIL image, None) or (None, why it could not be read)."""
    from PIL import Image, ImageOps

    try:
        if source.startswith("synthetic:"):
            from fashionbert.data.synth import render_product

            _, seed, index = source.split(":")
            data = render_product(int(seed), int(index)).image_bytes
            return Image.open(io.BytesIO(data)).convert("RGB"), None
        path, _, row = source.rpartition("#")
        if path.lower().endswith((".h5", ".hdf5")) and row.isdigit():
            import h5py

            with h5py.File(_local(path, base), "r") as h5:
                return Image.fromarray(np.asarray(h5["input_image"][int(row)])).convert("RGB"), None
        local = _local(source, base)
        with Image.open(local) as img:
            return ImageOps.exif_transpose(img).convert("RGB"), None
    except _Unreadable as exc:
        return None, str(exc)
    except ImportError as exc:
        return None, f"needs {exc.name}"
    except Exception as exc:  # any unreadable image (missing, corrupt, a decompression bomb) becomes a placeholder
        return None, type(exc).__name__


class _Unreadable(Exception):
    """A source this machine cannot open; the message is the placeholder's label."""


def _local(source: str, base: str | None) -> str:
    if source.startswith("file://"):
        return source[len("file://"):]
    if "://" in source:
        raise _Unreadable("remote source")
    if os.path.isabs(source):
        path = source
    elif base is None or "://" in base:
        raise _Unreadable("catalog folder unknown" if base is None else "remote source")
    else:
        path = os.path.join(base, source)
    if not os.path.exists(path):
        raise _Unreadable("file not found")
    return path


def placeholder(size: int, note: str):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (225, 225, 225))
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, 0, size - 1, size - 1], outline=(170, 170, 170))
    draw.text((6, size // 2 - 12), "no image", fill=(90, 90, 90))
    draw.text((6, size // 2 + 2), note[:18], fill=(90, 90, 90))
    return img


def thumbnail_uri(img, size: int) -> str:
    img = img.copy()
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=82)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class Thumbnails:
    """image_id -> embedded JPEG thumbnail, each source read at most once."""

    def __init__(self, sources: dict[str, tuple[str, str | None]], size: int):
        self.sources = sources  # image_id -> (source, catalog folder)
        self.size = size
        self.cache: dict[str, tuple[str, str | None]] = {}
        self.missing = 0

    def get(self, image_id: str) -> tuple[str, str | None]:
        """-> (data URI, None) or (placeholder data URI, why)."""
        if image_id not in self.cache:
            source, base = self.sources.get(image_id, ("", None))
            img, why = load_source(source, base) if source else (None, "unknown image id")
            if img is None:
                self.missing += 1
                self.cache[image_id] = (thumbnail_uri(placeholder(self.size, why), self.size), why)
            else:
                self.cache[image_id] = (thumbnail_uri(img, self.size), None)
        return self.cache[image_id]


# ============================================================================================ inputs
def read_catalog_info(features: Sequence[str]) -> tuple[dict[str, str], dict[str, tuple[str, str | None]], dict[str, str]]:
    """-> (product_id -> text, image_id -> (source, catalog folder), image_id -> product_id)."""
    from schemas import read_table

    texts: dict[str, str] = {}
    sources: dict[str, tuple[str, str | None]] = {}
    image_product: dict[str, str] = {}
    for path in features:
        folder = open_feature_folder(path)
        base = catalog_folder(folder.options)
        for shard in folder.text_shards:
            with storage.arrow_input(shard) as source:
                d = read_table(source, "texts", columns=["product_id", "text"], where=shard).to_pydict()
            for pid, text in zip(d["product_id"], d["text"]):
                texts.setdefault(pid, text)
        for shard in folder.image_shards:
            with storage.arrow_input(shard) as source:
                table = read_table(source, "images", columns=["image_id", "product_id", "source"], where=shard)
            live = folder.live_mask(shard, table.num_rows)
            d = (table if live is None else table.filter(live)).to_pydict()
            for iid, pid, src in zip(d["image_id"], d["product_id"], d["source"]):
                sources.setdefault(iid, (src, base))
                image_product.setdefault(iid, pid)
    return texts, sources, image_product


def read_queries(path: str, count: int, seed: int) -> dict[str, list[dict]]:
    """`count` seeded sample queries of a retrieval table, read as a downstream system would (pyarrow, filtered on
    query_id) -> query_id -> rows by rank."""
    with storage.arrow_input(path) as source:
        return _sample_queries(source, count, seed)


def _sample_queries(source, count: int, seed: int) -> dict[str, list[dict]]:
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    # One row per query (its rank 1), not the whole column: the table has K rows per query.
    firsts = pq.read_table(source, columns=["query_id"], filters=ds.field("rank") == 1).column("query_id").to_pylist()
    ids = np.unique(np.asarray(firsts, dtype=object))
    if not len(ids):
        return {}
    rng = np.random.default_rng([seed, 0x4E7])
    chosen = sorted(rng.choice(ids, size=min(count, len(ids)), replace=False).tolist())
    rows = pq.read_table(source, filters=ds.field("query_id").isin(chosen)).to_pylist()
    out: dict[str, list[dict]] = {q: [] for q in chosen}
    for r in rows:
        out[r["query_id"]].append(r)
    for q in out:
        out[q].sort(key=lambda r: r["rank"])
    return out


# ============================================================================================ html
STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{margin-bottom:4px} h2{margin-top:36px;border-bottom:1px solid #ddd;padding-bottom:4px}
.meta{color:#666;font-size:13px} table{border-collapse:collapse;margin:8px 0 16px}
td,th{border:1px solid #ddd;padding:4px 10px;text-align:right;font-size:14px} th{background:#f5f5f5}
td:first-child,th:first-child{text-align:left}
.query{margin:18px 0;padding:12px;border:1px solid #e3e3e3;border-radius:6px}
.qtext{font-size:15px;margin-bottom:8px} .qid{color:#777;font-size:12px}
.row{display:flex;flex-wrap:wrap;gap:6px} .cand{width:122px;font-size:12px;text-align:center}
.cand img,.qimg img{border:3px solid transparent;border-radius:4px;display:block;margin:0 auto}
.cand.true img{border-color:#1a9e3a} .cand.true .lab{color:#1a9e3a;font-weight:bold}
.texts{list-style:none;padding:0;margin:0;flex:1} .texts li{padding:3px 6px;font-size:13px;border-bottom:1px solid #f0f0f0}
.texts li.true{background:#e6f6ea;font-weight:bold} .score{color:#555;font-variant-numeric:tabular-nums}
.note{color:#a15c00;font-size:13px} .flex{display:flex;gap:16px;align-items:flex-start}
"""

# Sets data attributes once every <img> has finished loading, so a headless browser (or a person's devtools)
# can check that the page's images all decode: data-images-checked, data-images-total, data-images-broken.
CHECK_SCRIPT = """
function fbCheckImages(){
  var imgs=Array.prototype.slice.call(document.images);
  if(!imgs.every(function(i){return i.complete;})){setTimeout(fbCheckImages,50);return;}
  var broken=imgs.filter(function(i){return !(i.naturalWidth>0);}).length;
  document.body.setAttribute('data-images-total',String(imgs.length));
  document.body.setAttribute('data-images-broken',String(broken));
  document.body.setAttribute('data-images-checked','1');
}
window.addEventListener('load',fbCheckImages);
"""


def _e(x) -> str:
    return html.escape(str(x))


def _fmt(v) -> str:
    if isinstance(v, dict) and "mean" in v:
        return f"{100 * v['mean']:.2f} ± {100 * v['std']:.2f}"
    if isinstance(v, float):
        return "—" if np.isnan(v) else f"{100 * v:.2f}"
    return _e(v)


def metrics_html(m: dict) -> str:
    parts = []
    s = m.get("sample100")
    if s:
        parts.append(f"<h3>Sample-100 (Rank@K, %, mean ± std over {s.get('draws')} draws of {s.get('queries')} queries; "
                     f"{s.get('candidates_mean', 0):.1f} candidates per query)</h3>")
        rows = "".join(f"<tr><td>{name}</td>" + "".join(f"<td>{_fmt(s[d][f'rank{k}'])}</td>" for k in (1, 5, 10)) + "</tr>"
                       for d, name in (("t2i", "text → image"), ("i2t", "image → text")) if d in s)
        chance = s.get("chance", {})
        rows += "<tr><td>chance</td>" + "".join(f"<td>{_fmt(chance.get(f'rank{k}', float('nan')))}</td>" for k in (1, 5, 10)) + "</tr>"
        parts.append(f"<table><tr><th>direction</th><th>Rank@1</th><th>Rank@5</th><th>Rank@10</th></tr>{rows}</table>")
    t = m.get("tia")
    if t:
        parts.append("<h3>Text-image alignment (%)</h3><table><tr><th>metric</th><th>value</th></tr>"
                     f"<tr><td>accuracy (P&gt;0.5, balanced pairs)</td><td>{_fmt(t['accuracy'])}</td></tr>"
                     f"<tr><td>ROC AUC</td><td>{_fmt(t['auc'])}</td></tr></table>")
    g = m.get("full_gallery")
    if g:
        parts.append(f"<h3>Full gallery ({g['texts']} texts × {g['images']} images; recall-k {g['recall_k']}, "
                     f"index {_e(g.get('index'))}) (%)</h3>")
        rows = ""
        for label, key in (("two-stage", "two_stage"), ("recall only (embedding cosine)", "recall_only"),
                           ("recall only, hubness-corrected cosine", "recall_hub"),
                           ("exhaustive cross-encoder", "exhaustive")):
            if key in g:
                for d, name in (("t2i", "text → image"), ("i2t", "image → text")):
                    rows += f"<tr><td>{label}, {name}</td>" + "".join(f"<td>{_fmt(g[key][d][f'rank{k}'])}</td>" for k in (1, 5, 10)) + "</tr>"
        parts.append(f"<table><tr><th>ranking</th><th>Rank@1</th><th>Rank@5</th><th>Rank@10</th></tr>{rows}</table>")
        rec = g.get("recall", {})
        if rec:
            ks = list(next(iter(rec.values())).keys())
            rows = "".join(f"<tr><td>{name}</td>" + "".join(f"<td>{_fmt(rec[d][k])}</td>" for k in ks) + "</tr>"
                           for d, name in (("t2i", "text → image"), ("i2t", "image → text")) if d in rec)
            parts.append("<table><tr><th>recall stage</th>" + "".join(f"<th>{_e(k)}</th>" for k in ks) + f"</tr>{rows}</table>")
        c = g.get("cost", {})
        if c:
            parts.append(f"<p class=meta>cross-encoder pairs: {c['cross_encoder_pairs']:,} (exhaustive would be "
                         f"{c['exhaustive_pairs']:,}); seconds: {_e(c.get('seconds'))}</p>")
    if m.get("recall_embedding"):
        parts.append(f"<p class=meta>recall embedding: {_e(m['recall_embedding'])}</p>")
    return "".join(parts) or "<p>No metrics in the file.</p>"


def t2i_html(queries: dict[str, list[dict]], texts: dict[str, str], thumbs: Thumbnails, image_product: dict[str, str],
             top: int, attention=None) -> str:
    """`attention` (report_attention.ReportAttention, with --model): heatmaps over the images, words marked."""
    out = []
    for qid, rows in queries.items():
        true_ranks = [r["rank"] for r in rows if image_product.get(r["candidate_id"]) == qid]
        cells = []
        for r in rows[:top]:
            uri, why = thumbs.get(r["candidate_id"])
            true = image_product.get(r["candidate_id"]) == qid
            label = "✓ true match" if true else f"#{r['rank']}"
            img = f"<img src='{uri}' alt='{_e(r['candidate_id'])}' title='{_e(r['candidate_id'])}'>"
            if attention is not None:
                img = attention.image_html(qid, r["candidate_id"], uri, thumbs.size, img)
            cells.append(f"<div class='cand{' true' if true else ''}'>{img}<div class=lab>{_e(label)}</div>"
                         f"<div class=score>P={r['score']:.3f} · cos={r['recall_score']:.3f}</div></div>")
        where = (f"true image at rank {true_ranks[0]}" if true_ranks else
                 f"true image not in this query's {len(rows)} retrieved candidates")
        text = texts.get(qid)
        shown = _e(text if text is not None else "(text not found)")
        if attention is not None and text is not None:
            shown = attention.text_html(qid, text)
        out.append(f"<div class=query><div class=qtext>{shown}</div>"
                   f"<div class=qid>product {_e(qid)} · {where}</div><div class=row>{''.join(cells)}</div></div>")
    return "".join(out) or "<p>No text queries in the table.</p>"


def i2t_html(queries: dict[str, list[dict]], texts: dict[str, str], thumbs: Thumbnails, image_product: dict[str, str],
             top: int) -> str:
    out = []
    for qid, rows in queries.items():
        own = image_product.get(qid)
        uri, why = thumbs.get(qid)
        true_ranks = [r["rank"] for r in rows if r["candidate_id"] == own]
        items = "".join(
            f"<li class='{'true' if r['candidate_id'] == own else ''}'><span class=score>#{r['rank']} "
            f"P={r['score']:.3f} · cos={r['recall_score']:.3f}</span> {'✓ ' if r['candidate_id'] == own else ''}"
            f"{_e(texts.get(r['candidate_id'], r['candidate_id']))}</li>" for r in rows[:top])
        where = (f"true text at rank {true_ranks[0]}" if true_ranks else
                 f"true text not in this query's {len(rows)} retrieved candidates")
        out.append(f"<div class=query><div class=flex><div class=qimg><img src='{uri}' alt='{_e(qid)}'>"
                   f"<div class=qid>image {_e(qid)}<br>product {_e(own)}<br>{where}</div></div>"
                   f"<ul class=texts>{items}</ul></div></div>")
    return "".join(out) or "<p>No image queries in the table.</p>"


# ============================================================================================ command
@dataclasses.dataclass(frozen=True)
class ReportConfig:
    retrieval: str = ""
    out: str = ""
    metrics: str | None = None
    training: str | None = None
    features: list[str] | None = None  # None: the ones recorded in the retrieval folder's _run.json
    queries: int = 6
    top: int = TOP
    thumb_size: int = 112
    seed: int = 0
    model: str | None = None  # a model folder: heatmaps of where the text queries' words look in their top images
    method: str = "rollout"


def config_from_args(args: argparse.Namespace) -> ReportConfig:
    return stage_config(ReportConfig, args)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = ReportConfig()
    parser.add_argument("--retrieval", required=True, metavar="DIR",
                        help="output folder of `fashionbert retrieve` (text_to_image.parquet, image_to_text.parquet)")
    parser.add_argument("--metrics", metavar="FILE", default=d.metrics, help="metrics JSON of `fashionbert evaluate`")
    parser.add_argument("--training", metavar="DIR", default=d.training,
                        help=f"output folder of `fashionbert train`, for its {CURVES}")
    parser.add_argument("--features", action="append", metavar="DIR", default=d.features,
                        help="featurize output folder(s) for texts and image sources (default: the ones recorded in "
                             "the retrieval folder's _run.json)")
    parser.add_argument("--queries", type=int, default=d.queries, help="sample queries shown per direction (default 6)")
    parser.add_argument("--top", type=int, default=d.top, help="candidates shown per query (default %(default)s)")
    parser.add_argument("--thumb-size", type=int, default=d.thumb_size, help="thumbnail size in pixels (default 112)")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the sample queries (default 0)")
    parser.add_argument("--model", metavar="DIR", default=d.model,
                        help="model folder (OUT/model of `fashionbert train`, the one that ranked the retrieval): "
                             "each text query's shown images get a heatmap of where its words look, and its most "
                             "image-attending words are marked (see `fashionbert explain`)")
    parser.add_argument("--method", choices=("rollout", "last"), default=d.method,
                        help="with --model: attention rollout through every layer, or the last layer's attention (see "
                             "`fashionbert explain --help`) (default %(default)s)")
    parser.add_argument("--out", required=True, metavar="FILE", help="HTML file to write (replaced atomically)")


def _folder(path: str, option: str) -> str:
    """A folder option as messages name it: a URI as given, a local path with ~ expanded."""
    storage.resolve(path, option)
    return path.rstrip("/") if storage.is_remote(path) else str(Path(path).expanduser())


def run(config: ReportConfig) -> dict:
    from fashionbert.rank.retrieve import IMAGE_TO_TEXT, RUN_JSON, TEXT_TO_IMAGE

    out = storage.check_out_file(config.out, "--out")
    retrieval = _folder(config.retrieval, "--retrieval")
    if not storage.is_complete(retrieval):
        raise UserError(f"--retrieval {retrieval}: not a finished `fashionbert retrieve` output (no _SUCCESS); run "
                        f"`fashionbert retrieve --features DIR --model DIR --out {retrieval}` first")
    run_json = storage.join(retrieval, RUN_JSON)
    run_info = json.loads(storage.read_text(run_json)) if storage.exists(run_json) else {}
    features = config.features or run_info.get("features")
    if not features:
        raise UserError(f"--retrieval {retrieval} does not record its features folder; pass --features DIR")
    metrics = None
    if config.metrics:
        path = storage.resolve(config.metrics, "--metrics")
        if not storage.exists(path):
            raise UserError(f"--metrics {config.metrics}: no such file; run `fashionbert evaluate ... --out "
                            f"{config.metrics}` or leave the option out")
        try:
            metrics = json.loads(storage.read_text(path))
        except json.JSONDecodeError as exc:
            raise UserError(f"--metrics {config.metrics}: not valid JSON ({exc})") from exc
    curves_uri = None
    if config.training:
        png = storage.join(_folder(config.training, "--training"), CURVES)
        if not storage.exists(png):
            raise UserError(f"--training {config.training}: no {CURVES} there; point it at the --out folder of "
                            f"`fashionbert train` (it writes the plot when matplotlib is installed)")
        curves_uri = "data:image/png;base64," + base64.b64encode(storage.read_bytes(png)).decode("ascii")

    texts, sources, image_product = read_catalog_info(features)
    thumbs = Thumbnails(sources, config.thumb_size)
    t2i = read_queries(storage.join(retrieval, TEXT_TO_IMAGE), config.queries, config.seed)
    i2t = read_queries(storage.join(retrieval, IMAGE_TO_TEXT), config.queries, config.seed)
    attention = None
    if config.model:
        from fashionbert.evaluation.report_attention import ReportAttention

        attention = ReportAttention(config.model, features, t2i, config.top, config.method)
    model = run_info.get("model", {})
    generated = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = [
        "<h1>FashionBERT retrieval report</h1>",
        f"<p class=meta>model {_e(model.get('version', '?'))} ({_e(model.get('path', ''))}) · retrieval run "
        f"{_e(run_info.get('run_id', '?'))} · recall embedding: {_e(run_info.get('recall_embedding', '?'))} · "
        f"generated {generated}</p>",
        "<h2>Metrics</h2>", metrics_html(metrics) if metrics else "<p>No --metrics given.</p>",
        "<h2>Training curves</h2>",
        f"<img src='{curves_uri}' alt='training curves' style='max-width:100%'>" if curves_uri else "<p>No --training given.</p>",
        f"<h2>Text → image: sample queries, top {config.top}</h2>",
        f"<p class=meta>P = the ranking score P(aligned) (the rank order: {_e(run_info.get('ranking_score', 'TIA head'))}); "
        "cos = recall-stage cosine. Green: the query product's own image.</p>",
        attention_legend(attention),
        t2i_html(t2i, texts, thumbs, image_product, config.top, attention),
        f"<h2>Image → text: sample queries, top {config.top}</h2>",
        i2t_html(i2t, texts, thumbs, image_product, config.top),
    ]
    if thumbs.missing:
        body.insert(2, f"<p class=note>{thumbs.missing} image(s) could not be read from their catalog source here and "
                       f"show a placeholder.</p>")
    page = ("<!DOCTYPE html><html lang=en><head><meta charset='utf-8'><title>FashionBERT report</title>"
            f"<style>{STYLE}{heatmaps.STYLE if attention else ''}</style><script>{CHECK_SCRIPT}"
            f"{heatmaps.CHECK_SCRIPT if attention else ''}</script></head><body>{''.join(body)}</body></html>")
    storage.write_text(out, page)
    return {"out": out, "text_queries": len(t2i), "image_queries": len(i2t), "images": len(thumbs.cache),
            "placeholders": thumbs.missing, "heatmaps": len(attention.maps) if attention else 0,
            "bytes": len(page.encode("utf-8"))}


def attention_legend(attention) -> str:
    if attention is None:
        return ("<p class=meta>Heatmaps of where each query's words look in its top images: run `fashionbert report` "
                "with --model DIR (the model folder that ranked them).</p>")
    return attention.legend()

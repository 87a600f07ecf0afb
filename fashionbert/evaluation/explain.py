"""fashionbert explain: where a pair's words looked in its image, as pictures and as data.

    fashionbert explain --model DIR --features DIR --pairs FILE --out DIR [--method rollout|last]

`--pairs` is what `fashionbert score-pairs` reads (Parquet or CSV, columns product_id and image_id). For each row
whose ids --features knows, OUT gets:
- pairs/NNNNNN.png: the image squared as the model saw it, each of its grid x grid patches tinted by the share of the
  text's attention it gets (the hottest outlined), the grid drawn;
- index.html: every pair with its picture, its ranking score P(aligned) (as score-pairs gives it) and its text with
  the words that attend to the image most marked; self-contained (the pictures embedded), no network;
- attention.parquet (schemas.ATTENTION): per pair the input row, ids, score, TIA margin, method, the patch map (grid x
  grid values, row-major, summing to 1), the word tokens, each token's image mass and its own patch map;
- rejects.parquet (schemas.PAIR_REJECTS): rows with a missing or unknown id, with the reason, as score-pairs.
The folder is published atomically (staging folder, _SUCCESS, rename).

What the maps mean is in fashionbert/model/attention.py: which patches the text's tokens attend to in the last
layer, or through all layers (rollout). Attention shows where the model gathered information, not why it scored the
pair as it did.
"""
from __future__ import annotations

import argparse
import base64
import dataclasses
import html
import io
import time
from typing import Sequence

import numpy as np
import torch

from fashionbert.data import publish, storage
from fashionbert.data.batching import pad_texts
from fashionbert.data.feature_catalog import Catalog, ImageSource, IndexedImages
from fashionbert.errors import UserError
from fashionbert.evaluation import heatmaps
from fashionbert.model.attention import METHODS, token_patch_attention
from fashionbert.model.loading import LoadedModel
from fashionbert.rank.cross_encoder import BatchingOptions, add_batching_arguments
from fashionbert.rank.score_pairs import add_pair_inputs, score_pairs_file, write_rejects
from fashionbert.runtime import RuntimeOptions, add_runtime_arguments, stage_config

ATTENTION_FILE = "attention.parquet"
REJECTS_FILE = "rejects.parquet"
INDEX_FILE = "index.html"
BATCH_PAIRS = 16  # attention weights of every layer are kept for a batch: ~ layers x (T+P)^2 x 4 bytes a pair


@dataclasses.dataclass
class PairAttention:
    """One pair's maps (fashionbert/model/attention.py), with the token ids the model read."""

    ids: np.ndarray  # the token ids of the pass ([CLS] ... [SEP], truncated to the model's max_text_len)
    positions: np.ndarray  # the word tokens' positions in `ids`
    image_mass: np.ndarray  # (n,) per word token
    token_maps: np.ndarray  # (n, P)
    patch_map: np.ndarray  # (P,)
    margin: float


def text_tokenizer(loaded: LoadedModel):
    """The WordPiece tokenizer a model folder carries (training saves it there), else its backbone's."""
    from fashionbert.model.backbone import load_tokenizer

    folder = loaded.folder
    own = (folder / "vocab.txt").is_file() or (folder / "tokenizer.json").is_file()
    return load_tokenizer(folder if own else loaded.config.backbone)


def explain_pairs(model, texts: Sequence[np.ndarray], images: ImageSource, pairs: np.ndarray, method: str = "rollout",
                  batch_pairs: int = BATCH_PAIRS) -> list[PairAttention]:
    """Maps of (text index, image index) pairs, in their order. `model`: in eval mode on its device, in the dtype it
    scores in (a `CrossEncoderScorer`'s model)."""
    cfg = model.config
    device = next(model.parameters()).device
    out: list[PairAttention] = []
    for start in range(0, len(pairs), batch_pairs):
        batch = np.asarray(pairs[start:start + batch_pairs], dtype=np.int64)
        ids, mask = pad_texts([texts[t] for t in batch[:, 0]], cfg.max_text_len, cfg.pad_token_id, cfg.sep_token_id)
        feats = torch.from_numpy(np.ascontiguousarray(images.read(batch[:, 1]))).to(device)
        maps = token_patch_attention(model, torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device),
                                     feats, method)
        for b in range(len(batch)):
            out.append(PairAttention(ids[b][mask[b] == 1], maps.token_positions[b], maps.image_mass[b],
                                     maps.token_maps[b], maps.patch_map[b], float(maps.margin[b])))
    return out


# ============================================================================================ command
@dataclasses.dataclass(frozen=True)
class ExplainConfig(BatchingOptions, RuntimeOptions):
    features: list[str] = dataclasses.field(default_factory=list)
    model: str = ""
    pairs: str = ""
    out: str = ""
    method: str = "rollout"  # on hm-dev the last layer's map is mostly background and stopwords: README, "explain"
    size: int = 256
    overwrite: bool = False


def config_from_args(args: argparse.Namespace) -> ExplainConfig:
    return stage_config(ExplainConfig, args)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = ExplainConfig()
    g = add_pair_inputs(parser, ", as score-pairs reads (the features' image sources are re-read for the pictures)")
    g.add_argument("--out", required=True, metavar="DIR",
                   help=f"folder for pairs/*.png, {INDEX_FILE}, {ATTENTION_FILE} and {REJECTS_FILE} (published "
                        f"atomically)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --out folder")
    m = parser.add_argument_group("maps")
    m.add_argument("--method", choices=METHODS, default=d.method,
                   help="rollout = attention rollout through every layer (each layer's head-averaged attention "
                        "plus the residual, multiplied); last = the last layer's attention, heads averaged (on hm-dev "
                        "mostly background patches and stopwords) (default %(default)s)")
    m.add_argument("--size", type=int, default=d.size, help="side of each picture in pixels (default %(default)s)")
    add_batching_arguments(add_runtime_arguments(parser))


def catalog_views(catalog: Catalog) -> tuple[dict[str, str], dict[str, tuple[str, str | None]], str]:
    """product_id -> text, image_id -> (source, catalog folder), and how featurize squared the images ("pad" or
    "crop": the first features folder's --fit)."""
    from fashionbert.evaluation.report import read_catalog_info

    texts, sources, _ = read_catalog_info([str(f.path) for f in catalog.folders])
    return texts, sources, str(catalog.folders[0].options.get("fit") or "pad")


def _picture(source: tuple[str, str | None] | None, size: int, fit: str, patch_map: np.ndarray, grid: int):
    """(overlay PIL image, None) or (placeholder with the grid, why the source could not be read)."""
    from fashionbert.evaluation.report import load_source, placeholder

    img, why = load_source(*source) if source else (None, "unknown image id")
    square = heatmaps.square_view(img, size, fit) if img is not None else placeholder(size, why)
    return heatmaps.overlay_image(square, patch_map, grid), why


def _png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _attention_table(rows: list[dict]):
    import pyarrow as pa

    from schemas import ATTENTION

    return pa.Table.from_pylist(rows, schema=ATTENTION)


def _index_html(entries: list[dict], method: str, summary: dict) -> str:
    items = "".join(
        f"<div class=pair><img src='data:image/png;base64,{e['png_b64']}' alt='{html.escape(e['image_id'])}'>"
        f"<div class=info><div class=ids>row {e['row']} · product {html.escape(e['product_id'])} · image "
        f"{html.escape(e['image_id'])}</div><div class=score>P(aligned) = {e['score']:.3f} · TIA margin "
        f"{e['margin']:.3f}{' · image not readable here: ' + html.escape(e['why']) if e['why'] else ''}</div>"
        f"<div class=text>{e['text_html']}</div><div class=looks>words looking at the image most: "
        f"{html.escape(', '.join(e['top_words']))}</div></div></div>" for e in entries)
    style = (".pair{display:flex;gap:16px;margin:14px 0;padding:10px;border:1px solid #e3e3e3;border-radius:6px}"
             ".info{flex:1} .ids{color:#777;font-size:12px} .score{margin:4px 0;font-size:14px} .text{font-size:15px}"
             "body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1100px}" + heatmaps.STYLE)
    return ("<!DOCTYPE html><html lang=en><head><meta charset='utf-8'><title>FashionBERT explain</title>"
            f"<style>{style}</style></head><body><h1>Where the words look</h1>"
            f"<p class=ids>model {html.escape(summary['model_version'])} · method {method} · {len(entries)} pairs · "
            f"{summary['rejected']} rejected (see {REJECTS_FILE}). Each patch is tinted by its share of the text's "
            f"attention to the image; marked words attend to the image most. Attention shows where the model "
            f"gathered information, not why it scored the pair as it did.</p>{items}</body></html>")


def run(config: ExplainConfig) -> dict:
    t_start = time.time()
    if config.size < 16:
        raise UserError(f"--size {config.size}: use at least 16 pixels")
    out = storage.resolve(config.out, "--out")
    storage.check_target(out, config.overwrite)
    scored = score_pairs_file(config)
    table, loaded, catalog, resolved, scores = (scored.table, scored.loaded, scored.catalog, scored.resolved,
                                                scored.scores)
    rt = scored.scorer.runtime
    maps = explain_pairs(scored.scorer.model, catalog.text_ids, IndexedImages(catalog.index, catalog.reader),
                         resolved.pairs, config.method)
    tokenizer = text_tokenizer(loaded)
    texts, sources, fit = catalog_views(catalog)

    storage.clean_stale_staging(out)
    staging = storage.staging_path(out, publish.new_run_id())
    storage.make_folder(storage.join(staging, "pairs"))
    rows, entries, unreadable = [], [], 0
    grid = int(loaded.config.grid)
    for k, (row, (t, i), a) in enumerate(zip(resolved.keep, resolved.pairs, maps)):
        pid, iid = catalog.texts.product_ids[t], catalog.index.image_ids[i]
        picture, why = _picture(sources.get(iid), config.size, fit, a.patch_map, grid)
        unreadable += why is not None
        png = _png_bytes(picture)
        name = f"pairs/{row:06d}.png"
        storage.write_bytes(storage.join(staging, name), png)
        tokens = tokenizer.convert_ids_to_tokens([int(x) for x in a.ids])
        rows.append({"row": row, "product_id": pid, "image_id": iid, "score": float(scores[k]),
                     "tia_margin": a.margin, "method": config.method, "picture": name,
                     "patch_map": a.patch_map.tolist(), "tokens": [tokens[int(p)] for p in a.positions],
                     "token_image_mass": a.image_mass.tolist(), "token_patch_maps": a.token_maps.tolist()})
        entries.append({"row": row, "product_id": pid, "image_id": iid, "score": float(scores[k]), "margin": a.margin,
                        "why": why, "png_b64": base64.b64encode(png).decode("ascii"),
                        "text_html": heatmaps.highlight_html(texts.get(pid, ""), a.ids, a.positions, a.image_mass,
                                                             tokenizer),
                        "top_words": heatmaps.top_words(tokens, a.positions, a.image_mass)})
    import pyarrow.parquet as pq

    storage.write_file(storage.join(staging, ATTENTION_FILE), lambda fh: pq.write_table(_attention_table(rows), fh))
    write_rejects(resolved.rejects, storage.join(staging, REJECTS_FILE))
    summary = {"pairs": table.num_rows, "explained": len(rows), "rejected": len(resolved.rejects["row"]),
               "reject_reasons": resolved.reject_reasons(), "unreadable_images": unreadable, "method": config.method,
               "model_version": loaded.version, "device": str(rt.device), "precision": rt.precision, "out": out}
    storage.write_text(storage.join(staging, INDEX_FILE), _index_html(entries, config.method, summary))
    storage.publish_folder(staging, out)
    return summary | {"seconds": round(time.time() - t_start, 3)}


"""Pictures of token -> patch attention maps (fashionbert/model/attention.py): a heatmap over the image's grid and the
text with its most image-attending words marked. Used by `fashionbert report --model` and `fashionbert explain`.

The grid is the model's: featurize squares each image (pad: the long side scaled to the square and the short side
padded, centred; crop: the short side scaled and the rest centre-cropped) and cuts the square into grid x grid
patches, row-major from the top left. A heatmap must lie over that square, so the PNG is drawn on the image squared
the same way (`square_view`), and the HTML overlay shows the image with CSS `object-fit` contain (pad) or cover
(crop) in a square box with the grid of cells above it. Pad colour: white, not featurize's border median (only the
cells' positions matter here).

Cell opacity shows how far a patch's share of the map exceeds an even share (1 / patches), relative to the hottest
patch's excess: the hottest cell is the most opaque, a patch at or below an even share is not tinted, and an even map
tints nothing. Maps of different pairs are therefore not on one absolute scale; the cells' titles give the shares.
"""
from __future__ import annotations

import html

import numpy as np

HEAT_RGB = (230, 20, 120)  # a magenta: far from product colours and from the page's green "true match" border
MAX_ALPHA = 0.75

# The overlay: a square box, the image fitted into it, the grid of cells stacked above the image.
STYLE = """
.heat{position:relative;margin:0 auto;overflow:hidden;background:#fff}
.heat img{position:absolute;left:0;top:0;width:100%;height:100%;border:0;margin:0;border-radius:0}
.heat .cells{position:absolute;left:0;top:0;width:100%;height:100%;display:grid}
.heat .cells i{display:block;outline:1px solid rgba(255,255,255,.35)}
.heat .cells i.hot{outline:2px solid #fff;z-index:1}
.cand.true .heat{outline:3px solid #1a9e3a}
mark.att{background:none;padding:0 1px;border-radius:2px} .looks{color:#7a1050;font-size:11px}
"""

# Checks, once the page has laid out, that every heatmap overlay is drawn over its image: the overlay box has the
# image's size, holds grid x grid cells, and the hottest cell is tinted (its computed background is not transparent:
# the style parsed) and is the element on top at its own centre (so it is visible, not hidden under the image). Sets
# data-heatmaps-total / -rendered / -checked on <body>.
CHECK_SCRIPT = """
function fbCheckHeatmaps(){
  var boxes=Array.prototype.slice.call(document.querySelectorAll('.heat'));
  var ok=boxes.filter(function(b){
    var img=b.querySelector('img'), cells=b.querySelectorAll('.cells i'), hot=b.querySelector('.cells i.hot');
    if(!img||!hot||cells.length!==Number(b.getAttribute('data-cells'))) return false;
    var r=b.getBoundingClientRect(), ri=img.getBoundingClientRect(), rh=hot.getBoundingClientRect();
    if(!(r.width>0&&Math.abs(r.width-ri.width)<1&&Math.abs(r.height-ri.height)<1&&rh.width>0)) return false;
    var bg=getComputedStyle(hot).backgroundColor.match(/[\d.]+/g);
    if(!bg||bg.length<4||!(Number(bg[3])>0)) return false;
    hot.scrollIntoView();
    rh=hot.getBoundingClientRect();
    return document.elementFromPoint(rh.left+rh.width/2,rh.top+rh.height/2)===hot;
  }).length;
  window.scrollTo(0,0);
  document.body.setAttribute('data-heatmaps-total',String(boxes.length));
  document.body.setAttribute('data-heatmaps-rendered',String(ok));
  document.body.setAttribute('data-heatmaps-checked','1');
}
window.addEventListener('load',fbCheckHeatmaps);
"""


def _alphas(patch_map: np.ndarray) -> np.ndarray:
    excess = np.asarray(patch_map, dtype=np.float64) - 1.0 / max(len(patch_map), 1)
    top = float(excess.max()) if len(excess) else 0.0
    return MAX_ALPHA * np.clip(excess / top, 0.0, 1.0) if top > 0 else np.zeros(len(excess))


# ============================================================================================ images
def square_view(img, size: int, fit: str = "pad"):
    """The image as featurize squared it (see the module docstring), `size` pixels a side."""
    from PIL import ImageOps

    if fit == "crop":
        return ImageOps.fit(img, (size, size))
    return ImageOps.pad(img, (size, size), color=(255, 255, 255))


def overlay_image(square, patch_map: np.ndarray, grid: int):
    """A PIL RGB image: `square` with each patch tinted by its share of the map, and the grid drawn."""
    from PIL import Image, ImageDraw

    size = square.size[0]
    tint = Image.new("RGBA", square.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(tint)
    edges = np.linspace(0, size, grid + 1).round().astype(int)
    for p, alpha in enumerate(_alphas(patch_map)):
        r, c = divmod(p, grid)
        draw.rectangle([edges[c], edges[r], edges[c + 1] - 1, edges[r + 1] - 1], fill=HEAT_RGB + (int(255 * alpha),))
    for e in edges[1:-1]:
        draw.line([(e, 0), (e, size)], fill=(255, 255, 255, 90))
        draw.line([(0, e), (size, e)], fill=(255, 255, 255, 90))
    hot = int(np.argmax(patch_map))
    r, c = divmod(hot, grid)
    draw.rectangle([edges[c], edges[r], edges[c + 1] - 1, edges[r + 1] - 1], outline=(255, 255, 255, 255), width=2)
    return Image.alpha_composite(square.convert("RGBA"), tint).convert("RGB")


def overlay_html(image_uri: str, patch_map: np.ndarray, grid: int, size: int, fit: str, title: str = "") -> str:
    """The image in a square box with a grid x grid CSS grid of tinted cells over it (no script, no external file)."""
    hot = int(np.argmax(patch_map))
    rgb = ",".join(map(str, HEAT_RGB))
    cells = "".join(f"<i{' class=hot' if p == hot else ''} style='background:rgba({rgb},{a:.3f})' "
                    f"title='patch {p}: {100 * float(v):.1f}%'></i>"
                    for p, (a, v) in enumerate(zip(_alphas(patch_map), patch_map)))
    object_fit = "cover" if fit == "crop" else "contain"
    return (f"<div class=heat data-cells={grid * grid} style='width:{size}px;height:{size}px'>"
            f"<img src='{image_uri}' alt='{html.escape(title)}' title='{html.escape(title)}' "
            f"style='object-fit:{object_fit}'><div class=cells style='grid-template-columns:repeat({grid},1fr);"
            f"grid-template-rows:repeat({grid},1fr)'>{cells}</div></div>")


# ============================================================================================ words
def words(tokens: list[str], positions: np.ndarray, mass: np.ndarray) -> list[tuple[list[int], str, float]]:
    """WordPiece tokens grouped into words ('##' pieces join the word before): (their indices into `positions`,
    the word, its weight = the largest image mass of its pieces)."""
    out: list[tuple[list[int], str, float]] = []
    for k, pos in enumerate(positions):
        tok = tokens[int(pos)]
        if tok.startswith("##") and out:
            idx, word, weight = out[-1]
            out[-1] = (idx + [k], word + tok[2:], max(weight, float(mass[k])))
        else:
            out.append(([k], tok, float(mass[k])))
    return out


def top_words(tokens: list[str], positions: np.ndarray, mass: np.ndarray, k: int = 3) -> list[str]:
    """The k distinct words with the most image mass, most first."""
    best: dict[str, float] = {}
    for _, word, weight in words(tokens, positions, mass):
        best[word] = max(weight, best.get(word, 0.0))
    return sorted(best, key=lambda w: -best[w])[:k]


def _mark(text: str, weight: float, rel: float) -> str:
    shade = f"rgba(255,190,0,{MAX_ALPHA * rel:.3f})"
    return (f"<mark class=att style='background:{shade}' title='{100 * weight:.1f}% of its attention on the image'>"
            f"{html.escape(text)}</mark>")


def highlight_html(text: str, ids: np.ndarray, positions: np.ndarray, mass: np.ndarray, tokenizer) -> str:
    """`text` with each word marked in proportion to its image mass (min-max over the text's words: the words that
    look at the image most are the most marked). `ids` are the token ids the model read ([CLS] ... [SEP], truncated
    as scored); when the tokenizer turns `text` back into exactly those ids, the marks go on the original text
    (case, punctuation and the truncated tail kept), else on the words spelled from the tokens."""
    ids = [int(i) for i in ids]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    grouped = words(tokens, positions, mass)
    if not grouped:
        return html.escape(text)
    weights = np.asarray([w[2] for w in grouped])
    lo, spread = float(weights.min()), float(weights.max() - weights.min())
    rel = (weights - lo) / spread if spread > 0 else np.zeros_like(weights)
    enc = tokenizer(text, truncation=True, max_length=len(ids), return_offsets_mapping=True)
    if list(enc["input_ids"]) != ids:
        return " ".join(_mark(w[1], w[2], r) for w, r in zip(grouped, rel))
    offsets = enc["offset_mapping"]
    out, at = [], 0
    for (idx, _, weight), r in zip(grouped, rel):
        start, end = offsets[int(positions[idx[0]])][0], offsets[int(positions[idx[-1]])][1]
        out.append(html.escape(text[at:start]) + _mark(text[start:end], weight, r))
        at = end
    return "".join(out) + html.escape(text[at:])

"""Built-in synthetic product catalog for demos and tests.

Why synthetic: a new user has no catalog yet, Fashion-Gen cannot be downloaded at run time, and the
pipeline must still be demonstrable end to end (featurize -> train -> retrieve) on a laptop. So the
package draws its own products.

Why it is learnable: every product is a small set of attributes (garment, colour, pattern, sleeve,
neckline, length, fit) and both sides of a pair are derived from the same attributes. The image draws
them as things a patch CNN sees (silhouette, hue, stripe/dot/check texture, hem and sleeve geometry); the
title and description name them in words a WordPiece tokenizer keeps (with varied phrasing so the model
must read rather than memorise one template). A text therefore matches exactly the images with its
attributes, and same-subcategory negatives (the TIA sampling rule) differ only in colour, pattern or
details, which the model has to learn to see. No two products of a catalog share every attribute (up to
616 products, see `catalog_attributes`), so every query has one right answer. Nuisance variation (image
size and aspect, background tint, position, scale, pattern phase) is random so the model cannot match on it.

Everything is a pure function of (seed, index): a seed mix through blake2b (never Python's salted
``hash``) seeds one ``random.Random`` per product, so any product can be re-rendered alone, in any order,
on any worker, with identical bytes (given the same Pillow/zlib build).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import itertools
import os
import random
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = [
    "SynthProduct",
    "COLOURS",
    "PATTERNS",
    "GARMENTS",
    "MANIFEST_COLUMNS",
    "GENERATOR_VERSION",
    "attribute_space",
    "catalog_attributes",
    "render_image",
    "product_texts",
    "render_product",
    "iter_products",
    "write_catalog",
]

# Bumped whenever the same (seed, index) starts to draw a different product, so that cached catalogs (the
# demo's) are regenerated rather than silently mixed with the new generator's. 2: distinct attribute sets.
GENERATOR_VERSION = 2

MANIFEST_COLUMNS = ("product_id", "image_id", "image", "title", "description", "category", "subcategory")

# Named colours -> RGB. Hues are spread out so that, after the featurizer's resize, neighbouring names
# stay distinguishable; white/beige/yellow are kept because light garments on light backgrounds are a
# realistic hard case (the outline carries the silhouette there).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (200, 30, 40),
    "blue": (40, 90, 210),
    "navy": (25, 35, 95),
    "green": (40, 145, 65),
    "yellow": (240, 205, 45),
    "orange": (240, 130, 30),
    "pink": (240, 150, 185),
    "purple": (120, 50, 155),
    "brown": (120, 75, 40),
    "black": (28, 28, 30),
    "white": (250, 250, 247),
    "grey": (130, 130, 135),
    "beige": (215, 195, 160),
    "teal": (20, 140, 140),
}

# Pattern -> (title adjective, description phrasings).
PATTERNS: dict[str, tuple[str, tuple[str, ...]]] = {
    "solid": ("solid", ("in a solid colour", "in one plain colour")),
    "striped": ("striped", ("with horizontal stripes", "in a striped pattern")),
    "dotted": ("polka-dot", ("with polka dots", "in a dotted print")),
    "checked": ("checked", ("in a check pattern", "with a checked gingham print")),
}

# Which optional attributes a garment has and their values. Only attributes that change the silhouette
# are used, so every word in a title is visible in the image.
SLEEVES = ("sleeveless", "short", "long")
NECKLINES = ("crew", "v-neck")
LENGTHS = ("mini", "midi", "maxi")
FITS = ("slim", "wide")


@dataclass(frozen=True)
class _Garment:
    noun: str
    category: str
    subcategory: str
    options: tuple[tuple[str, tuple[str, ...]], ...]
    features: tuple[str, ...]  # intrinsic details the drawing always shows, for descriptions
    plural: bool = False  # "these trousers have" vs "this dress has"


GARMENTS: dict[str, _Garment] = {
    "tshirt": _Garment("t-shirt", "Upper body", "T-shirt",
                       (("sleeve", SLEEVES), ("neckline", NECKLINES)), ("a straight hem",)),
    "sweater": _Garment("sweater", "Upper body", "Sweater", (("neckline", NECKLINES),),
                        ("long sleeves", "ribbed cuffs", "a ribbed hem")),
    "hoodie": _Garment("hoodie", "Upper body", "Hoodie", (),
                       ("a drawstring hood", "long sleeves", "a front pocket")),
    "jacket": _Garment("jacket", "Upper body", "Jacket", (("sleeve", SLEEVES),),
                       ("open lapels", "a button front", "two pockets")),
    "dress": _Garment("dress", "Full body", "Dress",
                      (("sleeve", SLEEVES), ("neckline", NECKLINES), ("length", LENGTHS)), ("a fitted waist",)),
    "skirt": _Garment("skirt", "Lower body", "Skirt", (("length", LENGTHS),), ("a flat waistband",)),
    "trousers": _Garment("trousers", "Lower body", "Trousers", (("fit", FITS),),
                         ("a waistband", "a full-length cut"), plural=True),
    "shorts": _Garment("shorts", "Lower body", "Shorts", (),
                       ("a waistband", "above-the-knee legs"), plural=True),
    "bag": _Garment("handbag", "Accessories", "Bag", (), ("a rounded top handle", "a front flap")),
    "sneakers": _Garment("sneakers", "Footwear", "Sneakers", (), ("laces", "a flat rubber sole"), plural=True),
    "boots": _Garment("ankle boots", "Footwear", "Boots", (), ("an ankle-high shaft", "a block heel"),
                      plural=True),
}

_TITLE_WORDS = {
    "sleeve": {"sleeveless": "sleeveless", "short": "short-sleeve", "long": "long-sleeve"},
    "neckline": {"crew": "crew-neck", "v-neck": "v-neck"},
    "fit": {"slim": "slim-fit", "wide": "wide-leg"},
    "length": {"mini": "mini", "midi": "midi", "maxi": "maxi"},
}
# Title order reads like a retailer title: "Red striped long-sleeve v-neck midi dress".
_TITLE_ORDER = ("sleeve", "neckline", "fit", "length")

_DETAIL_PHRASES = {
    "sleeve": {"sleeveless": ("no sleeves", "a sleeveless cut"),
               "short": ("short sleeves", "short sleeves"),
               "long": ("long sleeves", "full-length sleeves")},
    "neckline": {"crew": ("a round crew neckline", "a crew neck"),
                 "v-neck": ("a v-neckline", "a v-neck")},
    "length": {"mini": ("a short mini length", "a mini length above the knee"),
               "midi": ("a midi length", "a mid-calf midi length"),
               "maxi": ("a long maxi length", "a floor-sweeping maxi length")},
    "fit": {"slim": ("a slim, tapered leg", "a slim fit"),
            "wide": ("wide, relaxed legs", "a wide-leg cut")},
}

# Grammar slots ({a}, {this}, {it}, {has}, ...) resolve per garment so plural nouns read naturally.
_DESCRIPTION_TEMPLATES = (
    "{A} {colour} {noun} {pattern}. {It} {has} {details}.",
    "{This} {colour} {noun} {comes} {pattern} and {features} {details}.",
    "{Colour} {noun} {pattern}, featuring {details}.{extra}",
    "{This} {noun} in {colour} {comes} {pattern}. Details: {details}.{extra}",
)
_SINGULAR = {"this": "this", "it": "it", "has": "has", "comes": "comes", "features": "features"}
_PLURAL = {"this": "these", "it": "they", "has": "have", "comes": "come", "features": "feature"}
_EXTRAS = ("", " Easy to wear every day.", " A versatile piece for any wardrobe.", " Pairs well with basics.")


@dataclass(frozen=True)
class SynthProduct:
    product_id: str
    image_id: str
    title: str
    description: str
    category: str
    subcategory: str
    attributes: dict[str, str]
    image_bytes: bytes
    width: int
    height: int


# --------------------------------------------------------------------------- attributes and texts

def _rng_for(seed: int, index: int | str) -> random.Random:
    # blake2b, not hash(): hash() of str is salted per process, and a tuple hash is not a public contract.
    digest = hashlib.blake2b(f"fashionbert-synth:{seed}:{index}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "big"))


def attribute_space(garment: str) -> list[dict[str, str]]:
    """Every attribute set of one garment (colour x pattern x its options), in a fixed order."""
    spec = GARMENTS[garment]
    names = ["colour", "pattern"] + [name for name, _ in spec.options]
    values = [list(COLOURS), list(PATTERNS)] + [list(v) for _, v in spec.options]
    return [{"garment": garment, **dict(zip(names, combo))} for combo in itertools.product(*values)]


@functools.lru_cache(maxsize=64)
def _shuffled_space(seed: int, garment: str, cycle: int) -> tuple[tuple[tuple[str, str], ...], ...]:
    space = attribute_space(garment)
    _rng_for(seed, f"space:{garment}:{cycle}").shuffle(space)
    return tuple(tuple(a.items()) for a in space)


def catalog_attributes(seed: int, index: int) -> dict[str, str]:
    """Attributes of product `index` of catalog `seed`: garments balanced (each run of len(GARMENTS) products
    holds every garment once, in a seeded order) and, within a garment, attribute sets drawn without
    replacement from a seeded shuffle of its space.

    Why without replacement: two products with identical attributes differ only in wording and nuisance, so no
    model can rank one above the other, and with independent draws a 600-product catalog put such a twin
    among the same-sub-category candidates of ~1 query in 6, capping sample-100 Rank@1 near 0.9 before any
    training. Now no two products share an attribute set until the catalog outgrows the smallest garment's
    space (len(GARMENTS) x 56 = 616 products); beyond that each garment cycles through its space again in a
    new order.
    """
    block, slot = divmod(index, len(GARMENTS))
    garments = list(GARMENTS)
    _rng_for(seed, f"garments:{block}").shuffle(garments)
    garment = garments[slot]
    size = len(_shuffled_space(seed, garment, 0))  # cached, unlike building the space again
    cycle, k = divmod(block, size)
    return dict(_shuffled_space(seed, garment, cycle)[k])


def _check_attributes(attributes: Mapping[str, str]) -> _Garment:
    garment = GARMENTS.get(attributes.get("garment", ""))
    if garment is None:
        raise ValueError(f"unknown garment {attributes.get('garment')!r}; expected one of {sorted(GARMENTS)}")
    if attributes.get("colour") not in COLOURS:
        raise ValueError(f"unknown colour {attributes.get('colour')!r}; expected one of {sorted(COLOURS)}")
    if attributes.get("pattern") not in PATTERNS:
        raise ValueError(f"unknown pattern {attributes.get('pattern')!r}; expected one of {sorted(PATTERNS)}")
    for name, values in garment.options:
        if attributes.get(name) not in values:
            raise ValueError(f"{attributes['garment']}: attribute {name!r} must be one of {values}, "
                             f"got {attributes.get(name)!r}")
    return garment


def _title(attributes: Mapping[str, str]) -> str:
    garment = GARMENTS[attributes["garment"]]
    words = [attributes["colour"], PATTERNS[attributes["pattern"]][0]]
    words += [_TITLE_WORDS[k][attributes[k]] for k in _TITLE_ORDER if k in attributes]
    words.append(garment.noun)
    text = " ".join(words)
    return text[0].upper() + text[1:]


def _join(phrases: Sequence[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _description(attributes: Mapping[str, str], rng: random.Random) -> str:
    garment = GARMENTS[attributes["garment"]]
    details = [rng.choice(_DETAIL_PHRASES[k][attributes[k]]) for k in _TITLE_ORDER if k in attributes]
    details += garment.features
    colour = attributes["colour"]
    words = dict(_PLURAL if garment.plural else _SINGULAR)
    words["a"] = "" if garment.plural else ("an" if colour[0] in "aeiou" else "a")
    words.update({k.capitalize(): v.capitalize() for k, v in words.items()})
    text = rng.choice(_DESCRIPTION_TEMPLATES).format(
        colour=colour, Colour=colour.capitalize(), noun=garment.noun,
        pattern=rng.choice(PATTERNS[attributes["pattern"]][1]),
        details=_join(details), extra=rng.choice(_EXTRAS), **words)
    # A plural noun has no article: "{A} {colour}" leaves a leading space to drop, then re-capitalise.
    text = text.strip()
    return text[0].upper() + text[1:]


def product_texts(attributes: Mapping[str, str], rng: random.Random | int) -> tuple[str, str, str, str]:
    """(title, description, category, subcategory) for the attributes; rng only picks the wording."""
    garment = _check_attributes(attributes)
    rng = rng if isinstance(rng, random.Random) else random.Random(rng)
    return _title(attributes), _description(attributes, rng), garment.category, garment.subcategory


# --------------------------------------------------------------------------- geometry
# Each garment is drawn in its own unit coordinates (x right, y down) and later fitted into the image
# keeping its aspect ratio, so a dress in a landscape photo is still a dress, just with more margin.
# ops: ("add"|"cut", "poly"|"ellipse", data) applied in order to a mask; cuts make neck openings and
# handle holes. details: ("line", points, width) | ("fill", polygon) drawn over the pattern in a
# contrasting colour: seams, zips and soles that make garment types recognisable beyond the outline.

def _mirror(points):
    """Left half (x <= 0) listed top to bottom -> closed symmetric polygon."""
    return [(-x, y) for x, y in points] + [(x, y) for x, y in reversed(points)]


def _sleeves(shoulder, armpit, sleeve, reach):
    """Sleeve polygons on both sides; angled outwards so a long sleeve never merges with the body."""
    (sx, sy), (ax, ay) = shoulder, armpit
    if sleeve == "short":
        outer = [(sx, sy), (sx + 0.62 * reach, sy + 0.55 * reach), (sx + 0.38 * reach, ay + 0.25 * reach), (ax, ay)]
    elif sleeve == "long":
        outer = [(sx, sy), (sx + 0.75 * reach, sy + 2.6 * reach), (sx + 0.35 * reach, sy + 2.75 * reach), (ax, ay)]
    else:
        return []
    return [("add", "poly", outer), ("add", "poly", [(-x, y) for x, y in outer])]


def _neck(neckline, half_width, depth_v):
    if neckline == "v-neck":
        return [("cut", "poly", [(-half_width, -1), (half_width, -1), (0, depth_v)])]
    return [("cut", "ellipse", (-half_width, -0.7 * half_width, half_width, 0.7 * half_width))]


def _top(hem, half, sleeve, neckline):
    """Shared upper-body geometry: torso, optional sleeves and neck opening."""
    if sleeve == "sleeveless":
        torso = _mirror([(-10, 0), (-19, 2), (-21, 16), (-half, 30), (-half, hem)])
    else:
        torso = _mirror([(-10, 0), (-half, 5), (-half, hem)])
    ops = [("add", "poly", torso)]
    ops += _sleeves((half, 5), (half, 30), sleeve, 26)
    ops += _neck(neckline, 10, 22) if neckline else []
    return ops


def _shape_tshirt(a):
    return _top(92, 28, a["sleeve"], a["neckline"]), []


def _shape_sweater(a):
    ops = _top(96, 31, "long", a["neckline"])
    rib = [("line", [(-31, 88), (31, 88)], 1.2)]
    cuffs = [("line", [(31 + 0.75 * 26 - 2, 5 + 2.6 * 26 - 8), (31 + 0.35 * 26 - 2, 5 + 2.75 * 26 - 8)], 1.2)]
    cuffs += [("line", [(-x, y) for x, y in cuffs[0][1]], 1.2)]
    return ops, rib + cuffs


def _shape_hoodie(a):
    ops = [("add", "ellipse", (-19, -20, 19, 14))] + _top(96, 31, "long", None)
    ops += [("cut", "ellipse", (-9, -12, 9, 8))]
    details = [("line", [(-4, 8), (-5, 30)], 1.0), ("line", [(4, 8), (5, 30)], 1.0),
               ("line", [(-16, 90), (-12, 62), (12, 62), (16, 90)], 1.2)]
    return ops, details


def _shape_jacket(a):
    ops = _top(110, 32, a["sleeve"], None)
    ops += [("cut", "poly", [(-10, -1), (10, -1), (0, 38)]),
            ("add", "poly", [(-10, 0), (-16, -5), (-14, 10)]), ("add", "poly", [(10, 0), (16, -5), (14, 10)])]
    details = [("line", [(-10, 0), (-17, 24), (0, 38)], 1.2), ("line", [(10, 0), (17, 24), (0, 38)], 1.2),
               ("line", [(0, 38), (0, 110)], 1.2),
               ("line", [(-26, 78), (-12, 78)], 1.2), ("line", [(12, 78), (26, 78)], 1.2)]
    details += [("dot", (-3, y - 2.5, 3, y + 2.5)) for y in (52, 70, 88)]
    return ops, details


_DRESS_HEM = {"mini": (85, 30), "midi": (125, 38), "maxi": (165, 45)}


def _shape_dress(a):
    hem, hw = _DRESS_HEM[a["length"]]
    if a["sleeve"] == "sleeveless":
        body = _mirror([(-9, 0), (-14, 1), (-19, 18), (-16, 42), (-hw, hem)])
    else:
        body = _mirror([(-9, 0), (-18, 3), (-19, 18), (-16, 42), (-hw, hem)])
    ops = [("add", "poly", body)] + _sleeves((18, 3), (19, 18), a["sleeve"], 18) + _neck(a["neckline"], 9, 22)
    return ops, [("line", [(-16, 42), (16, 42)], 1.2)]


_SKIRT_HEM = {"mini": (45, 31), "midi": (85, 37), "maxi": (125, 43)}


def _shape_skirt(a):
    hem, hw = _SKIRT_HEM[a["length"]]
    ops = [("add", "poly", [(-20, 0), (20, 0), (hw, hem), (-hw, hem)])]
    return ops, [("line", [(-20, 8), (20, 8)], 1.2)]


def _legs(hem, waist, hip, outer, inner, crotch):
    return [("add", "poly", [(-waist, 0), (waist, 0), (hip, crotch), (outer, hem), (inner, hem), (0, crotch),
                             (-inner, hem), (-outer, hem), (-hip, crotch)])]


def _shape_trousers(a):
    outer, inner = (17, 4) if a["fit"] == "slim" else (32, 2)
    ops = _legs(160, 22, 25, outer, inner, 45)
    return ops, [("line", [(-22, 8), (22, 8)], 1.2), ("line", [(0, 8), (0, 32)], 1.2)]


def _shape_shorts(a):
    ops = _legs(55, 22, 25, 28, 3, 38)
    return ops, [("line", [(-22, 8), (22, 8)], 1.2), ("line", [(0, 8), (0, 26)], 1.2)]


def _shape_bag(a):
    ops = [("add", "ellipse", (-24, -34, 24, 22)), ("cut", "ellipse", (-17, -27, 17, 22)),
           ("add", "poly", [(-40, 0), (40, 0), (47, 70), (-47, 70)])]
    return ops, [("line", [(-40, 0), (0, 26), (40, 0)], 1.2), ("dot", (-4, 22, 4, 30))]


def _shape_sneakers(a):
    ops = [("add", "poly", [(0, 18), (30, 8), (50, 10), (70, 22), (92, 28), (100, 36), (100, 45), (0, 45)])]
    details = [("fill", [(0, 38), (100, 38), (100, 45), (0, 45)])]
    details += [("line", [(36 + 7 * i, 10 + 3 * i), (44 + 7 * i, 20 + 3 * i)], 1.0) for i in range(4)]
    return ops, details


def _shape_boots(a):
    ops = [("add", "poly", [(2, -42), (34, -42), (38, 10), (62, 20), (90, 27), (100, 36), (100, 44), (0, 44)]),
           ("add", "poly", [(0, 44), (20, 44), (20, 54), (2, 54)])]
    details = [("fill", [(20, 40), (100, 40), (100, 44), (20, 44)]), ("fill", [(0, 44), (20, 44), (20, 54), (2, 54)]),
               ("line", [(2, -34), (34, -34)], 1.0)]
    return ops, details


_SHAPES = {
    "tshirt": _shape_tshirt, "sweater": _shape_sweater, "hoodie": _shape_hoodie, "jacket": _shape_jacket,
    "dress": _shape_dress, "skirt": _shape_skirt, "trousers": _shape_trousers, "shorts": _shape_shorts,
    "bag": _shape_bag, "sneakers": _shape_sneakers, "boots": _shape_boots,
}


def _bbox(ops):
    xs, ys = [], []
    for op, kind, data in ops:
        if op != "add":
            continue
        pts = data if kind == "poly" else [(data[0], data[1]), (data[2], data[3])]
        xs += [p[0] for p in pts]
        ys += [p[1] for p in pts]
    return min(xs), min(ys), max(xs), max(ys)


# --------------------------------------------------------------------------- rendering

def _luma(rgb):
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _mix(rgb, other, t):
    return tuple(int(round(c + (o - c) * t)) for c, o in zip(rgb, other))


def _contrast(rgb, strength):
    """A second tone that reads against rgb: darker on light colours, lighter on dark ones."""
    return _mix(rgb, (0, 0, 0) if _luma(rgb) > 110 else (255, 255, 255), strength)


def _texture(pattern, width, height, base, accent, period, phase_x, phase_y):
    """Full-frame pattern in the garment's scale; stripes/dots/checks differ in structure, not just colour,
    so the patch CNN sees a pattern even when the accent is close to the base colour."""
    base_a, accent_a = np.array(base, np.uint8), np.array(accent, np.uint8)
    if pattern == "solid":
        return Image.new("RGB", (width, height), base)
    y = (np.arange(height, dtype=np.int32) + phase_y)[:, None]
    x = (np.arange(width, dtype=np.int32) + phase_x)[None, :]
    if pattern == "striped":
        on = np.broadcast_to((y * 2 // period) % 2 == 0, (height, width))
        arr = np.where(on[..., None], accent_a, base_a)
    elif pattern == "dotted":
        row = y // period
        u = (x + (row % 2) * (period // 2)) % period - period // 2
        v = y % period - period // 2
        on = u * u + v * v <= (0.28 * period) ** 2
        arr = np.where(on[..., None], accent_a, base_a)
    else:  # checked: gingham, where one band tints and two bands overlap darker
        tone = ((y * 2 // period) % 2) + ((x * 2 // period) % 2)
        palette = np.stack([base_a, np.array(_mix(base, accent, 0.5), np.uint8), accent_a])
        arr = palette[tone]
    return Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8), "RGB")


def _draw_ops(mask_draw, ops, tf):
    for op, kind, data in ops:
        fill = 255 if op == "add" else 0
        if kind == "poly":
            mask_draw.polygon([tf(p) for p in data], fill=fill)
        else:
            (x0, y0), (x1, y1) = tf(data[:2]), tf(data[2:])
            mask_draw.ellipse((x0, y0, x1, y1), fill=fill)


def render_image(attributes: Mapping[str, str], rng: random.Random | int, width: int, height: int) -> Image.Image:
    """Draw the product described by attributes as an RGB image of the given size.

    rng (a Random or an int seed) drives only the nuisance variation: background tint, placement, scale
    and pattern phase; the attributes fully decide what is depicted.
    """
    _check_attributes(attributes)
    if width < 16 or height < 16:
        raise ValueError(f"image too small: {width}x{height}")
    rng = rng if isinstance(rng, random.Random) else random.Random(rng)
    colour = COLOURS[attributes["colour"]]
    ops, details = _SHAPES[attributes["garment"]](attributes)

    # Fit the garment's bbox into the frame with a random margin and a slight independent x/y stretch.
    x0, y0, x1, y1 = _bbox(ops)
    stretch = rng.uniform(0.93, 1.07)
    gw, gh = (x1 - x0) * stretch, (y1 - y0)
    s = rng.uniform(0.74, 0.9) * min(width / gw, height / gh)
    sx, sy = s * stretch, s
    ox = (width - gw * s) * rng.uniform(0.3, 0.7) - x0 * sx
    oy = (height - gh * s) * rng.uniform(0.3, 0.7) - y0 * sy

    def tf(p):
        return (ox + p[0] * sx, oy + p[1] * sy)

    mask = Image.new("L", (width, height), 0)
    _draw_ops(ImageDraw.Draw(mask), ops, tf)

    base_level = rng.randint(226, 244)
    background = tuple(min(250, base_level + rng.randint(-6, 6)) for _ in range(3))
    image = Image.new("RGB", (width, height), background)
    # Pattern period tied to the garment's size, not the frame: the same product looks the same at any
    # image size, and the period stays several pixels wide after the featurizer's downscale.
    period = max(8, int(round(s * rng.uniform(9.0, 12.0))))
    texture = _texture(attributes["pattern"], width, height, colour, _contrast(colour, 0.5), period,
                       rng.randrange(period), rng.randrange(period))
    image.paste(texture, (0, 0), mask)

    line_colour = _contrast(colour, 0.55)
    edges = mask.filter(ImageFilter.FIND_EDGES)
    if s > 2.2:  # thicken on large renders so the outline survives the resize to 256 px
        edges = edges.filter(ImageFilter.MaxFilter(3))
    image.paste(line_colour, (0, 0, width, height), edges)

    draw = ImageDraw.Draw(image)
    for kind, *data in details:
        if kind == "line":
            draw.line([tf(p) for p in data[0]], fill=line_colour, width=max(1, int(round(data[1] * s))))
        elif kind == "fill":
            draw.polygon([tf(p) for p in data[0]], fill=line_colour)
        else:
            (a0, b0), (a1, b1) = tf(data[0][:2]), tf(data[0][2:])
            draw.ellipse((a0, b0, a1, b1), fill=line_colour)
    return image


def _sample_size(rng: random.Random) -> tuple[int, int]:
    """Portrait, square and landscape frames within 180..420 x 180..560, as real catalogs mix them."""
    shape = rng.choice(("portrait", "portrait", "square", "landscape"))
    if shape == "portrait":
        width = rng.randint(180, 380)
        height = min(560, int(width * rng.uniform(1.2, 1.5)))
    elif shape == "landscape":
        height = rng.randint(180, 300)
        width = min(420, int(height * rng.uniform(1.2, 1.45)))
    else:
        width = height = rng.randint(180, 420)
    return width, height


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    # compress_level=1: ~3x faster than the default and the flat synthetic images still compress well.
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def render_product(seed: int, index: int) -> SynthProduct:
    """Product number index of catalog seed; a pure function of (seed, index)."""
    rng = _rng_for(seed, index)
    attributes = catalog_attributes(seed, index)
    width, height = _sample_size(rng)
    title, description, category, subcategory = product_texts(attributes, rng)
    image_bytes = _png(render_image(attributes, rng, width, height))
    product_id = f"synth-{seed}-{index:06d}"
    return SynthProduct(product_id=product_id, image_id=f"{product_id}-0", title=title, description=description,
                        category=category, subcategory=subcategory, attributes=attributes,
                        image_bytes=image_bytes, width=width, height=height)


def iter_products(n: int, seed: int = 0) -> Iterator[SynthProduct]:
    for index in range(n):
        yield render_product(seed, index)


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def write_catalog(out_dir: str | os.PathLike, n: int, seed: int = 0) -> str:
    """Write n products as out_dir/images/<image_id>.png plus out_dir/manifest.csv; return the manifest path.

    Images are replaced atomically and the manifest is written last, also atomically, so a killed run
    leaves either the previous complete catalog or none, never a manifest pointing at missing or torn files.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    out_dir = os.fspath(out_dir)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    rows = []
    for product in iter_products(n, seed):
        rel = f"images/{product.image_id}.png"
        _write_atomic(os.path.join(out_dir, *rel.split("/")), product.image_bytes)
        rows.append((product.product_id, product.image_id, rel, product.title, product.description,
                     product.category, product.subcategory))
    manifest = os.path.join(out_dir, "manifest.csv")
    tmp = f"{manifest}.tmp-{os.getpid()}"
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(MANIFEST_COLUMNS)
        writer.writerows(rows)
    os.replace(tmp, manifest)
    return manifest

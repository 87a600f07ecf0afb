import csv
import dataclasses
import io
import os

import numpy as np
import pytest
from PIL import Image

from fashionbert.data import synth
from fashionbert.data.synth import (COLOURS, GARMENTS, MANIFEST_COLUMNS, PATTERNS, SynthProduct, iter_products,
                                    render_image, render_product, write_catalog)


@pytest.fixture(scope="module")
def products():
    # One shared sample keeps the file fast; 200 products is enough for every variety check.
    return list(iter_products(200, seed=7))


def _pixels(image_bytes):
    return np.asarray(Image.open(io.BytesIO(image_bytes)).convert("RGB"), dtype=np.int16)


def test_same_seed_and_index_is_byte_identical():
    a, b = render_product(3, 11), render_product(3, 11)
    assert a == b
    assert a.image_bytes == b.image_bytes


def test_different_seeds_and_indices_differ():
    base = render_product(0, 5)
    assert render_product(1, 5).image_bytes != base.image_bytes
    assert render_product(0, 6).image_bytes != base.image_bytes


def test_ids_and_frozen():
    p = render_product(4, 12)
    assert p.product_id == "synth-4-000012"
    assert p.image_id == "synth-4-000012-0"
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.title = "x"


def test_png_decodes_to_stated_size(products):
    for p in products[:40]:
        with Image.open(io.BytesIO(p.image_bytes)) as im:
            assert im.format == "PNG"
            assert im.size == (p.width, p.height)
            im.load()


def test_title_and_description_follow_attributes(products):
    for p in products:
        a = p.attributes
        garment = GARMENTS[a["garment"]]
        title = p.title.lower()
        assert a["colour"] in title
        assert PATTERNS[a["pattern"]][0] in title
        assert title.endswith(garment.noun)
        assert a["colour"] in p.description.lower()
        assert garment.noun in p.description
        assert p.subcategory == garment.subcategory
        assert p.category == garment.category
        for name, values in garment.options:
            assert a[name] in values
        if "length" in a:
            assert a["length"] in title


def test_variety(products):
    assert len({p.subcategory for p in products}) >= 6
    assert len({p.attributes["colour"] for p in products}) >= 8
    assert {p.attributes["pattern"] for p in products} == set(PATTERNS)
    assert {p.category for p in products} >= {"Upper body", "Lower body", "Full body", "Accessories"}
    sizes = {(p.width, p.height) for p in products}
    assert len(sizes) >= 20
    assert any(p.height > p.width for p in products)
    assert any(p.width > p.height for p in products)
    assert any(p.width == p.height for p in products)
    assert all(180 <= p.width <= 420 and 180 <= p.height <= 560 for p in products)
    assert len({p.title for p in products}) >= 100
    assert len({p.description for p in products}) >= 150


def test_no_two_products_share_attributes_until_the_space_runs_out():
    # Identical attribute sets are indistinguishable pairs: a ranking test could not have one right answer.
    capacity = min(len(synth.attribute_space(g)) for g in GARMENTS) * len(GARMENTS)
    attrs = [synth.catalog_attributes(3, i) for i in range(capacity)]
    assert len({tuple(sorted(a.items())) for a in attrs}) == capacity
    counts = {g: sum(a["garment"] == g for a in attrs) for g in GARMENTS}
    assert set(counts.values()) == {capacity // len(GARMENTS)}  # balanced garments
    # A pure function of (seed, index): the same answer alone, out of order, and different under another seed.
    assert synth.catalog_attributes(3, 500) == attrs[500]
    assert [synth.catalog_attributes(4, i) for i in range(50)] != attrs[:50]
    for a in attrs[:40]:
        assert a in synth.attribute_space(a["garment"])
    # Past the capacity the garments cycle through their spaces again.
    assert synth.catalog_attributes(3, capacity + 7)["garment"] in GARMENTS


def test_write_catalog_matches_iter_products(tmp_path):
    out = tmp_path / "new" / "catalog"  # missing parents must be created
    manifest = write_catalog(out, 12, seed=2)
    assert manifest == os.path.join(str(out), "manifest.csv")
    with open(manifest, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == MANIFEST_COLUMNS
        rows = list(reader)
    expected = list(iter_products(12, seed=2))
    assert len(rows) == len(expected)
    for row, p in zip(rows, expected):
        assert row == {"product_id": p.product_id, "image_id": p.image_id, "image": f"images/{p.image_id}.png",
                       "title": p.title, "description": p.description, "category": p.category,
                       "subcategory": p.subcategory}
        path = out / row["image"]
        assert path.is_file()
        assert path.read_bytes() == p.image_bytes
    assert not [f for f in os.listdir(out) if ".tmp" in f]


def test_write_catalog_rerun_replaces_manifest(tmp_path):
    write_catalog(tmp_path, 5, seed=0)
    manifest = write_catalog(tmp_path, 3, seed=0)
    with open(manifest, newline="", encoding="utf-8") as fh:
        assert len(list(csv.DictReader(fh))) == 3


def _attrs(**overrides):
    base = {"garment": "dress", "colour": "red", "pattern": "solid", "sleeve": "long",
            "neckline": "v-neck", "length": "midi"}
    base.update(overrides)
    return base


def _diff(a, b, size=(300, 400)):
    # Same rng seed -> same placement and background, so only the attribute change shows.
    ia = np.asarray(render_image(a, 42, *size), dtype=np.int16)
    ib = np.asarray(render_image(b, 42, *size), dtype=np.int16)
    return float(np.abs(ia - ib).mean())


def test_render_image_is_deterministic_and_sized():
    im = render_image(_attrs(), 5, 250, 333)
    assert im.mode == "RGB" and im.size == (250, 333)
    assert np.array_equal(np.asarray(im), np.asarray(render_image(_attrs(), 5, 250, 333)))


def test_colour_changes_image_strongly():
    assert _diff(_attrs(colour="red"), _attrs(colour="blue")) > 20


@pytest.mark.parametrize("change, threshold", [
    ({"pattern": "striped"}, 5), ({"pattern": "dotted"}, 3), ({"pattern": "checked"}, 5),
    ({"sleeve": "sleeveless"}, 2), ({"length": "mini"}, 3),
    ({"neckline": "crew"}, 0.5),  # a neckline is a small region of the frame
])
def test_each_attribute_is_visible(change, threshold):
    assert _diff(_attrs(), _attrs(**change)) > threshold


def test_garments_have_distinct_silhouettes():
    # Compare garment masks (non-background pixels); every pair must differ by a clear margin.
    masks = {}
    for g, spec in GARMENTS.items():
        attrs = {"garment": g, "colour": "black", "pattern": "solid"}
        attrs.update({name: values[0] for name, values in spec.options})
        masks[g] = np.asarray(render_image(attrs, 0, 256, 256).convert("L")) < 128
    names = sorted(masks)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert (masks[a] != masks[b]).mean() > 0.03, (a, b)


def test_invalid_attributes_are_rejected():
    with pytest.raises(ValueError, match="garment"):
        render_image({"garment": "cape", "colour": "red", "pattern": "solid"}, 0, 200, 200)
    with pytest.raises(ValueError, match="sleeve"):
        render_image(_attrs(sleeve="puffed"), 0, 200, 200)


def test_every_garment_colour_and_pattern_renders():
    for i, (g, spec) in enumerate(GARMENTS.items()):
        for j, pattern in enumerate(PATTERNS):
            attrs = {"garment": g, "colour": list(COLOURS)[(i + j) % len(COLOURS)], "pattern": pattern}
            attrs.update({name: values[(i + j) % len(values)] for name, values in spec.options})
            title, description, category, subcategory = synth.product_texts(attrs, i)
            assert title and description and category and subcategory == spec.subcategory
            im = render_image(attrs, i * 10 + j, 180, 560)
            assert im.size == (180, 560)


def test_product_is_a_synthproduct(products):
    assert all(isinstance(p, SynthProduct) for p in products)
    assert len({p.product_id for p in products}) == len(products)

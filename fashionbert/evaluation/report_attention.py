"""The report's attention maps (`fashionbert report --model DIR`): for each shown text -> image query, a heatmap over
each shown image of where the query's words look (fashionbert/model/attention.py), and the query text with the words
that attend to the images most marked.

The maps come from the model folder given, at fp32 on the default device, for exactly the (query, candidate) pairs the
page shows; a pair whose product or image the features do not hold is shown without a heatmap.
"""
from __future__ import annotations

import html
from typing import Sequence

import numpy as np

from fashionbert.data.feature_catalog import IndexedImages, open_catalog
from fashionbert.data.model_store import load_model
from fashionbert.evaluation import heatmaps
from fashionbert.evaluation.explain import PairAttention, catalog_views, explain_pairs, text_tokenizer
from fashionbert.runtime import resolve_runtime


class ReportAttention:
    def __init__(self, model_dir: str, features: Sequence[str], queries: dict[str, list[dict]], top: int,
                 method: str = "rollout"):
        loaded = load_model(model_dir, resolve_runtime("auto", "fp32"))
        catalog = open_catalog(features, loaded)
        image_of = {iid: i for i, iid in enumerate(catalog.index.image_ids)}
        shown = [(q, r["candidate_id"]) for q, rows in queries.items() for r in rows[:top]
                 if q in catalog.texts.index and r["candidate_id"] in image_of]
        pairs = np.asarray([(catalog.texts.index[q], image_of[c]) for q, c in shown], dtype=np.int64).reshape(-1, 2)
        maps = explain_pairs(loaded.model, catalog.text_ids, IndexedImages(catalog.index, catalog.reader), pairs,
                             method)
        self.maps: dict[tuple[str, str], PairAttention] = dict(zip(shown, maps))
        self.tokenizer = text_tokenizer(loaded)
        self.grid = int(loaded.config.grid)
        self.fit = catalog_views(catalog)[2]
        self.method = method
        self.model_version = loaded.version

    def image_html(self, query_id: str, image_id: str, uri: str, size: int, plain: str) -> str:
        """The candidate's picture with its heatmap and the pair's most-looking words; `plain` when there is no map."""
        a = self.maps.get((query_id, image_id))
        if a is None:
            return plain
        words = heatmaps.top_words(self.tokenizer.convert_ids_to_tokens([int(x) for x in a.ids]), a.positions,
                                   a.image_mass, k=2)
        return (heatmaps.overlay_html(uri, a.patch_map, self.grid, size, self.fit, image_id)
                + f"<div class=looks>looks: {html.escape(', '.join(words))}</div>")

    def text_html(self, query_id: str, text: str) -> str:
        """The query text, its words marked by their image mass averaged over the query's shown images."""
        found = [a for (q, _), a in self.maps.items() if q == query_id]
        if not found:
            return html.escape(text)
        mass = np.mean([a.image_mass for a in found], axis=0)
        return heatmaps.highlight_html(text, found[0].ids, found[0].positions, mass, self.tokenizer)

    def legend(self) -> str:
        return (f"<p class=meta>Heatmaps ({'last layer' if self.method == 'last' else 'attention rollout'}, model "
                f"{html.escape(self.model_version)}): each of the {self.grid}×{self.grid} patches is tinted by its "
                f"share of the query text's attention to that image (the hottest most); marked words attend to the "
                f"images most. Attention shows where the model gathered information, not why it ranked an image "
                f"where it did.</p>")

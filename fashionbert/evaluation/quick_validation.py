"""Training's quick validation on held-out products, and the score fusion fitted on it.

Every validation scores each held-out query text against its image and up to 100 same-sub-category images
(`sample_hundred.SampleHundred`) with both matching heads: the TIA margin of the joint pass
(`rank.cross_encoder.CrossEncoderScorer`, as retrieve and evaluate score), and, when the model has an itc head, the
cosine of the text-only and image-only embeddings. On those pairs it fits the ranking score (`fusion.fit`: the
heads' weights that rank each query's true image first, calibrated to P(aligned)) and reports text->image Rank@1 by
each head and by the fused score. The fused Rank@1 is cross-fitted (the fusion that scores half of the queries is
fitted on the other half), so the figure is not measured on the pairs its three numbers were fitted on; the fusion
returned, and saved with the checkpoint, is the fit on all pairs.

With a hubness correction (on by default: fashionbert/rank/hubness.py) the whole pool's texts and images are
embedded once, each pair's cosine comes from those vectors, and each pool text's and image's bias is taken over the
pool. The fusion is fitted on the corrected cosine when that ranks the queries at least as well as the raw one
(`fitted["hubness_check"]`), and then records the correction's settings, so retrieve, score-pairs and evaluate read
the same corrected cosine over their own catalog.

Imports numpy, and torch and pyarrow through the scorers (no Beam, no faiss).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from fashionbert.data.feature_catalog import ArrayImages
from fashionbert.evaluation.sample_hundred import SampleHundred
from fashionbert.model import score_fusion as score_fusion
from fashionbert.model.config import FashionBertConfig
from fashionbert.model.score_fusion import ScoreFusion
from fashionbert.rank.cross_encoder import DEFAULT_TOKEN_BUDGET, CrossEncoderScorer, pair_cosines
from fashionbert.rank.embeddings import DualEncoder, embed_items
from fashionbert.rank.hubness import OFF, Hubness, hubness_biases


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(score of a random positive > a random negative), ties counted half (Mann-Whitney U)."""
    if not len(positive) or not len(negative):
        return float("nan")
    scores = np.concatenate([positive, negative])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[: len(positive)].sum() - len(positive) * (len(positive) + 1) / 2
    return float(u / (len(positive) * len(negative)))


@dataclasses.dataclass
class HeadScores:
    """Every (query, candidate) pair of a SampleHundred, queries in order, candidates in their order (the true one
    first), float64: the TIA logit margins, the itc cosines (None without an itc head) and what the hubness
    correction subtracts from each cosine (None without one)."""
    margins: np.ndarray
    cosines: np.ndarray | None
    offsets: np.ndarray | None = None


def head_scores(model, s100: SampleHundred, config: FashionBertConfig, rt) -> tuple[np.ndarray, np.ndarray | None]:
    """(TIA logit margins, itc cosines or None): `validation_scores` without the correction."""
    scores = validation_scores(model, s100, config, rt)
    return scores.margins, scores.cosines


def validation_scores(model, s100: SampleHundred, config: FashionBertConfig, rt, hubness: Hubness = OFF) -> HeadScores:
    """Both heads' scores of every pair of `s100`, and with an enabled `hubness` (and the pool's texts) each pair's
    correction over the pool.

    The margins come from `CrossEncoderScorer`, the pass retrieve, score-pairs and evaluate rank with, so the fusion
    fitted here weighs the margins those stages will produce. It is also the cheap pass: each query's text and
    each pool image run the layers below the fusion layer once, not once per pair, and texts pad to their batch's
    longest row, not to max_text_len. Against a per-pair `model.encode`, `bench/quality.py --plan` on hm-dev (2-core
    AMD EPYC, fp32, 200 queries x 101 candidates) timed start-up, this validation and export at 4.3 min instead of
    8.6."""
    was_training = model.training
    model.eval()
    try:
        pairs = np.asarray([(q, c) for q in range(len(s100)) for c in s100.candidates[q]], dtype=np.int64)
        pairs = pairs.reshape(-1, 2)
        images = ArrayImages(s100.pool_features)
        cosines = offsets = None
        if getattr(model, "itc_head", None) is not None:
            dual = DualEncoder(model, rt.device, rt.autocast, config.max_text_len)
            if hubness.enabled and s100.pool_texts is not None:
                # the query's own pool position is its first candidate: its text is that pool text
                texts_at = np.asarray([s100.candidates[q][0] for q in range(len(s100))], dtype=np.int64)[pairs[:, 0]]
                n_pool = len(s100.pool_products)
                text_vec, image_vec = embed_items(dual, s100.pool_texts, images, np.arange(n_pool),
                                                  np.arange(n_pool), DEFAULT_TOKEN_BUDGET)
                cosines = np.einsum("nd,nd->n", text_vec[texts_at], image_vec[pairs[:, 1]]).astype(np.float64)
                biases = hubness_biases(text_vec, image_vec, hubness, device=rt.device.type)
                offsets = biases.offsets(texts_at, pairs[:, 1]).astype(np.float64)
            else:
                cosines = pair_cosines(dual, s100.texts, images, pairs, DEFAULT_TOKEN_BUDGET).astype(np.float64)
        # The scorer reads the cosines only for a residual TIA head (config.tia_residual), and then needs them.
        margins = CrossEncoderScorer(model, rt, progress=None).score(
            s100.texts, images, pairs, cosines=None if cosines is None else cosines.astype(np.float32))
        return HeadScores(margins.astype(np.float64), cosines, offsets)
    finally:
        if was_training:
            model.train()


def validate(model, s100: SampleHundred, config: FashionBertConfig, rt,
             hubness: Hubness = Hubness()) -> tuple[dict, ScoreFusion | None]:
    """Quick validation: text->image sample-100 Rank@1 (the true image strictly above every candidate) by the
    fused score (cross-fitted) and by each head; TIA AUC over all pairs and TIA accuracy on balanced pairs (each
    true pair and the query's first same-sub-category candidate) at P(aligned) > 0.5. Returns the metrics and
    the score fusion fitted on all pairs (None for a model without an itc head: nothing to fuse); with an enabled
    `hubness`, on the corrected cosine where it ranks at least as well as the raw one."""
    scores = validation_scores(model, s100, config, rt, hubness)
    margins, cosines = scores.margins, scores.cosines
    sizes = np.asarray([len(c) for c in s100.candidates])
    query = np.repeat(np.arange(len(s100)), sizes)
    starts = np.r_[0, np.cumsum(sizes)[:-1]]  # each query's true candidate comes first
    label = np.zeros(len(margins), dtype=bool)
    label[starts] = True
    fitted = {"source": "training validation", "queries": len(s100), "pool_products": len(s100.pool_products)}
    corrected = None
    if scores.offsets is not None:
        corrected = cosines - scores.offsets
        check = {"rank1_itc": rank1(cosines, sizes), "rank1_itc_hub": rank1(corrected, sizes)}
        fitted["hubness_check"] = check
        if check["rank1_itc_hub"] < check["rank1_itc"]:
            corrected = None  # the correction does not pay on these queries: the fusion reads the raw cosine
    read = corrected if corrected is not None else cosines
    fusion = score_fusion.fit(margins, read, label, query, fitted) if cosines is not None else None
    if fusion is not None and corrected is not None and fusion.uses_itc:
        fusion = dataclasses.replace(fusion, hubness=hubness.describe())
    fused = (score_fusion.cross_fitted_logits(margins, read, label, query, query % 2) if cosines is not None
             else margins)

    pos, neg = margins[label], margins[~label]
    first_negative = starts[sizes > 1] + 1
    accuracy = np.r_[pos > 0, margins[first_negative] <= 0]
    metrics = {
        "rank1_t2i": rank1(fused, sizes),
        "rank1_t2i_tia": rank1(margins, sizes),
        "tia_auc": roc_auc(pos, neg),
        "tia_accuracy": float(accuracy.mean()),
        "val_queries": len(s100),
        "val_candidates_mean": float(np.mean(sizes - 1)),
        "ranking": (fusion or score_fusion.TIA_ONLY).describe(),
    }
    if cosines is not None:
        metrics["rank1_t2i_itc"] = rank1(cosines, sizes)
    if scores.offsets is not None:
        metrics["rank1_t2i_itc_hub"] = rank1(cosines - scores.offsets, sizes)
    return metrics, fusion


def rank1(scores: np.ndarray, sizes: np.ndarray) -> float:
    """Fraction of queries whose true candidate (first of its run of `sizes`) scores strictly above the rest."""
    hits, at = [], 0
    for n in sizes:
        s = scores[at:at + n]
        hits.append(bool((s[1:] < s[0]).all()))
        at += n
    return float(np.mean(hits)) if hits else float("nan")

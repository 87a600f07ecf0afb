"""Training's quick validation on held-out products, and the score fusion fitted on it.

Every validation scores each held-out query text against its image and up to 100 same-sub-category images
(`sample_hundred.SampleHundred`) with both matching heads: the TIA margin of the joint pass
(`rank.cross_encoder.CrossEncoderScorer`, as retrieve and evaluate score), and, when the model has an itc head, the
cosine of the text-only and image-only embeddings. On those pairs it fits the ranking score (`fusion.fit`: the
heads' weights that rank each query's true image first, calibrated to P(aligned)) and reports text->image Rank@1 by
each head and by the fused score. The fused Rank@1 is cross-fitted (the fusion that scores half of the queries is
fitted on the other half), so the figure is not measured on the pairs its three numbers were fitted on; the fusion
returned, and saved with the checkpoint, is the fit on all pairs.

Imports numpy, and torch and pyarrow through the scorers (no Beam, no faiss).
"""
from __future__ import annotations

import numpy as np

from fashionbert.data.feature_catalog import ArrayImages
from fashionbert.evaluation.sample_hundred import SampleHundred
from fashionbert.model import score_fusion as score_fusion
from fashionbert.model.config import FashionBertConfig
from fashionbert.model.score_fusion import ScoreFusion
from fashionbert.rank.cross_encoder import DEFAULT_TOKEN_BUDGET, CrossEncoderScorer, pair_cosines
from fashionbert.rank.embeddings import DualEncoder


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


def head_scores(model, s100: SampleHundred, config: FashionBertConfig, rt) -> tuple[np.ndarray, np.ndarray | None]:
    """Every (query, candidate) pair of `s100`, queries in order, candidates in their order (the true one first):
    (TIA logit margins, itc cosines or None when the model has no itc head), float64.

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
        cosines = None
        if getattr(model, "itc_head", None) is not None:
            dual = DualEncoder(model, rt.device, rt.autocast, config.max_text_len)
            cosines = pair_cosines(dual, s100.texts, images, pairs, DEFAULT_TOKEN_BUDGET).astype(np.float64)
        # The scorer reads the cosines only for a residual TIA head (config.tia_residual), and then needs them.
        margins = CrossEncoderScorer(model, rt, progress=None).score(
            s100.texts, images, pairs, cosines=None if cosines is None else cosines.astype(np.float32))
        return margins.astype(np.float64), cosines
    finally:
        if was_training:
            model.train()


def validate(model, s100: SampleHundred, config: FashionBertConfig, rt) -> tuple[dict, ScoreFusion | None]:
    """Quick validation: text->image sample-100 Rank@1 (the true image strictly above every candidate) by the
    fused score (cross-fitted) and by each head; TIA AUC over all pairs and TIA accuracy on balanced pairs (each
    true pair and the query's first same-sub-category candidate) at P(aligned) > 0.5. Returns the metrics and
    the score fusion fitted on all pairs (None for a model without an itc head: nothing to fuse)."""
    margins, cosines = head_scores(model, s100, config, rt)
    sizes = np.asarray([len(c) for c in s100.candidates])
    query = np.repeat(np.arange(len(s100)), sizes)
    starts = np.r_[0, np.cumsum(sizes)[:-1]]  # each query's true candidate comes first
    label = np.zeros(len(margins), dtype=bool)
    label[starts] = True
    fitted = {"source": "training validation", "queries": len(s100), "pool_products": len(s100.pool_products)}
    fusion = score_fusion.fit(margins, cosines, label, query, fitted) if cosines is not None else None
    fused = (score_fusion.cross_fitted_logits(margins, cosines, label, query, query % 2) if cosines is not None
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
    return metrics, fusion


def rank1(scores: np.ndarray, sizes: np.ndarray) -> float:
    """Fraction of queries whose true candidate (first of its run of `sizes`) scores strictly above the rest."""
    hits, at = [], 0
    for n in sizes:
        s = scores[at:at + n]
        hits.append(bool((s[1:] < s[0]).all()))
        at += n
    return float(np.mean(hits)) if hits else float("nan")

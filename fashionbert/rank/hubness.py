"""Hubness correction of the recall cosine: the inverted softmax over the catalog being ranked.

Some images sit close to many texts of a catalog (hubs: a plain black top is near every "black ... top" text) and
take first place for texts that are not theirs; the same holds for texts among images. The correction subtracts,
per candidate, how close that candidate already is to the catalog's queries in general:

    corrected(text t, image i) = cos(t, i) - bias_image[i],   bias_image[i] = T log mean_k exp(cos(t', i) / T)

over the k texts t' of the catalog nearest to image i (and bias_text alike over images, for image -> text). It is
the inverted softmax of Smith et al. (ICLR 2017) and the dual softmax / query-bank normalisation of retrieval since
(Cheng et al. 2021, Bogolin et al. CVPR 2022), with the bank being the catalog itself, which a batch run has
whole. The bias is a per-item scalar, so it needs no training and no labels; with the top-k (not every text) it
costs one more recall search per direction. At T near the cosine's spread the top few terms carry the sum:
on hm-dev k = 10 ranks as the exact sum over the whole catalog does.

Ranking by the corrected cosine is an inner product too: the image vectors get one more component, -bias_image,
and the text vectors a 1 (`augmented`), so any recall index searches it directly.

The ranking score reads one corrected cosine per pair, whichever way it is ranked (`HubnessBiases.offsets`):

    cos(t, i) - (bias_image[i] - mean bias_image) - (bias_text[t] - mean bias_text)

For one text query the text's term is a constant, so its images rank as by cos - bias_image; for one image query
alike. So a pair has one score in both tables and in score-pairs (CSLS, Conneau et al. 2018, has this form), and the
catalog means keep it on the cosine's scale, which the score fusion's calibration was fitted on.

Rounds: the biases of one side are taken over the other side's raw cosines, yet those items are hubs or not too. Each
further round re-estimates them over the other side's corrected cosines of the round before,

    bias_image[i] <- T log mean_k exp((cos(t', i) - bias_text[t']) / T)   (and bias_text alike, both from round r-1)

over each item's k nearest by that corrected cosine. It is the alternating normalisation of the catalog's similarity
matrix in log space (Sinkhorn-Knopp, as in Cuturi 2013), restricted to each item's neighbours; round 1 is the
inverted softmax above. The later rounds read each item's 2k nearest by the raw cosine, so they cost no further
search. On hm-dev (six trained models, 1,662 held-out products; `bench/hubness.py --rounds 1,5`) 5 rounds rank
sample-100 about 1.2 and the full gallery about 1.7 Rank@1 points above one, both directions, every model.

Marginals: a product with m photos has m true images, which sit among its text's nearest and raise its bias by
about T log m, so in image -> text ranking the correction pushed exactly the texts with many photos down. Sinkhorn
with marginals fixes it: each text carries the mass of its m images, `bias_text[t] -= T log m` in every round
(`marginals="images"`; a text with no image in the catalog counts as one). With one image per product it changes
nothing. On hm-dev keyed by product_code (1,001 held-out products, 1,662 photos; `bench/hubness.py --images all`)
image -> text Rank@1 over the full gallery went from 1-2 points under the raw cosine to 3.5-5 over it (three models),
text -> image level.
"""
from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from fashionbert.errors import UserError
from fashionbert.rank.neighbours import DEFAULT_EXACT_MAX, Neighbours, search

DEFAULT_TEMPERATURE = 0.03
DEFAULT_K = 10
DEFAULT_ROUNDS = 5
MARGINALS = ("images", "uniform")  # a text's mass: its number of images in the catalog, or one
DEFAULT_MARGINALS = "images"
POOL_PER_K = 2  # the later rounds choose each item's k nearest among its POOL_PER_K x k nearest by the raw cosine


@dataclasses.dataclass(frozen=True)
class Hubness:
    """How the correction is computed: `temperature` T of the softmax (0: off), over each item's top `k`, re-estimated
    `rounds` times (1: the inverted softmax of the raw cosine), each text weighing its number of images in the
    catalog (`marginals` "images") or one ("uniform")."""
    temperature: float = DEFAULT_TEMPERATURE
    k: int = DEFAULT_K
    rounds: int = DEFAULT_ROUNDS
    marginals: str = DEFAULT_MARGINALS

    def __post_init__(self):
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise UserError(f"--hubness-temperature {self.temperature}: must be >= 0 (0 turns the correction off; "
                            f"{DEFAULT_TEMPERATURE} is the default)")
        if self.k < 1:
            raise UserError(f"--hubness-k {self.k}: must be >= 1 (the catalog neighbours each item's bias is "
                            f"taken over; {DEFAULT_K} is the default)")
        if self.rounds < 1:
            raise UserError(f"--hubness-rounds {self.rounds}: must be >= 1 (1 = the inverted softmax of the raw "
                            f"cosine; {DEFAULT_ROUNDS} is the default)")
        if self.marginals not in MARGINALS:
            raise UserError(f"--hubness-marginals {self.marginals!r}: must be one of {', '.join(MARGINALS)} "
                            f"({DEFAULT_MARGINALS} is the default)")

    @property
    def enabled(self) -> bool:
        return self.temperature > 0

    def describe(self) -> dict:
        return ({"temperature": self.temperature, "k": self.k, "rounds": self.rounds, "marginals": self.marginals}
                if self.enabled else {"temperature": 0.0})

    @staticmethod
    def from_dict(d: dict | None) -> "Hubness":
        """The inverse of `describe` (None: off). A fusion fitted before rounds or marginals existed has neither: it
        was validated on one round with uniform marginals, so it reads those."""
        if not d:
            return OFF
        return Hubness(float(d.get("temperature", 0.0)), int(d.get("k", DEFAULT_K)), int(d.get("rounds", 1)),
                       str(d.get("marginals", "uniform")))


OFF = Hubness(0.0)


def fusion_hubness(fusion) -> Hubness:
    """The correction a `model.score_fusion.ScoreFusion`'s cosine is read with (OFF: the raw cosine)."""
    return Hubness.from_dict(fusion.hubness) if fusion.reads_corrected_cosine else OFF


@dataclasses.dataclass
class HubnessBiases:
    """Per item, what its cosines lose when ranked: `image` (n_images,) in text -> image ranking, `text`
    (n_texts,) in image -> text ranking."""
    image: np.ndarray
    text: np.ndarray

    def means(self) -> tuple[float, float]:
        """(mean image bias, mean text bias); 0 for an empty side."""
        return tuple(float(b.mean()) if len(b) else 0.0 for b in (self.image, self.text))

    def offsets(self, text: np.ndarray, image: np.ndarray) -> np.ndarray:
        """(n,) float32: what the ranking score's corrected cosine subtracts from pairs (text[j], image[j])'s cosine,
        each bias less its catalog mean (the module's docstring says why both)."""
        mean_image, mean_text = self.means()
        return ((self.image[np.asarray(image, dtype=np.int64)] - mean_image)
                + (self.text[np.asarray(text, dtype=np.int64)] - mean_text)).astype(np.float32)


def neighbour_bias(found: Neighbours, n_items: int, temperature: float) -> np.ndarray:
    """T log mean exp(cos / T) over each item's neighbours (`found`'s queries are the items); 0 for an item with
    none (an empty catalog side)."""
    bias = np.zeros(n_items, dtype=np.float64)
    if not len(found):
        return bias
    scaled = found.score.astype(np.float64) / temperature
    top = np.full(n_items, -np.inf)
    np.maximum.at(top, found.query, scaled)  # per item: the largest term, so that exp never overflows
    total = np.zeros(n_items)
    np.add.at(total, found.query, np.exp(scaled - top[found.query]))
    count = np.bincount(found.query, minlength=n_items)
    have = count > 0
    bias[have] = temperature * (top[have] + np.log(total[have] / count[have]))
    return bias


def hubness_biases(text_vec: np.ndarray, image_vec: np.ndarray, hubness: Hubness, index: str = "auto",
                   exact_max: int = DEFAULT_EXACT_MAX, device: str = "cpu",
                   image_text: np.ndarray | None = None) -> HubnessBiases:
    """The biases of every image (over the texts) and every text (over the images) of one catalog, after
    `hubness.rounds` rounds (the module's docstring). `image_text`: each image's text position, from which
    `marginals="images"` counts each text's images; None: one image per text."""
    image_bias, text_bias = np.zeros(len(image_vec)), np.zeros(len(text_vec))
    if not hubness.enabled:
        return HubnessBiases(image_bias, text_bias)
    text_mass = np.zeros(len(text_vec))
    if hubness.marginals == "images" and image_text is not None:
        if len(image_text) != len(image_vec):
            raise ValueError(f"image_text has {len(image_text)} entries for {len(image_vec)} images")
        count = np.bincount(np.asarray(image_text, dtype=np.int64), minlength=len(text_vec))
        text_mass = hubness.temperature * np.log(np.maximum(count, 1))  # a text without images weighs one
    pool = hubness.k if hubness.rounds == 1 else POOL_PER_K * hubness.k
    near_texts = search(text_vec, image_vec, pool, index, exact_max, device=device)  # per image
    near_images = search(image_vec, text_vec, pool, index, exact_max, device=device)  # per text
    for _ in range(hubness.rounds):  # both sides from the round before, so neither direction goes first
        image_bias, text_bias = (
            neighbour_bias(nearest_by_corrected(near_texts, text_bias, hubness.k), len(image_vec),
                           hubness.temperature),
            neighbour_bias(nearest_by_corrected(near_images, image_bias, hubness.k), len(text_vec),
                           hubness.temperature) - text_mass)
    return HubnessBiases(image=image_bias, text=text_bias)


def nearest_by_corrected(found: Neighbours, candidate_bias: np.ndarray, k: int) -> Neighbours:
    """`found`'s lists re-scored by cos - candidate_bias[candidate], each query's best `k` kept (ties by candidate,
    as every list is ordered)."""
    score = (found.score.astype(np.float64) - candidate_bias[found.candidate]).astype(np.float32)
    order = np.lexsort((found.candidate, -score, found.query))
    return Neighbours(found.query[order], found.candidate[order], score[order], found.kind).first(k)


def augmented(queries: np.ndarray, database: np.ndarray, database_bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(queries, database) with one more component each, so that their inner product is the corrected cosine
    q . d - bias[d]."""
    return augmented_queries(queries), augmented_database(database, database_bias)


def augmented_queries(queries: np.ndarray) -> np.ndarray:
    q = np.concatenate([queries, np.ones((len(queries), 1), dtype=queries.dtype)], axis=1)
    return np.ascontiguousarray(q, dtype=np.float32)


def augmented_database(database: np.ndarray, database_bias: np.ndarray) -> np.ndarray:
    d = np.concatenate([database, -np.asarray(database_bias, dtype=database.dtype)[:, None]], axis=1)
    return np.ascontiguousarray(d, dtype=np.float32)


def corrected_search(queries: np.ndarray, database: np.ndarray, database_bias: np.ndarray, k: int,
                     index: str = "auto", exact_max: int = DEFAULT_EXACT_MAX, device: str = "cpu") -> Neighbours:
    """Each query's top-`k` database rows by corrected cosine; `score` is the corrected cosine."""
    q, d = augmented(queries, database, database_bias)
    return search(d, q, k, index, exact_max, device=device)


@dataclasses.dataclass(frozen=True)
class HubnessOptions:
    """The fields of `add_hubness_arguments`' options."""
    hubness_temperature: float = DEFAULT_TEMPERATURE
    hubness_k: int = DEFAULT_K
    hubness_rounds: int = DEFAULT_ROUNDS
    hubness_marginals: str = DEFAULT_MARGINALS

    @property
    def hubness(self) -> Hubness:
        return Hubness(self.hubness_temperature, self.hubness_k, self.hubness_rounds, self.hubness_marginals)


def _temperature(text: str) -> float:
    """argparse type: a temperature >= 0, so that a stage run later (nightly's retrieve) fails at parse time."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value >= 0 and np.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a number >= 0 (0 turns the correction off)")
    return value


def _at_least_one(text: str) -> int:
    """argparse type: a whole number >= 1 (a neighbour count, a number of rounds)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a whole number >= 1")
    return value


def add_hubness_arguments(parser: argparse.ArgumentParser, fits: bool = False) -> None:
    """`fits`: the stage fits the ranking score, which then reads the corrected cosine (fuse); else it reports the
    corrected cosine's ranking beside the others (evaluate)."""
    d = HubnessOptions()
    g = parser.add_argument_group("hubness correction of the cosine (fashionbert/rank/hubness.py)")
    what = ("fit the ranking score on the itc cosine minus each pair's text's and image's closeness to the rest of "
            "the catalog (kept where it ranks the held-out queries at least as well as the raw cosine); retrieve, "
            "score-pairs and evaluate then score that way" if fits else
            "also rank by the itc cosine minus each candidate's closeness to the catalog's other queries")
    g.add_argument("--hubness-temperature", type=_temperature, default=d.hubness_temperature, metavar="T",
                   help=f"{what} (T log mean exp(cos / T) over its --hubness-k nearest); 0 = off (default "
                        f"{DEFAULT_TEMPERATURE})")
    g.add_argument("--hubness-k", type=_at_least_one, default=d.hubness_k, metavar="K",
                   help=f"nearest queries each candidate's bias is taken over (default {DEFAULT_K})")
    g.add_argument("--hubness-rounds", type=_at_least_one, default=d.hubness_rounds, metavar="N",
                   help=f"times the biases are re-estimated, each round over the other side's corrected cosines of "
                        f"the round before (Sinkhorn's alternating normalisation; 1 = the raw cosine's inverted "
                        f"softmax; default {DEFAULT_ROUNDS}: on hm-dev ~1-2 points of Rank@1 over 1)")
    g.add_argument("--hubness-marginals", choices=MARGINALS, default=d.hubness_marginals,
                   help="each text's weight in the correction: images = its number of images in the catalog, so "
                        "products with several photos are not pushed down in image -> text ranking for being near "
                        "their own photos; uniform = one each, as before (default images; the same on a catalog "
                        "of one image per product)")


def corrected_recall(text_vec: np.ndarray, image_vec: np.ndarray, hubness: Hubness, k: int, index: str = "auto",
                     exact_max: int = DEFAULT_EXACT_MAX, device: str = "cpu", image_text: np.ndarray | None = None
                     ) -> tuple[Neighbours, Neighbours, HubnessBiases]:
    """One catalog's recall both ways by the corrected cosine: (text -> image, image -> text, the biases); the
    neighbours' scores are the corrected cosines. `image_text` as for `hubness_biases`."""
    biases = hubness_biases(text_vec, image_vec, hubness, index, exact_max, device, image_text)
    return (corrected_search(text_vec, image_vec, biases.image, k, index, exact_max, device),
            corrected_search(image_vec, text_vec, biases.text, k, index, exact_max, device), biases)

"""Scoring inside Beam: the model handlers that RunInference loads the FashionBERT model with, and the steps the
retrieve and score-pairs pipelines share.

A worker of a remote runner shares no memory and no disk with the driver, so nothing here travels but path strings
and options (`ScoringSpec`): every worker process opens the model folder and the feature catalog itself, by local
path or URI (`fashionbert.data.model_store.load_model`, `fashionbert.data.feature_catalog.open_catalog`).
`scoring_context` loads them once per process and run (Beam's `Shared`): RunInference's handlers and the plain DoFns
that need the catalog's ids all get that one object, so its threads share one copy of the weights.

Work travels as `PairBlock`s: one image with the distinct texts it is paired with. Keeping an image's pairs
together keeps the scorer's one-projection-per-image saving (fashionbert/rank/cross_encoder.py), and grouping by
image is itself the shuffle that spreads the blocks over the workers.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import uuid
from typing import Any, Iterable, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, PredictionResult, RunInference
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.utils import shared

from fashionbert.data import storage
from fashionbert.data.feature_catalog import Catalog, IndexedImages, open_catalog
from fashionbert.data.model_store import load_model
from fashionbert.errors import UserError
from fashionbert.model.loading import LoadedModel
from fashionbert.rank.cross_encoder import CrossEncoderScorer, PairScorer, fusion_cosine
from fashionbert.rank.embeddings import DualEncoder, embed_items
from fashionbert.rank.hubness import HubnessBiases, fusion_hubness, hubness_biases
from fashionbert.rank.neighbours import DEFAULT_EXACT_MAX
from fashionbert.runtime import Runtime, resolve_runtime

from .execution import take_shared_filesystem


# Directions of a retrieval block's recall cosines (columns of PairBlock.cosines).
T2I, I2T = 0, 1


# ============================================================================================ options
def unknown_beam_args(beam_args: Sequence[str]) -> str | None:
    """The arguments among `beam_args` that no Beam pipeline option takes, as argparse words them ("unrecognized
    arguments: ... (did you mean ...?)"), or None: Beam itself would only warn and drop them."""
    from apache_beam.options.pipeline_options import _BeamArgumentParser

    parser = _BeamArgumentParser(allow_abbrev=False)
    for cls in PipelineOptions.__subclasses__():
        cls._add_argparse_args(parser)  # noqa: SLF001 - how PipelineOptions itself collects every option
    _, unknown = parser.parse_known_args(take_shared_filesystem(beam_args)[1])
    if not unknown:
        return None
    flags = [a for a in unknown if a.startswith("-")] or unknown
    known = [o for action in parser._actions for o in action.option_strings]  # noqa: SLF001
    close = difflib.get_close_matches(flags[0].split("=", 1)[0], known, n=1)
    return f"unrecognized arguments: {' '.join(unknown)}" + (f" (did you mean {close[0]}?)" if close else "")


def check_beam_args(beam_args: Sequence[str], command: str) -> None:
    """Options a stage does not know must be Beam's: a typo is refused, not dropped with Beam's warning."""
    problem = unknown_beam_args(beam_args)
    if problem:
        raise UserError(f"{problem}: neither a `fashionbert {command}` option nor a Beam pipeline option; "
                        f"`fashionbert {command} --help` lists the stage's options")


# ============================================================================================ the model, per process
@dataclasses.dataclass(frozen=True)
class ScoringSpec:
    """What a worker needs to open the model and the features: path strings and options only."""

    model: str
    features: tuple[str, ...]
    device: str
    precision: str
    num_threads: int
    batch_tokens: int
    block_images: int
    run_id: str
    load_tag: str  # unique per pipeline run: one load per process and run; a later run reloads (the files may differ)


def spec_for(config, run_id: str, threads: int) -> ScoringSpec:
    """A stage config's model, features and runtime options, local paths made absolute and URI schemes checked
    (workers may run elsewhere); `threads`: torch threads when the config leaves them to the runner."""
    return ScoringSpec(storage.resolve(config.model, "--model"),
                       tuple(storage.resolve(p, "--features") for p in config.features), config.device,
                       config.precision, config.num_threads or threads, config.batch_tokens, config.block_images,
                       run_id, f"fashionbert-scoring-{run_id}-{uuid.uuid4().hex}")


def worker_paths(config, **paths: str | None) -> dict[str, str | None]:
    """The paths a scoring pipeline's workers open, by option, for `check_paths_reach_workers`."""
    local_features = [f for f in config.features if not storage.is_remote(f)]
    named = {"--model": config.model, "--features": " ".join(local_features) or None}
    return named | {f"--{name}": path for name, path in paths.items()}


def check_model(model: str) -> None:
    """The driver reads neither the model nor the features (workers do); a local model folder that is not there
    is still worth one clear line before the pipeline starts."""
    if not storage.is_remote(model) and not os.path.isdir(os.path.expanduser(model)):
        raise UserError(f"--model {model}: no such folder; point it at OUT/model of `fashionbert train`")


class ScoringContext:
    """The model folder and the feature catalog, opened in a worker process: the cross-encoder, the recall
    encoder, the image source and the ids."""

    def __init__(self, spec: ScoringSpec):
        self.runtime: Runtime = resolve_runtime(spec.device, spec.precision, spec.num_threads)
        self.loaded: LoadedModel = load_model(spec.model, self.runtime)
        self.catalog: Catalog = open_catalog(list(spec.features), self.loaded)
        self.scorer = CrossEncoderScorer(self.loaded.model, self.runtime, spec.batch_tokens, spec.block_images,
                                         progress=None)
        # Recall vectors from the scorer's copy of the model, as the single-process retrieve takes them.
        self.dual = DualEncoder(self.scorer.model, self.runtime.device, progress=None)
        self.text_ids = self.catalog.text_ids
        self.images = IndexedImages(self.catalog.index, self.catalog.reader)

    @property
    def version(self) -> str:
        return self.loaded.version


_CONTEXTS = shared.Shared()


def scoring_context(spec: ScoringSpec) -> ScoringContext:
    """This process's context for `spec`, loaded by the first caller; held weakly, so it lives as long as a step
    of the running pipeline holds it."""
    return _CONTEXTS.acquire(lambda: ScoringContext(spec), tag=spec.load_tag)


class CatalogModelHandler(ModelHandler):
    """RunInference's handle on the model: `load_model` opens the model folder and the feature catalog in the
    worker (once per process, shared by its threads and by both handlers of a pipeline)."""

    def __init__(self, spec: ScoringSpec, **batching: Any):
        super().__init__(**batching)
        self.spec = spec

    def load_model(self) -> ScoringContext:
        return scoring_context(self.spec)

    def get_metrics_namespace(self) -> str:
        return "fashionbert"


class ContextDoFn(beam.DoFn):
    """A DoFn that reads the catalog's ids or the model through this process's scoring context."""

    def __init__(self, spec: ScoringSpec):
        self.spec = spec
        self.ctx: ScoringContext | None = None

    def setup(self):
        self.ctx = scoring_context(self.spec)


# ============================================================================================ embeddings
@dataclasses.dataclass(frozen=True)
class Chunk:
    """Items start..stop of one kind ("text" or "image"): a unit of embedding and of recall search."""

    kind: str
    start: int
    stop: int


class Plan(ContextDoFn):
    """The seed -> chunks of the catalog's texts and images (the worker counts them; the driver does not).
    `when_corrected`: none unless the model's fusion reads the hubness-corrected cosine, whose biases need every
    vector (score-pairs needs them for nothing else)."""

    def __init__(self, spec: ScoringSpec, chunk: int, when_corrected: bool = False):
        super().__init__(spec)
        self.chunk, self.when_corrected = chunk, when_corrected

    def process(self, _):
        if self.when_corrected and not self.ctx.loaded.fusion.reads_corrected_cosine:
            return
        for kind, n in (("text", len(self.ctx.text_ids)), ("image", len(self.ctx.images))):
            for start in range(0, n, self.chunk):
                yield Chunk(kind, start, min(n, start + self.chunk))


class EmbedHandler(CatalogModelHandler):
    """Chunks -> their items' L2-normalised recall vectors, (stop - start, d) float32."""

    def __init__(self, spec: ScoringSpec):
        super().__init__(spec, min_batch_size=1, max_batch_size=1)

    def run_inference(self, batch: Sequence[Chunk], model: ScoringContext,
                      inference_args: dict | None = None) -> Iterable[PredictionResult]:
        empty = np.zeros(0, dtype=np.int64)
        for chunk in batch:
            items = np.arange(chunk.start, chunk.stop, dtype=np.int64)
            texts, images = (items, empty) if chunk.kind == "text" else (empty, items)
            text_vec, image_vec = embed_items(model.dual, model.text_ids, model.images, texts, images,
                                              self.spec.batch_tokens)
            yield PredictionResult(chunk, text_vec if chunk.kind == "text" else image_vec, model.version)


class GatherVectors(beam.CombineFn):
    """(chunk, vectors) -> {"text": (n_texts, d), "image": (n_images, d)} in item order."""

    def create_accumulator(self):
        return []

    def add_input(self, acc, element):
        acc.append(element)
        return acc

    def merge_accumulators(self, accs):
        return [x for acc in accs for x in acc]

    def extract_output(self, acc):
        out = {}
        for kind in ("text", "image"):
            parts = sorted((c.start, v) for c, v in acc if c.kind == kind)
            out[kind] = np.concatenate([v for _, v in parts]) if parts else np.zeros((0, 0), dtype=np.float32)
        return out


class Embed(beam.PTransform):
    """Chunks -> one dict of every text's and every image's recall vector (for an AsSingleton side input)."""

    def __init__(self, spec: ScoringSpec):
        super().__init__()
        self.spec = spec

    def expand(self, chunks):
        return (
            chunks
            | "Embed" >> RunInference(EmbedHandler(self.spec))
            | "Pair" >> beam.Map(lambda r: (r.example, r.inference))
            | "Gather" >> beam.CombineGlobally(GatherVectors())
        )


class CatalogBiases:
    """The hubness biases of the model's fusion over every vector of the catalog (`Embed`'s side input), computed
    once per worker on first use, the same in every worker; None when the fusion reads the raw cosine."""

    def __init__(self, index: str = "auto", exact_max: int = DEFAULT_EXACT_MAX):
        self.index, self.exact_max = index, exact_max
        self.biases: HubnessBiases | None = None

    def get(self, ctx: ScoringContext, vectors: dict) -> HubnessBiases | None:
        hubness = fusion_hubness(ctx.loaded.fusion)
        if not hubness.enabled:
            return None
        if self.biases is None:
            self.biases = hubness_biases(vectors["text"], vectors["image"], hubness, self.index, self.exact_max,
                                         ctx.runtime.device.type, ctx.catalog.index.product)
        return self.biases


# ============================================================================================ cross-encoder
@dataclasses.dataclass
class PairBlock:
    """One image and the distinct texts paired with it. `cosines`: (n, 2) recall cosines of a retrieval block,
    column T2I where the pair is the text's candidate, I2T where it is the image's, NaN where it is not; None for
    given pairs (score-pairs), whose itc cosine the handler computes when the ranking score uses it, unless
    `pair_cosines` gives it ((n,) from the catalog's vectors, which the correction's biases needed anyway).
    `offsets`: (n,) what the fusion's hubness correction subtracts from each pair's cosine (None when it has none)."""

    image: int
    texts: np.ndarray  # int64
    cosines: np.ndarray | None = None
    offsets: np.ndarray | None = None
    pair_cosines: np.ndarray | None = None


class CrossEncoderHandler(CatalogModelHandler):
    """PairBlocks -> the ranking score's logit per pair: (n, 2) per direction for a retrieval block (P(aligned) =
    sigmoid(logit), fused with each direction's recall cosine as fashionbert.rank.retrieve.two_stage does), (n,) for
    given pairs. A batch holds up to `block_images` blocks (BatchElements adapts the size to the time a batch
    takes); the scorer sorts its pairs by image and text length and cuts them into token-budget batches itself.
    Batches are counted in blocks, not pairs: BatchElements weighing elements by pairs emits empty batches when
    one block outweighs its current target, which the keyed handler cannot take."""

    def __init__(self, spec: ScoringSpec):
        super().__init__(spec, min_batch_size=1, max_batch_size=spec.block_images)

    def run_inference(self, batch: Sequence[PairBlock], model: ScoringContext,
                      inference_args: dict | None = None) -> Iterable[PredictionResult]:
        pairs = np.concatenate([np.stack([b.texts, np.full(len(b.texts), b.image, dtype=np.int64)], axis=1)
                                for b in batch])
        fusion = model.loaded.fusion
        offsets = np.concatenate([b.offsets for b in batch]) if batch[0].offsets is not None else None
        if batch[0].cosines is None:
            given = (np.concatenate([b.pair_cosines for b in batch]) if batch[0].pair_cosines is not None else None)
            logits = PairScorer(model.scorer, fusion).score(model.text_ids, model.images, pairs, offsets=offsets,
                                                            cosines=given).logit
        else:  # a fusion without TIA weight ranks by the recall cosine: no cross-encoder pass
            cosines = np.concatenate([b.cosines for b in batch])
            # a pair recalled in one direction only has NaN in the other; where both, they are one dot product
            margins = model.scorer.score(model.text_ids, model.images, pairs, cosines=np.fmax(
                cosines[:, T2I], cosines[:, I2T])) if fusion.uses_tia else None
            logits = fusion.logit(None if margins is None else np.repeat(margins[:, None], 2, axis=1),
                                  fusion_cosine(fusion, cosines, None if offsets is None else offsets[:, None]))
        start = 0
        for b in batch:
            yield PredictionResult(b, logits[start:start + len(b.texts)], model.version)
            start += len(b.texts)


class ScoreBlocks(beam.PTransform):
    """(key, PairBlock) -> (key, PredictionResult(block, logits, model_version)), through RunInference with a keyed
    handler: the key is what the caller carries past the model (an image, input row numbers)."""

    def __init__(self, spec: ScoringSpec):
        super().__init__()
        self.spec = spec

    def expand(self, blocks):
        return blocks | "RunInference" >> RunInference(KeyedModelHandler(CrossEncoderHandler(self.spec)))

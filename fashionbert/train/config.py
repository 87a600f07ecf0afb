"""`fashionbert train`'s options: the typed config the training stage runs on, and the parser that fills it.

`TrainConfig`'s defaults are the command line's; nightly, the demo and tests build a `TrainConfig` directly, the
CLI parses argv into one (`config_from_args`).
"""
from __future__ import annotations

import argparse
import dataclasses

from fashionbert.model.backbone import DEFAULT_BACKBONE
from fashionbert.model.config import TIA_LOSSES, TIA_POOLINGS
from fashionbert.model.hard_negatives import SIMILARITIES as MINING_SIMILARITIES
from fashionbert.runtime import add_runtime_arguments, stage_config
from fashionbert.train.adaptive_loss import MODES as TASK_WEIGHT_MODES


@dataclasses.dataclass
class TrainConfig:
    features: list[str] = dataclasses.field(default_factory=list)  # featurize output folders
    out: str = ""
    # data
    val_fraction: float = 0.05
    split_seed: int = 0
    neg_ratio: int = 1
    random_neg_fraction: float = 0.5
    hard_neg_fraction: float | None = None  # None: 1.0 with the itc head, 0 without
    hard_neg_temperature: float = 0.0
    hard_neg_similarity: str = "cosine"
    group_negatives: bool = False
    subcategory_batches: bool = False
    max_text_len: int | None = None
    text_variants: bool = True
    shuffle_window: int = 512
    # model
    backbone: str = DEFAULT_BACKBONE
    mlm_probability: float = 0.15
    mpm_probability: float = 0.10
    dropout: float = 0.0
    itc_dim: int = 256
    itc_pooling: str = "mean"
    itc_queue: int = 0
    mining_bank: int = 0
    mining_bank_after: int = 0
    fusion_layer: int | None = None  # None: half the backbone's layers
    own_fusion_layers: bool = False
    detach_fusion_input: bool = False
    tia_pooling: str | None = None  # None: "halves" with the itc head, "cls" without
    tia_residual: bool = False
    tia_loss: str = "binary"
    fusion_token_drop: float = 0.0
    whole_word_mask: bool = True
    # optimisation
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-4
    warmup: float = 0.05
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    tia_warmup: float = 0.1
    itc_warmup: float = 0.0
    joint_lr: float = 0.0
    matching_only: bool = False
    task_weights: str = "adaptive-grad"
    seed: int = 0
    # runtime
    device: str = "auto"
    precision: str = "auto"
    num_threads: int = 0
    prefetch: int = 2
    # validation, checkpoints, logging
    val_every: int = 500
    val_queries: int = 100
    val_max_images: int = 1000
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    resume: bool = False
    progress: bool = True


D = TrainConfig()


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return stage_config(TrainConfig, args)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _data_arguments(parser)
    _model_arguments(parser)
    _optimisation_arguments(parser)
    add_runtime_and_validation_arguments(parser)


def add_runtime_and_validation_arguments(parser: argparse.ArgumentParser) -> None:
    """Device, precision, threads, prefetch, and validation/checkpoint/progress options (train's and distill's)."""
    _runtime_arguments(parser)
    _validation_arguments(parser)


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--features", action="append", required=True, metavar="DIR",
                   help="featurize output folder (with _SUCCESS); repeat to train on several")
    g.add_argument("--out", required=True, metavar="DIR",
                   help="output folder: checkpoints/, model/ (final model for scoring), metrics.jsonl, "
                        "training_curves.png, summary.json")
    g.add_argument("--val-fraction", type=float, default=D.val_fraction,
                   help="fraction of products held out for validation, split by a hash of group_id so that "
                        "products of one group stay together; deterministic (default 0.05)")
    g.add_argument("--split-seed", type=int, default=D.split_seed,
                   help="salt of the train/validation hash; keep it fixed to compare runs (default 0)")
    g.add_argument("--max-text-len", type=int, default=D.max_text_len,
                   help="max text tokens incl. [CLS]/[SEP] (default: featurize's max_text_len, else 64)")
    add_pair_arguments(g)


def add_pair_arguments(g: argparse._ArgumentGroup) -> None:
    """The options of the pairs a batch holds (train's and distill's)."""
    g.add_argument("--text-variants", action=argparse.BooleanOptionalAction, default=D.text_variants,
                   help="where --features holds text variants (featurize --text-variants), each pair draws its "
                        "product's text from the product's texts and its variants alike, anew per pass; validation "
                        "and scoring use the product's texts alone (default on; a folder without variants trains "
                        "the same either way)")
    g.add_argument("--neg-ratio", type=int, default=D.neg_ratio,
                   help="negative pairs per positive pair, each the positive's image with another product's "
                        "text or its text with another product's image (default 1)")
    g.add_argument("--random-neg-fraction", type=float, default=D.random_neg_fraction,
                   help="share of negatives drawn from any product rather than the same sub-category; "
                        "same-sub-category negatives alone kept TIA at chance in calibration (default 0.5)")
    g.add_argument("--hard-neg-fraction", type=float, default=D.hard_neg_fraction,
                   help="share of negatives mined in each batch from the itc similarity (ALBEF's hard negatives): a "
                        "positive's text gets another positive's image, or its image another positive's text, drawn "
                        "with probability softmax(cosine / temperature), never of its own group; the rest are drawn "
                        "as --random-neg-fraction says. Needs the itc head (default 1.0; 0 with --itc-dim 0)")
    g.add_argument("--hard-neg-temperature", type=float, default=D.hard_neg_temperature,
                   help="temperature of the mined negatives' softmax; 0 = the itc head's learned temperature "
                        "(default 0)")
    g.add_argument("--hard-neg-similarity", choices=MINING_SIMILARITIES, default=D.hard_neg_similarity,
                   help="what the mined negatives' softmax reads: the itc cosine, or the cosine corrected for "
                        "hubness (each candidate's log-sum-exp over the pool's queries, the batch's and "
                        "--mining-bank's, taken off: a dual softmax, as the ranking score corrects it over the "
                        "catalog), so that TIA trains on the pairs the corrected cosine still confuses rather than on "
                        "hubs. Measured on hm-dev at the Xeon's budget, in-batch and over --mining-bank 1024: no gain "
                        "(README) (default cosine)")
    g.add_argument("--group-negatives", action=argparse.BooleanOptionalAction, default=D.group_negatives,
                   help="a product's group (its colour variants: featurize's --group-column) shares its batches, and "
                        "its members are each other's negatives, in the itc loss and as mined TIA negatives, unless "
                        "their texts are the same. Why: ranking must tell a product from its other colours, and a "
                        "negative from another group seldom asks that (default off: shuffled batches, mining never "
                        "draws the positive's group)")
    g.add_argument("--subcategory-batches", action=argparse.BooleanOptionalAction, default=D.subcategory_batches,
                   help="serve each shuffle window sub-category by sub-category, so that a batch's other positives (its "
                        "in-batch itc negatives and the pool its TIA negatives are mined from) are mostly of the "
                        "positive's own sub-category, as the sample-100 candidates are: on hm-dev a shuffled batch of "
                        "32 spans ~18 sub-categories, such a batch ~4. Groups still share batches with "
                        "--group-negatives. Measured on hm-dev with the quality recipe: sample-100 Rank@1 ~1 point "
                        "higher, the full gallery's 7-8 points lower (README) (default off: shuffled batches)")
    g.add_argument("--shuffle-window", type=int, default=D.shuffle_window,
                   help="images per shuffle window: the stream reads this many images at a time, shuffles "
                        "them, and draws image negatives from them; memory ~ window x 160 KB (default 512)")


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--backbone", default=D.backbone, metavar="DIR",
                   help="pretrained BERT folder (config.json, weights, vocab); 'minilm' = the packaged "
                        "all-MiniLM-L6-v2 (default). Must use the vocabulary featurize tokenized with")
    g.add_argument("--mlm-probability", type=float, default=D.mlm_probability, help="share of text words masked (default 0.15)")
    g.add_argument("--mpm-probability", type=float, default=D.mpm_probability, help="share of patches masked (default 0.10)")
    g.add_argument("--dropout", type=float, default=D.dropout,
                   help="dropout of the encoder, patch embeddings and TIA head; -1 keeps the backbone's own (0.1 "
                        "for BERT). Default 0: on this CPU dropout's random masks cost ~15%% of a training step, and "
                        "in a controlled 4x4 text-image matching test dropout 0.1 kept TIA on its chance plateau "
                        ">3x longer (default 0)")
    g.add_argument("--itc-dim", type=int, default=D.itc_dim,
                   help="the contrastive itc task (a 4th task under the same task weights): text-only and "
                        "image-only passes projected to this many dimensions, trained with in-batch InfoNCE on "
                        "the aligned pairs; the retrieval stage's recall vectors. 0 = the paper's three tasks "
                        "only (then recall falls back to untrained mean-pooled states) (default 256)")
    g.add_argument("--itc-pooling", choices=("mean", "cls"), default=D.itc_pooling,
                   help="how the itc head pools a single-modality pass (default mean)")
    g.add_argument("--itc-queue", type=int, default=D.itc_queue,
                   help="contrastive negatives beyond the batch: the itc vectors of the last N training positives "
                        "(detached, as in MoCo/ALBEF's queue but without a momentum encoder), saved with each "
                        "checkpoint; 0 = the batch's only (default 0)")
    g.add_argument("--mining-bank", type=int, default=D.mining_bank, metavar="N",
                   help="mined negatives are drawn from the batch's positives and the last N positives of the joint "
                        "steps (their inputs, and their itc vectors as computed then), not the batch's alone: by the "
                        "joint steps the cosine ranks nearly every in-batch pair right, so in-batch negatives teach "
                        "the TIA head only what the cosine knows. Saved with each checkpoint; memory ~ N x 165 KB "
                        "(64 patches of 1,286 values); 0 = the batch's only (default 0)")
    g.add_argument("--mining-bank-after", type=int, default=D.mining_bank_after, metavar="STEPS",
                   help="joint steps that mine from the batch's positives alone before --mining-bank joins; the bank "
                        "then fills from empty, so the pool grows to N over the next N / --batch-size steps. Why: a "
                        "head that shares nothing with the itc head (--tia-pooling cls) starts at chance, and the "
                        "bank's negatives from its first joint step kept it there on hm-dev; the batch's easier ones "
                        "take it off the plateau first (default 0: the bank from the first joint step)")
    g.add_argument("--fusion-layer", type=int, default=D.fusion_layer,
                   help="late fusion: the first K encoder layers see the text and the patches apart (as the itc passes "
                        "do), the layers above attend across them, as ALBEF's fusion encoder sits on its unimodal "
                        "encoders; 0 = the paper's single stream from the first layer. Default: half the backbone's "
                        "layers (3 of MiniLM's 6), whose TIA head ranked ~4 points better on hm-dev (README, 'What was "
                        "tried') at no more compute per step: below the fusion layer attention spans one side, not "
                        "both")
    g.add_argument("--fusion-token-drop", type=float, default=D.fusion_token_drop, metavar="P",
                   help="in training, each joint-pass row hides this share of its text tokens and patches ([CLS] "
                        "kept), drawn anew per row and step, from the attention of the layers from --fusion-layer up: "
                        "the TIA head cannot rest on a few memorised cues of a training pair. No extra compute (the "
                        "joint pass already runs with a mask); scoring sees every token, and the itc passes run "
                        "without it. Why: with the mining bank's negatives the [CLS] head ranked its training products "
                        "41 points better than held-out ones. Measured with 0.25 on hm-dev: both heads ranked lower "
                        "(TIA alone ~6 points, the cosine 2-4: the fusion layers are the itc passes' too); with "
                        "--own-fusion-layers the cosine held and TIA still ranked 5-6 points lower (README) (default 0)")
    g.add_argument("--own-fusion-layers", action=argparse.BooleanOptionalAction, default=D.own_fusion_layers,
                   help="the joint pass's layers above --fusion-layer get weights of their own (copies of the "
                        "backbone's at the start), as ALBEF's fusion encoder; the text-only and image-only passes keep "
                        "the backbone's, so the TIA loss no longer pulls the layers the itc vectors come from. Same "
                        "compute per step, ~1/4 more parameters (MiniLM: 3 layers, 5.3M); needs --fusion-layer >= 1 "
                        "(default off)")
    g.add_argument("--detach-fusion-input", action=argparse.BooleanOptionalAction, default=D.detach_fusion_input,
                   help="the joint pass reads the states entering --fusion-layer without their gradient, so the TIA "
                        "(and MLM/MPM) losses train only the layers above it and the heads, and the layers below learn "
                        "from the itc loss alone; with --own-fusion-layers and --tia-pooling cls or tokens the itc "
                        "vectors get no gradient from the TIA loss. Same compute; needs --fusion-layer >= 1 (default "
                        "off)")
    g.add_argument("--tia-pooling", choices=TIA_POOLINGS, default=D.tia_pooling,
                   help="what the TIA classifier reads of the joint pass: cls = BERT's pooled [CLS] (the paper); "
                        "halves = that plus the agreement of the pass's text and patch halves (their mean states "
                        "through the itc projections, a scaled cosine), which gives the cross-encoder a start it "
                        "learns from instead of a chance plateau, but ranks as the itc cosine does; tokens = [CLS] "
                        "plus the token-wise agreement of the pass's words and patches (each word's best patch, each "
                        "patch's best word, through projections of the TIA head's own: FILIP's late interaction). "
                        "halves needs the itc head (default halves; cls with --itc-dim 0)")
    g.add_argument("--tia-residual", action=argparse.BooleanOptionalAction, default=D.tia_residual,
                   help="the TIA logit as a residual on the recall stage: each row's itc cosine (no gradient, centred "
                        "on its running mean) times a learned scale joins the aligned logit, so the head learns what "
                        "the cosine gets wrong on the mined negatives instead of the cosine again; scoring adds the same "
                        "term with the recall stage's cosines. Needs the itc head. Measured on hm-dev: the head then "
                        "ranks as the cosine does and adds nothing (README) (default off)")
    g.add_argument("--tia-loss", choices=TIA_LOSSES, default=D.tia_loss,
                   help="binary = 2-way cross-entropy on each row (the paper); pairwise = each mined negative ranked "
                        "against the positive it was mined for (the same text with another image, or the same image "
                        "with another text): -log softmax of the two rows' TIA margins, the loss re-rankers train on "
                        "their retriever's hard negatives with; both = their sum. pairwise and both need mined "
                        "negatives (--hard-neg-fraction > 0); with pairwise the loader's negatives teach nothing "
                        "(default binary)")
    g.add_argument("--no-whole-word-mask", dest="whole_word_mask", action="store_false",
                   help="mask WordPiece tokens independently instead of whole words")


def add_schedule_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Length, batch and AdamW options (train's and distill's); -> the group, for train's own to join."""
    g = parser.add_argument_group("optimisation")
    length = g.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=D.steps, help="optimizer steps to train for")
    length.add_argument("--epochs", type=float, default=D.epochs,
                        help="passes over the training images (default 1 when --steps is not given)")
    g.add_argument("--batch-size", type=int, default=D.batch_size,
                   help="positive pairs per micro-batch per process; with --neg-ratio R the model sees "
                        "batch-size x (1+R) rows (default 32)")
    g.add_argument("--grad-accum", type=int, default=D.grad_accum, help="micro-batches per optimizer step (default 1)")
    g.add_argument("--lr", type=float, default=D.lr, help="peak AdamW learning rate (default 1e-4)")
    g.add_argument("--warmup", type=float, default=D.warmup,
                   help="linear warm-up: steps if >= 1, else a fraction of all steps; then linear decay to 0 "
                        "(default 0.05)")
    g.add_argument("--weight-decay", type=float, default=D.weight_decay,
                   help="AdamW weight decay, not applied to biases and LayerNorm weights (default 0.01)")
    g.add_argument("--clip-grad", type=float, default=D.clip_grad, help="gradient norm clipping, 0 = off (default 1.0)")
    g.add_argument("--seed", type=int, default=D.seed, help="seed of initialisation, data order, masks, dropout (default 0)")
    return g


def _optimisation_arguments(parser: argparse.ArgumentParser) -> None:
    g = add_schedule_arguments(parser)
    g.add_argument("--tia-warmup", type=float, default=D.tia_warmup,
                   help="first steps (>= 1) or fraction of all steps (< 1) that train the matching tasks alone "
                        "(TIA, and itc when on, equal weights) on unmasked pairs before MLM and MPM join. Why: text-image matching starts on a plateau where TIA's gradient "
                        "is tiny; with MLM's much larger gradient in Adam's normaliser it stayed at chance for "
                        "hundreds of steps in our tests, alone it leaves the plateau in tens (default 0.1)")
    g.add_argument("--itc-warmup", type=float, default=D.itc_warmup,
                   help="first steps (>= 1) or fraction of all steps (< 1) that train the contrastive itc task alone: "
                        "no joint pass, so no TIA (nor MLM/MPM) and no mined negatives; TIA joins after them, mining "
                        "from the embeddings trained so far. Why: such a step costs half a joint matching-only step's FLOPs, and on "
                        "hm-dev 1,200 steps with --itc-warmup 760 (the same budget as 880 joint ones) rank ~4 points "
                        "higher (README, 'More steps for the embeddings'); needs the itc head (default 0: TIA from the "
                        "first step)")
    g.add_argument("--joint-lr", type=float, default=D.joint_lr, metavar="LR",
                   help="restart the learning-rate schedule at the first joint step after --itc-warmup: warm up again "
                        "from where it stands to LR over --warmup's steps, then decay linearly to 0 at the last step. "
                        "Why: by the end of a long --itc-warmup the one schedule has decayed (the README recipe's "
                        "joint steps start at 0.39 x --lr and average a fifth of it), and the TIA head starts from "
                        "nothing there; 0 (default): one schedule for the whole run")
    g.add_argument("--matching-only", action=argparse.BooleanOptionalAction, default=D.matching_only,
                   help="train the matching tasks alone on every step, as the --tia-warmup steps do: MLM and MPM never "
                        "join, and every batch is unmasked. Why: ranking is what TIA and itc are for, and an unmasked "
                        "late-fusion step costs ~60%% of a masked one, so a fixed budget buys ~1.5x the steps; on "
                        "hm-dev the README's recipe ranks higher with it (README, 'What quality to expect') "
                        "(default off: the paper's pretraining, MLM and MPM after the warm-up)")
    g.add_argument("--task-weights", choices=TASK_WEIGHT_MODES, default=D.task_weights,
                   help="MLM/MPM/TIA(/itc) weights, w_i = (aK - n_i)^-1 / sum_j (aK - n_j)^-1 each batch: "
                        "adaptive-grad = n from each task's share of the squared gradient norm on the last "
                        "encoder layer's FFN output weight (the paper); adaptive-loss = n = softmax(losses)^2 "
                        "(the official code); fixed = equal weights (default adaptive-grad)")


def _runtime_arguments(parser: argparse.ArgumentParser) -> None:
    g = add_runtime_arguments(parser, precision_help=(
        "Measured on the dev CPU (AVX512-BF16, MiniLM, same batches): per-task losses within 0.1%% of fp32 (tests "
        "allow max(0.02, 2%%)), a training step 1.5x faster on one thread, bf16 matmuls 2.3-4x faster"))
    g.add_argument("--prefetch", type=int, default=D.prefetch,
                   help="batches prepared ahead in a background thread, 0 = none (default 2)")


def _validation_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("validation, checkpoints, logging")
    g.add_argument("--val-every", type=int, default=D.val_every, help="validate every N steps, 0 = only at the end (default 500)")
    g.add_argument("--val-queries", type=int, default=D.val_queries,
                   help="held-out text queries of the quick sample-100 Rank@1, each against its image and up "
                        "to 100 others of the sub-category (default 100)")
    g.add_argument("--val-max-images", type=int, default=D.val_max_images,
                   help="held-out images kept in memory as the validation pool (default 1000)")
    g.add_argument("--checkpoint-every", type=int, default=D.checkpoint_every,
                   help="write a checkpoint every N steps (and at the end), 0 = only at the end (default 500)")
    g.add_argument("--keep-checkpoints", type=int, default=D.keep_checkpoints, help="newest checkpoints kept, 0 = all (default 3)")
    g.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in OUT/checkpoints (fresh start if none)")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar: a log line every 30 s instead (as when stderr is not a terminal)")

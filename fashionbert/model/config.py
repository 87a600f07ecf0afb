"""The FashionBERT model configuration: everything needed to rebuild the network from a checkpoint.

A `transformers.PreTrainedConfig` (model_type "fashionbert", registered with `AutoConfig` by `import fashionbert`),
saved as `config.json` in every checkpoint and in the final model folder. The BERT part is stored in full (the
backbone's own config dict), so a checkpoint loads without the backbone folder it started from; the `backbone`
field only records where the weights came from. Folders written before the class became a PreTrainedConfig hold
the same keys and load unchanged.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from transformers import BertConfig, PreTrainedConfig

from fashionbert.errors import UserError
from fashionbert.model.patch_cnn import FEATURE_DIM

CONFIG_NAME = "config.json"
MODEL_TYPE = "fashionbert"
FORMAT_VERSION = 1
# The MLM label of a token that is not masked (PyTorch cross-entropy's ignore_index).
IGNORE_INDEX = -100
TIA_POOLINGS = ("cls", "halves", "tokens")
TIA_LOSSES = ("binary", "pairwise", "both")


class FashionBertConfig(PreTrainedConfig):
    model_type = MODEL_TYPE

    # Where the pretrained text backbone came from ("minilm" for the packaged default, or a folder path).
    backbone: str = "minilm"
    # The backbone's BertConfig as a dict (filled by `from_pretrained_backbone`; needed to rebuild the encoder).
    bert: dict = dataclasses.field(default_factory=dict)
    # Text: at most this many tokens including [CLS] and [SEP] (the official FashionBERT uses 64).
    max_text_len: int = 64
    # Image: grid x grid patches, each a `feature_dim` vector from the patch CNN named `cnn`.
    grid: int = 8
    feature_dim: int = FEATURE_DIM  # the featurizer's: 1280 CNN channels + 6 colour statistics
    cnn: str = ""
    patch_mode: str = ""
    # Token ids the masking and padding need (from the backbone's tokenizer).
    pad_token_id: int = 0
    cls_token_id: int = 101
    sep_token_id: int = 102
    mask_token_id: int = 103
    # Pretraining masking rates. Whole-word masking as in the official code (WordPiece "##" pieces are masked
    # together with their word).
    mlm_probability: float = 0.15
    mpm_probability: float = 0.10
    whole_word_mask: bool = True
    # Dropout of the encoder (hidden and attention), the patch embeddings and the TIA classifier; None keeps the
    # backbone's own rates. `fashionbert train` defaults to 0: see its --dropout help for the measurements.
    dropout: float | None = None
    # The contrastive "itc" task and its recall embeddings (fashionbert.model.contrastive): the projection size of the
    # text-only / image-only vectors, 0 = no itc head (a three-task model, as in the paper), and their pooling.
    itc_dim: int = 0
    itc_pooling: str = "mean"
    # Late fusion (ALBEF's layout in one stream): the first `fusion_layer` encoder layers see the text and the patches
    # apart, as the itc passes do, and only the layers above attend across them. 0 = the paper's single stream from
    # the first layer.
    fusion_layer: int = 0
    # The joint pass's layers from `fusion_layer` up as weights of their own (`FashionBertModel.fusion_layers`, copies
    # of the backbone's at the start), while the text-only and image-only passes keep the backbone's: ALBEF's
    # layout, whose fusion encoder is not its unimodal encoders. Same compute; needs fusion_layer > 0 (the layers
    # below it stay shared). Why: with one set of weights the TIA and itc losses pull the same upper layers, and
    # every TIA head that did not read the itc projections cost the itc cosine ranking points on hm-dev.
    own_fusion_layers: bool = False
    # The joint pass takes the states entering `fusion_layer` without their gradient: the losses computed on it (TIA,
    # and MLM/MPM where trained) train only the layers from the fusion layer up and the heads, and the layers below
    # it (and the embeddings) learn from the itc loss alone. With `own_fusion_layers` and a TIA head that does not
    # read the itc projections (`tia_pooling` "cls" or "tokens") the text-only and image-only passes get no gradient
    # from the TIA loss at all: the recall cosine trains as if alone. Needs fusion_layer >= 1. Why: every TIA head
    # unlike the cosine cost the cosine ranking points through the weights the two passes share (README, "Why the
    # re-rank adds nothing yet"); the re-rank only pays when it adds to an intact cosine. Measured with "tokens" on
    # own fusion layers: the cosine did not gain from being left alone and the head alone ranked lower (README).
    detach_fusion_input: bool = False
    # The text-only and image-only passes (the itc / recall vectors) through an encoder of their own with this many
    # layers (`FashionBertModel.recall_encoder`), sharing the embeddings; 0 = through the joint encoder, as `train`
    # builds it. Why: a distilled student (`fashionbert distill`) keeps its teacher's layers here -- they run once
    # per item, not once per pair -- so only the cross-encoder gets cheaper and the recall stage stays the teacher's.
    recall_layers: int = 0
    # What the TIA classifier reads of the joint pass. "cls": BERT's pooled [CLS] (the paper). "halves": the pooled
    # [CLS] plus the agreement of the pass's two halves -- the text tokens' and the patches' mean states through the
    # itc head's projections, a scaled cosine added to the aligned logit (needs the itc head). Why: a linear probe on
    # the trained [CLS] of hm-dev's single stream ranked no better than chance while the untrained agreement of the
    # halves already ranked a third of the queries first (README, "What quality to expect").
    # "tokens": the pooled [CLS] plus the token-wise agreement of the pass's text tokens and patches (each word's best
    # patch, each patch's best word; FILIP's late interaction) through projections of the TIA head's own, of
    # `tia_token_dim` dimensions. Why: "halves" learned the itc cosine again (per-query correlation 0.99 on hm-dev),
    # so re-ranking by it changed little. Measured: "tokens" ranks less like the cosine (0.94) but its gradient
    # through the shared upper layers cost the cosine 7-9 Rank@1 points (README, "Why the re-rank adds nothing yet").
    tia_pooling: str = "cls"
    tia_token_dim: int = 128
    # The TIA logit as a residual on the recall stage: the aligned logit gets a learned scale times the row's itc
    # cosine (the text-only and image-only vectors' cosine, without its gradient, less its running mean over
    # training rows), so the joint pass's head learns only what the cosine gets wrong -- on the mined negatives,
    # the cosine's own hardest -- instead of the cosine again. Needs the itc head. Why: every TIA head trained on its
    # own either learned the cosine again ("halves": per-query correlation 0.99) or ranked 10-15 points below it,
    # and fusing them with the cosine gained at most +1.7 Rank@1 on hm-dev (README, "Why the re-rank adds nothing
    # yet"); a head trained on the cosine's errors is what a fusion with the cosine can use (boosting).
    tia_residual: bool = False
    # How the TIA loss reads a batch. "binary": 2-way cross-entropy on each row alone (the paper, ALBEF's ITM).
    # "pairwise": each mined negative against the positive it was mined for (same text with another image, or same
    # image with another text): -log softmax over the two rows' TIA margins, the listwise loss of re-rankers trained
    # on their retriever's hard negatives with groups of two (Gao et al. 2021, "Rethink training of BERT rerankers":
    # LCE). "both": the sum of the two. Why: the binary loss can be lowered by moving whole queries' margins up or
    # down, which changes no ranking; Rank@1 asks only that a query's own pair outscore the pairs the embeddings
    # confuse with it, which is what the pairwise loss trains. Rows in no pair (the loader's negatives when
    # --hard-neg-fraction < 1, a positive whose every candidate was excluded) teach "pairwise" nothing.
    tia_loss: str = "binary"
    # Training only: each joint-pass row hides this share of its text tokens and patches (drawn anew per row and step,
    # [CLS] always kept) from the attention of the layers from `fusion_layer` up, so the TIA head cannot rest its
    # verdict on a few memorised cues of a training pair. Costs no compute: the joint pass already runs with an
    # attention mask. Scoring (eval mode) sees every token. Why: with the bank's hard negatives the [CLS] head fitted
    # its training products 41 points better than held-out ones (README, "What quality to expect"). Measured at 0.25 on
    # hm-dev: both heads ranked lower (without `own_fusion_layers` these layers are the itc passes' too; with it the
    # cosine held and TIA still ranked lower: README, "Regularising the joint steps").
    fusion_token_drop: float = 0.0
    # The folder layout's version: a reader refuses a newer one rather than misread it.
    format_version: int = FORMAT_VERSION

    @property
    def classifier_dropout(self) -> float:
        return float(self.dropout if self.dropout is not None else self.bert.get("hidden_dropout_prob", 0.1))

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def hidden_size(self) -> int:
        return int(self._bert_field("hidden_size"))

    @property
    def vocab_size(self) -> int:
        return int(self._bert_field("vocab_size"))

    def _bert_field(self, name: str):
        # AttributeError, not KeyError, before `bert` is filled: transformers probes these with getattr(..., None).
        if name not in self.bert:
            raise AttributeError(f"{name}: the config has no backbone yet (FashionBertModel.from_pretrained_backbone fills it)")
        return self.bert[name]

    def validate(self) -> None:
        """transformers' own checks, then FashionBERT's (UserError naming the option to change)."""
        super().validate()
        if self.grid < 1 or self.feature_dim < 1:
            raise UserError(f"model config: grid ({self.grid}) and feature_dim ({self.feature_dim}) must be positive")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model config: dropout {self.dropout} must be in [0, 1)")
        if self.itc_dim < 0 or self.itc_pooling not in ("mean", "cls"):
            raise UserError(f"model config: itc_dim ({self.itc_dim}) must be >= 0 and itc_pooling "
                            f"({self.itc_pooling!r}) 'mean' or 'cls'")
        if self.tia_pooling not in TIA_POOLINGS or (self.tia_pooling == "halves" and self.itc_dim <= 0):
            raise UserError(f"model config: tia_pooling {self.tia_pooling!r} must be one of {TIA_POOLINGS}, and "
                            f"'halves' needs the itc head (itc_dim > 0; it is {self.itc_dim})")
        if self.tia_residual and self.itc_dim <= 0:
            raise UserError("model config: tia_residual adds the itc cosine to the TIA logit and needs the itc head "
                            f"(itc_dim > 0; it is {self.itc_dim})")
        if self.tia_loss not in TIA_LOSSES:
            raise UserError(f"model config: tia_loss {self.tia_loss!r} must be one of {TIA_LOSSES}")
        if not 0.0 <= self.fusion_token_drop < 1.0:
            raise UserError(f"model config: fusion_token_drop {self.fusion_token_drop} must be in [0, 1)")
        if self.tia_token_dim < 1:
            raise UserError(f"model config: tia_token_dim {self.tia_token_dim} must be >= 1")
        layers = int(self.bert.get("num_hidden_layers", 0)) if self.bert else None
        if self.fusion_layer < 0 or (layers is not None and self.fusion_layer >= layers):
            raise UserError(f"model config: fusion_layer {self.fusion_layer} must be in [0, {layers}) (the backbone's "
                            f"layers; at least one must fuse)")
        if self.own_fusion_layers and self.fusion_layer < 1:
            raise UserError("model config: own_fusion_layers needs late fusion (fusion_layer >= 1): the layers below "
                            "the fusion layer are the ones the joint pass shares with the text-only and image-only passes")
        if self.detach_fusion_input and self.fusion_layer < 1:
            raise UserError("model config: detach_fusion_input needs late fusion (fusion_layer >= 1): with 0 the "
                            "joint pass's input is the embeddings and every layer above is the itc passes' too")
        if self.recall_layers < 0:
            raise UserError(f"model config: recall_layers {self.recall_layers} must be >= 0 (0: the joint encoder's)")
        if not 0.0 <= self.mlm_probability < 1.0 or not 0.0 <= self.mpm_probability < 1.0:
            raise UserError("model config: masking probabilities must be in [0, 1)")
        if self.bert and self.max_text_len > int(self.bert.get("max_position_embeddings", 512)):
            raise UserError(
                f"max text length {self.max_text_len} exceeds the backbone's position table "
                f"({self.bert.get('max_position_embeddings')}); lower --max-text-len"
            )
        if self.bert and int(self.bert.get("type_vocab_size", 2)) < 2:
            raise UserError("the backbone has a single segment embedding; FashionBERT needs segment 1 for patches")

    def save(self, folder: str | os.PathLike) -> Path:
        self.save_pretrained(folder)
        return Path(folder) / CONFIG_NAME

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "FashionBertConfig":
        """The config.json of a model folder, with one-line errors for a folder that is not one."""
        path = Path(folder) / CONFIG_NAME
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise UserError(f"{folder}: no {CONFIG_NAME}; not a FashionBERT model folder") from exc
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: not valid JSON ({exc})") from exc
        if d.get("model_type") != MODEL_TYPE:
            raise UserError(
                f"{path}: model_type is {d.get('model_type')!r}, not {MODEL_TYPE!r}: use a folder written by "
                f"`fashionbert train` (OUT/model or OUT/checkpoints/step-N)"
            )
        if int(d.get("format_version", 0)) > FORMAT_VERSION:
            raise UserError(f"{path}: format version {d['format_version']} is newer than this code reads "
                            f"({FORMAT_VERSION}); upgrade fashionbert")
        return cls.from_dict(d)

    def bert_config(self) -> BertConfig:
        return BertConfig(**self.bert)

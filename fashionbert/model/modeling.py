"""FashionBERT: a single-stream BERT over `[CLS] text [SEP] patches` with MLM, MPM and TIA heads.

Layout follows transformers' modeling_bert.py: a config object, modules top-down, the model last. The model is a
`transformers.PreTrainedModel` (registered with `AutoModel` by `import fashionbert`), so `save_pretrained` and
`AutoModel.from_pretrained` work on the folders training writes.

Why the embeddings are built by hand: `BertModel(inputs_embeds=...)` adds the TEXT position table to every
token, patches included. So the text goes through the backbone's own embedding module (word + position +
segment 0 + LayerNorm), the patches through `FashionBertPatchEmbeddings` (Linear(CNN dim -> hidden) + a
learned grid*grid patch position table + segment 1 + LayerNorm), and the concatenation goes straight to
`bert.encoder` with an extended attention mask that hides text padding (patches are never padding).

The model owns these pieces (`embed_text`, `embed_patches`, `encode_joint`, `encode_text`, `encode_image`,
`alignment_logits`/`tia_margin`) and `encode` composes them; training, the scorer (which reuses each text's and image's embeddings
across pairs), the recall embeddings and validation call them, so the input layout is built in one place.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import BertModel, PreTrainedModel
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.bert.modeling_bert import BertEncoder, BertLayer, BertPredictionHeadTransform

from fashionbert.errors import UserError
from fashionbert.model.config import IGNORE_INDEX, FashionBertConfig
from fashionbert.model.contrastive import (ITC_PREFIX, ContrastiveHead, EmbeddingQueue, contrastive_loss, itc_inputs,
                                           masked_mean, text_groups, unused_head_zero)
from fashionbert.model.hard_negatives import (MiningBank, MiningRequest, gather, gather_with_grad, mine, rank_offset,
                                              world_size)

WEIGHTS_NAME = "model.safetensors"


@contextlib.contextmanager
def quiet_transformers():
    """transformers' progress bars and load reports off for the block (our stages print their own summary); the
    caller's settings come back afterwards."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


# ----------------------------------------------------------------------------------------------- losses
def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the masked tokens. `logits` (N, V) and `labels` (N,) are already gathered at
    the masked positions (computing the vocab projection only there saves most of the head's FLOPs)."""
    return F.cross_entropy(logits.float(), labels)


def masked_patch_kl_loss(predicted: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """KL(softmax(original) || softmax(predicted)) over the feature dimension, mean over the masked patches.

    (N, D) each, gathered at the masked patches of aligned pairs (the paper's MPM target).
    """
    target_log_p = F.log_softmax(original.float(), dim=-1)
    pred_log_p = F.log_softmax(predicted.float(), dim=-1)
    kl = (target_log_p.exp() * (target_log_p - pred_log_p)).sum(dim=-1)
    return kl.mean()


def alignment_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """TIA: 2-way cross-entropy, label 1 = the text and the image belong to the same product."""
    return F.cross_entropy(logits.float(), labels)


def pairwise_alignment_loss(logits: torch.Tensor, positive_rows: torch.Tensor, negative_rows: torch.Tensor
                            ) -> torch.Tensor:
    """TIA as ranking: mean over pairs of -log softmax([margin of the positive row, margin of its negative])[0],
    margin = aligned logit - misaligned logit. Each pair shares a text or an image (a mined negative and the
    positive it was mined for), so only their order counts, not the margins' level. A batch without pairs gives a
    zero that still touches the logits (every parameter takes part in the backward; DDP requires it)."""
    if len(positive_rows) == 0:
        return logits.float().sum() * 0.0
    margins = logits.float()[:, 1] - logits.float()[:, 0]
    return F.softplus(margins[negative_rows] - margins[positive_rows]).mean()


def _pool_rows(batch_rows: torch.Tensor, bank: MiningBank | None, field: str, index: torch.Tensor) -> torch.Tensor:
    """Rows `index` of the mining pool's `field`: the (gathered) batch's rows first, then the bank's. Only the rows
    asked for are copied (the bank's patches are ~170 MB at 1,024 rows)."""
    n = batch_rows.shape[0]
    if bank is None or not bool((index >= n).any()):
        return batch_rows[index]
    out = batch_rows.new_empty((len(index),) + tuple(batch_rows.shape[1:]))
    in_batch = index < n
    out[in_batch] = batch_rows[index[in_batch]]
    out[~in_batch] = bank[field][(index[~in_batch] - n).cpu()].to(device=out.device, dtype=out.dtype)
    return out


def _with_bank_rows(below: torch.Tensor, rows: torch.Tensor, encode) -> tuple[torch.Tensor, torch.Tensor]:
    """The late-fusion shortcut's states with the mining bank's rows among `rows` (indices past the batch's) encoded
    by `encode(bank indices)` and appended -> (states, rows pointing at them)."""
    batch_rows = below.shape[0]
    banked = rows >= batch_rows
    if not bool(banked.any()):
        return below, rows
    picked = (rows[banked] - batch_rows).cpu()
    rows = rows.clone()
    rows[banked] = batch_rows + torch.arange(len(picked), device=rows.device)
    return torch.cat([below, encode(picked).to(below.dtype)]), rows


# ----------------------------------------------------------------------------------------------- modules
class FashionBertPatchEmbeddings(nn.Module):
    """Patch features -> hidden: Linear + learned patch position table + segment 1, then LayerNorm."""

    def __init__(self, config: FashionBertConfig, bert_config):
        super().__init__()
        self.projection = nn.Linear(config.feature_dim, bert_config.hidden_size)
        self.position_embeddings = nn.Embedding(config.num_patches, bert_config.hidden_size)
        self.LayerNorm = nn.LayerNorm(bert_config.hidden_size, eps=bert_config.layer_norm_eps)
        self.dropout = nn.Dropout(bert_config.hidden_dropout_prob)

    def forward(self, patch_features: torch.Tensor, segment_embedding: torch.Tensor) -> torch.Tensor:
        # segment_embedding is the backbone's token_type row 1, shared with BERT's segment table so that the
        # pretrained "second segment" meaning carries over.
        x = self.projection(patch_features) + self.position_embeddings.weight.unsqueeze(0) + segment_embedding
        return self.dropout(self.LayerNorm(x))


class FashionBertMLMHead(nn.Module):
    """BertLMPredictionHead with the decoder weight tied to the word embeddings.

    The tie is made by passing the embedding matrix in at call time: one Parameter, so the optimizer,
    DDP and safetensors (which refuses shared storage) all see it exactly once.
    """

    def __init__(self, bert_config):
        super().__init__()
        self.transform = BertPredictionHeadTransform(bert_config)
        self.bias = nn.Parameter(torch.zeros(bert_config.vocab_size))

    def forward(self, hidden_states: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        return F.linear(self.transform(hidden_states), word_embeddings, self.bias)


class FashionBertMPMHead(nn.Module):
    """Hidden -> CNN feature dim, to regress the (softmax-normalised) features of masked patches."""

    def __init__(self, config: FashionBertConfig, bert_config):
        super().__init__()
        self.transform = BertPredictionHeadTransform(bert_config)
        self.decoder = nn.Linear(bert_config.hidden_size, config.feature_dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden_states))


class FashionBertTokenAgreement(nn.Module):
    """The "tokens" TIA head's agreement: FILIP's token-wise late interaction on the joint pass's output. Each text
    token and each patch is projected (projections of its own, trained by the TIA loss alone) and L2-normalised;
    every text token takes its best-matching patch and every patch its best-matching text token, and the agreement
    is the mean of the two averages of those maxima (padding excluded), a similarity in [-1, 1].

    Why not the halves' cosine: that one pools each side to one vector and projects it with the itc head's own
    projections, so the TIA head learned the itc cosine again (per-query correlation 0.99 on hm-dev) and the
    re-rank had nothing to add. Word-to-region maxima see what a pooled vector averages away (a colour word and
    the patches of that colour), and the projections answer to the matching loss only."""

    def __init__(self, hidden_size: int, dim: int):
        super().__init__()
        self.text_proj = nn.Linear(hidden_size, dim)
        self.patch_proj = nn.Linear(hidden_size, dim)

    def forward(self, text_states: torch.Tensor, text_mask: torch.Tensor, patch_states: torch.Tensor) -> torch.Tensor:
        """(B, T, H) text and (B, P, H) patch states of one joint pass, (B, T) text mask -> (B,) float32."""
        text = F.normalize(self.text_proj(text_states).float(), dim=-1)
        patches = F.normalize(self.patch_proj(patch_states).float(), dim=-1)
        # float32 under autocast too: the maxima of bf16 cosines tie at ~3 digits, and ranking reads the margins
        with torch.autocast(device_type=text.device.type, enabled=False):
            sim = text @ patches.transpose(1, 2)  # (B, T, P)
        mask = text_mask.to(torch.bool)
        words = masked_mean(sim.max(dim=2).values.unsqueeze(-1), mask).squeeze(-1)
        regions = sim.masked_fill(~mask.unsqueeze(-1), -2.0).max(dim=1).values.mean(dim=1)
        return 0.5 * (words + regions)


class FashionBertTIAHead(nn.Module):
    """2-way text-image alignment classifier on BERT's pooled [CLS]. With `config.tia_pooling` "halves" the agreement
    of the joint pass's text and patch halves (`ContrastiveHead.agreement`, a cosine) joins the aligned logit, with
    "tokens" the token-wise agreement (`FashionBertTokenAgreement`, which this head owns); either times a learned
    scale (CLIP's parameterisation, starting at 1 / 0.07 like the itc temperature: the cosine's spread is small, and
    at the learning rate of a fine-tune a plain multiplier would barely move).

    With `config.tia_residual` the row's itc cosine joins the aligned logit too, less `residual_center` (a running
    mean of the training rows' cosines) and times a learned scale of the same kind. Why the centre: the cosines of
    trained itc vectors sit well above 0 for positives and negatives alike, so scaled they would add several logits
    to every row, and a bias learns that offset at ~lr per step (hundreds of steps); centred, the head starts at
    the cosine's ranking with a calibrated 0.5 between its rows."""

    MAX_SCALE = 100.0
    CENTER_MOMENTUM = 0.9

    def __init__(self, config: FashionBertConfig, bert_config):
        super().__init__()
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(bert_config.hidden_size, 2)
        if config.tia_pooling == "tokens":
            self.token_agreement = FashionBertTokenAgreement(bert_config.hidden_size, config.tia_token_dim)
        if config.tia_pooling in ("halves", "tokens"):
            self.agreement_scale = nn.Parameter(torch.tensor(math.log(1.0 / 0.07)))
        if config.tia_residual:
            self.residual_scale = nn.Parameter(torch.tensor(math.log(1.0 / 0.07)))
            # [running mean, training batches seen] (the count only tells the first batch, which sets the mean)
            self.register_buffer("residual_center", torch.zeros(2))

    def residual(self, cosine: torch.Tensor) -> torch.Tensor:
        """The residual's share of the aligned logit for (B,) itc cosines (no gradient reaches them); in training
        mode the batch's mean first updates the running centre."""
        cosine = cosine.detach().float()
        if self.training and len(cosine):
            with torch.no_grad():
                total = torch.stack([cosine.sum(), torch.tensor(float(len(cosine)), device=cosine.device)])
                if world_size() > 1:  # every process's rows: the processes keep one centre
                    dist.all_reduce(total)
                mean, seen = total[0] / total[1], self.residual_center[1]
                momentum = self.CENTER_MOMENTUM if float(seen) > 0 else 0.0
                self.residual_center.copy_(torch.stack([momentum * self.residual_center[0].float()
                                                        + (1.0 - momentum) * mean, seen.float() + 1.0]))
        scale = self.residual_scale.float().exp().clamp(max=self.MAX_SCALE)
        return scale * (cosine - self.residual_center[0].float())

    def forward(self, pooled: torch.Tensor, agreement: torch.Tensor | None = None,
                residual_cosine: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.classifier(self.dropout(pooled))
        aligned = None
        if agreement is not None:
            aligned = self.agreement_scale.exp().clamp(max=self.MAX_SCALE) * agreement
        if residual_cosine is not None:
            residual = self.residual(residual_cosine)
            aligned = residual if aligned is None else aligned + residual
        if aligned is None:
            return logits
        return logits.float() + F.pad(aligned.unsqueeze(1), (1, 0))


@dataclasses.dataclass
class FashionBertOutput:
    losses: dict[str, torch.Tensor]
    tia_logits: torch.Tensor | None  # None: a step without the joint pass (forward's joint=False)
    sequence_output: torch.Tensor | None
    mined: int = 0  # TIA negatives mined from the itc similarity and added to the batch
    # The joint pass's rows (input_ids, attention_mask, patch_features) with the mined negatives appended, and the
    # itc vectors (text, image) of the aligned rows: what a distilled student is fed and matched against.
    joint_inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    itc_vectors: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclasses.dataclass
class ContrastiveState:
    """The itc task's vectors of a batch's aligned rows, this process's and (under DDP) everybody's, with the
    text codes (rows of one text share a code), the product group codes and the head's logit scale: what mining
    reads."""
    text_vec: torch.Tensor
    image_vec: torch.Tensor
    all_text_vec: torch.Tensor
    all_image_vec: torch.Tensor
    codes: torch.Tensor
    all_codes: torch.Tensor
    groups: torch.Tensor
    all_groups: torch.Tensor
    scale: float
    # The itc passes' states entering the fusion layer (text (B, T, H), patches (B, P, H); under DDP every process's,
    # texts padded to max_text_len) when the joint pass takes its below-fusion states from them
    # (`FashionBertModel._shares_below_fusion`); else None.
    below_fusion: tuple[torch.Tensor, torch.Tensor] | None = None


class FashionBertModel(PreTrainedModel):
    config_class = FashionBertConfig
    TASKS = ("mlm", "mpm", "tia")

    def __init__(self, config: FashionBertConfig):
        super().__init__(config)
        config.validate()
        bert_config = config.bert_config()
        self.bert = BertModel(bert_config, add_pooling_layer=True)
        self.patch_embeddings = FashionBertPatchEmbeddings(config, bert_config)
        self.mlm_head = FashionBertMLMHead(bert_config)
        self.mpm_head = FashionBertMPMHead(config, bert_config)
        self.tia_head = FashionBertTIAHead(config, bert_config)
        if config.itc_dim:
            self.itc_head = ContrastiveHead(bert_config.hidden_size, config.itc_dim, config.itc_pooling)
        if config.recall_layers:
            # The joint encoder's config (attention implementation included) with its own depth.
            recall_config = copy.deepcopy(self.bert.config)
            recall_config.num_hidden_layers = int(config.recall_layers)
            self.recall_encoder = BertEncoder(recall_config)
        if config.own_fusion_layers:
            # Built on the backbone's own config object, so switching its attention implementation (eager for the
            # attention maps) switches these layers too. Declared last: the modules above draw their initial weights
            # as they always have.
            self.fusion_layers = nn.ModuleList(
                BertLayer(self.bert.config, layer_idx=i)
                for i in range(int(config.fusion_layer), int(bert_config.num_hidden_layers)))
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # BertPreTrainedModel's scheme, for the modules FashionBERT adds (`bert` initialises its own). post_init
        # reaches them in the order they are declared, so the same seed draws the same weights as it always has.
        std = float(self.config.bert.get("initializer_range", 0.02))
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @contextlib.contextmanager
    def attention(self, implementation: str | None):
        """Every encoder layer on transformers' attention `implementation` ("sdpa", "eager") for the block, restored
        afterwards; None leaves it as it is. A runtime choice, like precision: the saved config does not hold it.
        The fusion layers share the backbone's config object, so they switch with it; a recall encoder has a config
        of its own. `run_layers` builds each call's masks from the backbone's config, so they follow."""
        encoder = getattr(self, "recall_encoder", None)
        before = self.bert.config._attn_implementation, encoder.config._attn_implementation if encoder is not None else None
        if implementation is not None:
            self.bert.set_attn_implementation(implementation)
            if encoder is not None:
                encoder.config._attn_implementation = implementation
        try:
            yield
        finally:
            self.bert.set_attn_implementation(before[0])
            if encoder is not None:
                encoder.config._attn_implementation = before[1]

    @property
    def tasks(self) -> tuple[str, ...]:
        """The training tasks this model has heads for, in the order losses and weights are logged."""
        return self.TASKS + (("itc",) if getattr(self, "itc_head", None) is not None else ())

    # ---------------------------------------------------------------------------------- construction
    @classmethod
    def from_pretrained_backbone(cls, config: FashionBertConfig) -> "FashionBertModel":
        """Encoder (and pooler, and MLM head where the folder has one, as bert-base-uncased does) from a
        pretrained BERT folder; patch embeddings, MPM and TIA heads freshly initialised.

        Fills `config.bert` and the special token ids from the backbone folder.
        """
        from fashionbert.model.backbone import load_tokenizer, resolve_backbone

        path = resolve_backbone(config.backbone)
        try:
            with quiet_transformers():
                bert = BertModel.from_pretrained(str(path), local_files_only=True, add_pooling_layer=True)
        except (OSError, ValueError) as exc:
            raise UserError(f"backbone {path}: cannot load BERT weights ({exc}); the folder needs config.json and "
                            f"model.safetensors or pytorch_model.bin") from exc
        tokenizer = load_tokenizer(config.backbone)
        bert_dict = bert.config.to_dict()
        for k in ("_name_or_path", "architectures", "transformers_version", "torch_dtype", "dtype", "_attn_implementation_autoset"):
            bert_dict.pop(k, None)
        if config.dropout is not None:
            bert_dict["hidden_dropout_prob"] = bert_dict["attention_probs_dropout_prob"] = float(config.dropout)
        config.bert = bert_dict
        config.pad_token_id = int(tokenizer.pad_token_id)
        config.cls_token_id = int(tokenizer.cls_token_id)
        config.sep_token_id = int(tokenizer.sep_token_id)
        config.mask_token_id = int(tokenizer.mask_token_id)
        model = cls(config)
        model.bert.load_state_dict(bert.state_dict())
        if config.own_fusion_layers:
            for own, pretrained in zip(model.fusion_layers, model.bert.encoder.layer[int(config.fusion_layer):]):
                own.load_state_dict(pretrained.state_dict())
        model._load_pretrained_mlm_head(path)
        return model

    def _load_pretrained_mlm_head(self, path: Path) -> bool:
        """Copy `cls.predictions.*` (BertForPreTraining / BertForMaskedLM layout) if the folder has it."""
        state = _read_backbone_state(path, prefix="cls.predictions.")
        if not state:
            return False
        mapping = {k: "transform." + k[len("cls.predictions.transform."):] for k in state if k.startswith("cls.predictions.transform.")}
        own = {}
        for src, dst in mapping.items():
            own[dst] = state[src]
        if "cls.predictions.bias" in state:
            own["bias"] = state["cls.predictions.bias"]
        missing = set(self.mlm_head.state_dict()) - set(own)
        if missing:
            return False
        self.mlm_head.load_state_dict(own)
        return True

    @classmethod
    def from_checkpoint(cls, folder: str | os.PathLike, map_location: str | torch.device = "cpu") -> "FashionBertModel":
        """A model saved by `save` (OUT/model or a training checkpoint), in eval mode on `map_location`. Reads only
        JSON and safetensors: nothing is unpickled. A weights file holding an itc head whose config.json predates
        `itc_dim` gets the head it was saved with."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(folder)
        config = FashionBertConfig.load(folder)
        weights = folder / WEIGHTS_NAME
        if not weights.is_file():
            raise UserError(f"{folder}: no {WEIGHTS_NAME}; not a complete FashionBERT model folder (use OUT/model of "
                            f"a finished `fashionbert train`)")
        try:
            state = load_file(str(weights), device=str(map_location))
        except (SafetensorError, OSError) as exc:
            raise UserError(f"{folder}: cannot read {WEIGHTS_NAME} ({exc}); the file is damaged or was cut short while "
                            f"copying: copy the model folder again or re-export it with `fashionbert train`") from None
        model = cls(config)
        if any(k.startswith(ITC_PREFIX) for k in state) and getattr(model, "itc_head", None) is None:
            model.itc_head = ContrastiveHead.from_state_dict(state)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise UserError(f"{weights}: weights do not match config.json (missing {missing[:5]}, unexpected "
                            f"{unexpected[:5]}); re-export the model with `fashionbert train`")
        return model.to(map_location).eval()

    def save(self, folder: str | os.PathLike) -> None:
        """model.safetensors + config.json: `save_pretrained` without its progress bar (training saves every
        checkpoint this way). The MLM decoder is tied at call time, so no tensor is shared and safetensors stores
        each once."""
        with quiet_transformers():
            self.save_pretrained(folder)

    # ---------------------------------------------------------------------------------- forward
    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, H): word + text position + segment 0, LayerNorm (the backbone's module)."""
        return self.bert.embeddings(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids))

    def embed_patches(self, patch_features: torch.Tensor, patch_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, P, D) features -> (B, P, H). `patch_mask` (B, P) bool: patches zeroed first (MPM)."""
        if patch_features.shape[1:] != (self.config.num_patches, self.config.feature_dim):
            raise ValueError(
                f"patch_features shape {tuple(patch_features.shape)}, expected (B, {self.config.num_patches}, "
                f"{self.config.feature_dim})"
            )
        patch_features = patch_features.to(self.patch_embeddings.projection.weight.dtype)
        if patch_mask is not None:
            patch_features = patch_features.masked_fill(patch_mask.unsqueeze(-1), 0.0)
        return self.patch_embeddings(patch_features, self.bert.embeddings.token_type_embeddings.weight[1])

    def encode_embeddings(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The shared encoder on a sequence of embeddings -> (B, L, H); `attention_mask` (B, L) 1 = attend,
        None = every position."""
        if attention_mask is None:
            return self.bert.encoder(hidden).last_hidden_state
        extended = create_bidirectional_mask(config=self.bert.config, inputs_embeds=hidden,
                                             attention_mask=attention_mask.to(torch.long))
        return self.bert.encoder(hidden, attention_mask=extended).last_hidden_state

    def encode_unimodal(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """A text-only or image-only sequence through the recall encoder (`config.recall_layers`), or through the
        joint encoder where the model has none; mask as `encode_embeddings`."""
        encoder = getattr(self, "recall_encoder", None)
        if encoder is None:
            return self.encode_embeddings(hidden, attention_mask)
        return self.run_layers(hidden, attention_mask, encoder.layer)

    def run_layers(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None, layers) -> torch.Tensor:
        """Some of the encoder's layers (a slice of `bert.encoder.layer`) on (B, L, H); mask as `encode_embeddings`."""
        extended = None if attention_mask is None else create_bidirectional_mask(
            config=self.bert.config, inputs_embeds=hidden, attention_mask=attention_mask.to(torch.long))
        for layer in layers:
            hidden = layer(hidden, extended)
        return hidden

    def encode_text_below_fusion(self, text_embeds: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """A text's states entering the fusion layer: the first `config.fusion_layer` layers on the text alone (the
        embeddings themselves when the fusion starts at the first layer). They depend on the text alone, so a scorer
        computes them once per text, not once per pair."""
        fusion = int(self.config.fusion_layer)
        return self.run_layers(text_embeds, text_mask, self.bert.encoder.layer[:fusion]) if fusion else text_embeds

    def encode_patches_below_fusion(self, patch_embeds: torch.Tensor) -> torch.Tensor:
        """`encode_text_below_fusion` for an image's patch embeddings (once per image)."""
        fusion = int(self.config.fusion_layer)
        return self.run_layers(patch_embeds, None, self.bert.encoder.layer[:fusion]) if fusion else patch_embeds

    def joint_top_layers(self):
        """The layers the joint pass runs from `config.fusion_layer` up: its own (`config.own_fusion_layers`) or the
        backbone's, which the text-only and image-only passes also run."""
        own = getattr(self, "fusion_layers", None)
        return own if own is not None else self.bert.encoder.layer[int(self.config.fusion_layer):]

    def fuse(self, text_states: torch.Tensor, text_mask: torch.Tensor,
             patch_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layers from `config.fusion_layer` up on `[text | patches]` -> (sequence_output, pooled)."""
        if self.config.detach_fusion_input:
            text_states, patch_states = text_states.detach(), patch_states.detach()
        hidden = torch.cat([text_states, patch_states.to(text_states.dtype)], dim=1)
        mask = torch.cat([text_mask.to(torch.long), text_mask.new_ones(patch_states.shape[:2], dtype=torch.long)],
                         dim=1)
        mask = self.fusion_keys(mask)
        fusion = int(self.config.fusion_layer)
        if fusion:
            sequence_output = self.run_layers(hidden, mask, self.joint_top_layers())
        else:
            sequence_output = self.encode_embeddings(hidden, mask)
        return sequence_output, self.bert.pooler(sequence_output)

    def fusion_keys(self, mask: torch.Tensor) -> torch.Tensor:
        """The joint pass's attention mask (B, T+P), 1 = attend, with `config.fusion_token_drop`'s share of each
        row's positions hidden while training; [CLS] (position 0) is always kept: the pooled head reads it. The draw
        uses the global generator, which training seeds per step, so a resumed run hides the same tokens."""
        p = float(self.config.fusion_token_drop)
        if not self.training or p <= 0.0:
            return mask
        keep = torch.rand(mask.shape, device=mask.device) >= p
        keep[:, 0] = True
        return mask * keep

    def encode_joint(self, text_embeds: torch.Tensor, text_mask: torch.Tensor,
                     patch_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cross-encoder pass on `[CLS] text [SEP] patches`: (B, T, H) text and (B, P, H) patch embeddings,
        (B, T) text mask -> (sequence_output (B, T+P, H), pooled (B, H)). Patches are never padding. With
        `config.fusion_layer` k > 0 the first k layers encode the text and the patches apart, the rest together."""
        text_states = self.encode_text_below_fusion(text_embeds, text_mask)
        return self.fuse(text_states, text_mask, self.encode_patches_below_fusion(patch_embeds.to(text_states.dtype)))

    def joint_layer_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, patch_features: torch.Tensor
                           ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """`encode`'s joint pass (no MPM mask) with every encoder layer's output kept -> ([(B, T+P, H) per layer],
        sequence_output, pooled). Below the fusion layer a layer's output is its text and patch states side by side.
        What a distilled student's layers are matched against, layer for layer."""
        text = self.embed_text(input_ids)
        patches = self.embed_patches(patch_features).to(text.dtype)
        fusion = int(self.config.fusion_layer)
        states = []
        for layer in self.bert.encoder.layer[:fusion]:
            text = self.run_layers(text, attention_mask, [layer])
            patches = self.run_layers(patches, None, [layer])
            states.append(torch.cat([text, patches], dim=1))
        hidden = torch.cat([text, patches], dim=1)
        mask = torch.cat([attention_mask.to(torch.long), attention_mask.new_ones(patches.shape[:2], dtype=torch.long)],
                         dim=1)
        for layer in self.joint_top_layers():
            hidden = self.run_layers(hidden, mask, [layer])
            states.append(hidden)
        return states, hidden, self.bert.pooler(hidden)

    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        patch_features: torch.Tensor,
        patch_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (sequence_output (B, T+P, H), pooled (B, H)). `patch_mask` (B, P) bool: patches zeroed (MPM)."""
        text = self.embed_text(input_ids)  # before the patches: dropout draws in the order it always has
        return self.encode_joint(text, attention_mask, self.embed_patches(patch_features, patch_mask))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text-only pass: the text tokens alone through the encoder (the recall encoder where the model has one)
        -> (B, T, H)."""
        return self.encode_unimodal(self.embed_text(input_ids), attention_mask)

    def encode_image(self, patch_features: torch.Tensor, with_cls: bool = False) -> torch.Tensor:
        """Image-only pass: the patch embeddings alone (segment 1, own position table) -> (B, P, H), or (B, 1+P, H)
        with the [CLS] token embedding in front when the caller pools on [CLS] (an image has no token of its own
        whose job is to summarise it)."""
        patches = self.embed_patches(patch_features)
        if with_cls:
            cls_ids = torch.full((patches.shape[0], 1), int(self.config.cls_token_id), dtype=torch.long,
                                 device=patches.device)
            cls = self.embed_text(cls_ids)
            patches = torch.cat([cls, patches.to(cls.dtype)], dim=1)
        return self.encode_unimodal(patches)

    def alignment_logits(self, sequence_output: torch.Tensor, text_mask: torch.Tensor, pooled: torch.Tensor,
                         residual_cosine: torch.Tensor | None = None) -> torch.Tensor:
        """TIA logits (B, 2) of a joint pass (`encode`'s outputs and the text mask it ran with). A model with
        `config.tia_residual` needs each row's itc cosine (`residual_cosine`, (B,); `row_cosines` computes it for
        rows that have no recall vectors at hand)."""
        if self.config.tia_residual and residual_cosine is None:
            raise ValueError("this model's TIA logit adds each row's itc cosine (config.tia_residual): pass "
                             "residual_cosine (FashionBertModel.row_cosines computes it)")
        residual = residual_cosine if self.config.tia_residual else None
        if self.config.tia_pooling == "cls":
            return self.tia_head(pooled, residual_cosine=residual)
        text_len = text_mask.shape[1]
        text, patches = sequence_output[:, :text_len], sequence_output[:, text_len:]
        if self.config.tia_pooling == "tokens":
            return self.tia_head(pooled, self.tia_head.token_agreement(text, text_mask, patches), residual)
        return self.tia_head(pooled, self.itc_head.agreement(text, text_mask, patches), residual)

    def tia_margin(self, sequence_output: torch.Tensor, text_mask: torch.Tensor, pooled: torch.Tensor,
                   residual_cosine: torch.Tensor | None = None) -> torch.Tensor:
        """The TIA logit margin l1 - l0 (float32): it ranks like P(aligned) = sigmoid(margin) but does not
        saturate into ties at P ~ 1. `residual_cosine` as `alignment_logits`."""
        logits = self.alignment_logits(sequence_output, text_mask, pooled, residual_cosine).float()
        return logits[:, 1] - logits[:, 0]

    @torch.no_grad()
    def row_cosines(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    patch_features: torch.Tensor) -> torch.Tensor:
        """(B,) float32 itc cosine of each row's text and image: two single-modality passes per row, so callers that
        score many pairs of few items embed each item once instead (`rank.cross_encoder`)."""
        text_vec, image_vec = self.itc_head(self, input_ids, attention_mask, patch_features)
        return (text_vec * image_vec).sum(dim=-1)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        patch_features: torch.Tensor,
        patch_mask: torch.Tensor | None = None,
        mlm_labels: torch.Tensor | None = None,
        tia_labels: torch.Tensor | None = None,
        itc: bool = True,
        groups: torch.Tensor | None = None,
        mining: MiningRequest | None = None,
        itc_queue: EmbeddingQueue | None = None,
        joint: bool = True,
        mining_bank: MiningBank | None = None,
    ) -> FashionBertOutput:
        """Per-task losses for the tasks whose labels are given.

        input_ids/attention_mask (B, T) with [CLS] ... [SEP] and padding; patch_features (B, P, D);
        patch_mask (B, P) bool, the patches to zero and reconstruct (MPM); mlm_labels (B, T), the original id
        at masked tokens and -100 elsewhere; tia_labels (B,) 1 = aligned. MLM and MPM count only aligned rows
        when tia_labels is given (the text does not describe a mismatched image, so reconstructing one from the
        other is noise); the caller masks every row alike so that TIA cannot read "is it masked" as a label.
        With an itc head and `itc`, the contrastive loss on the aligned rows joins as "itc" (two more encoder
        passes, text-only and image-only, on those rows; under DDP over every process's rows). `groups` (one per
        aligned row) are the products' group codes: rows of one group are not each other's negatives. `mining` adds
        TIA negatives drawn from the itc similarity (model/hard_negatives.py) to the rows of the joint pass;
        `itc_queue` adds its vectors as contrastive negatives and then takes this batch's; `mining_bank` adds its
        rows to the pool `mining` draws from and then takes this batch's positives. `joint=False` runs the itc
        task alone (training's --itc-warmup steps): no joint pass, so no TIA, MLM or MPM loss and no mined rows.
        """
        if not joint:
            return self._contrastive_only(input_ids, attention_mask, patch_features, tia_labels, mlm_labels, itc,
                                          groups, mining, itc_queue)
        itc_loss, state = None, None
        if itc and getattr(self, "itc_head", None) is not None:
            share = self._shares_below_fusion(tia_labels, patch_mask, mlm_labels)
            itc_loss, state = self._contrastive(input_ids, attention_mask, patch_features, tia_labels, mlm_labels,
                                                groups, itc_queue, keep_below_fusion=share)
        elif itc_queue is not None:
            raise ValueError("an itc queue needs the itc head (itc_dim > 0) and itc=True")
        mined, mined_sources, anchor_rows, bank_rows = 0, None, None, None
        residual_cosine = (self._batch_row_cosines(state, input_ids, attention_mask, patch_features, mlm_labels,
                                                   tia_labels) if self.config.tia_residual else None)
        if mining is not None:
            if state is None:
                raise ValueError("mining TIA negatives needs the itc head (itc_dim > 0) and itc=True")
            rows, mined_sources, anchor_rows, bank_rows = self._mined_rows(
                mining, state, input_ids, attention_mask, patch_features, patch_mask, mlm_labels, tia_labels,
                mining_bank)
            if residual_cosine is not None:
                text_rows, image_rows = mined_sources
                text_pool, image_pool = self._mining_pool(state, mining_bank)
                residual_cosine = torch.cat([residual_cosine, (text_pool[text_rows] * image_pool[image_rows]).sum(-1)])
            mined = int(rows[0].shape[0]) - int(input_ids.shape[0])
            input_ids, attention_mask, patch_features, patch_mask, mlm_labels, tia_labels = rows
        if state is not None and state.below_fusion is not None:
            sequence_output, pooled = self._fuse_shared(state.below_fusion, attention_mask, mined_sources, mining_bank)
        else:
            sequence_output, pooled = self.encode(input_ids, attention_mask, patch_features, patch_mask)
        if bank_rows is not None:  # the mined rows have read the bank: now it takes this batch's positives
            mining_bank.push(**bank_rows)
        text_len = input_ids.shape[1]
        aligned = tia_labels.bool() if tia_labels is not None else None
        losses: dict[str, torch.Tensor] = {}
        if mlm_labels is not None:
            select = mlm_labels != IGNORE_INDEX
            if aligned is not None:
                select = select & aligned.unsqueeze(1)
            losses["mlm"] = self._gathered_loss(
                sequence_output[:, :text_len], select,
                lambda h: self.mlm_head(h, self.bert.embeddings.word_embeddings.weight),
                lambda out, sel: masked_lm_loss(out, mlm_labels[sel]),
            )
        if patch_mask is not None:
            select = patch_mask.bool()
            if aligned is not None:
                select = select & aligned.unsqueeze(1)
            losses["mpm"] = self._gathered_loss(
                sequence_output[:, text_len:], select, self.mpm_head,
                lambda out, sel: masked_patch_kl_loss(out, patch_features[sel]),
            )
        tia_logits = self.alignment_logits(sequence_output, attention_mask, pooled, residual_cosine)
        if tia_labels is not None:
            losses["tia"] = self._tia_loss(tia_logits, tia_labels, anchor_rows)
        if itc_loss is not None:
            losses["itc"] = itc_loss
        return FashionBertOutput(losses=losses, tia_logits=tia_logits, sequence_output=sequence_output, mined=mined,
                                 joint_inputs=(input_ids, attention_mask, patch_features),
                                 itc_vectors=(state.text_vec, state.image_vec) if state is not None else None)

    def _contrastive_only(self, input_ids, attention_mask, patch_features, tia_labels, mlm_labels, itc, groups,
                          mining, itc_queue) -> FashionBertOutput:
        if not itc or getattr(self, "itc_head", None) is None:
            raise ValueError("a step without the joint pass trains the itc task alone: it needs the itc head "
                             "(itc_dim > 0) and itc=True")
        if mining is not None:
            raise ValueError("mined TIA negatives are rows of the joint pass, which joint=False skips")
        itc_loss, state = self._contrastive(input_ids, attention_mask, patch_features, tia_labels, mlm_labels, groups,
                                            itc_queue)
        return FashionBertOutput(losses={"itc": itc_loss}, tia_logits=None, sequence_output=None,
                                 itc_vectors=(state.text_vec, state.image_vec) if state is not None else None)

    def _tia_loss(self, tia_logits: torch.Tensor, tia_labels: torch.Tensor, anchor_rows: torch.Tensor | None
                  ) -> torch.Tensor:
        """`config.tia_loss` over the joint pass's rows; the mined rows are the last len(anchor_rows), each paired
        with the positive row it was mined for."""
        if self.config.tia_loss == "binary":
            return alignment_loss(tia_logits, tia_labels.long())
        if anchor_rows is None:
            anchor_rows = torch.zeros(0, dtype=torch.long, device=tia_logits.device)
        negative_rows = torch.arange(len(anchor_rows), device=tia_logits.device) + (len(tia_logits) - len(anchor_rows))
        pairwise = pairwise_alignment_loss(tia_logits, anchor_rows, negative_rows)
        if self.config.tia_loss == "pairwise":
            return pairwise
        return alignment_loss(tia_logits, tia_labels.long()) + pairwise

    def _batch_row_cosines(self, state: ContrastiveState | None, input_ids, attention_mask, patch_features,
                           mlm_labels, tia_labels) -> torch.Tensor:
        """(B,) itc cosine of each row of a training batch, for the residual TIA logit: the aligned rows' from the
        itc task's vectors (`state`), the others' (the loader's negatives) from single-modality passes on their
        clean texts, as the recall stage computes them."""
        rows, device = input_ids.shape[0], input_ids.device
        if state is None:  # no itc pass this time: every row from its own passes
            aligned = torch.zeros(rows, dtype=torch.bool, device=device)
        else:  # the rows the itc task embedded (itc_inputs' choice: every row when no labels are given)
            aligned = tia_labels.bool() if tia_labels is not None else torch.ones(rows, dtype=torch.bool, device=device)
        out = torch.empty(rows, dtype=torch.float32, device=device)
        if bool(aligned.any()):
            out[aligned] = (state.text_vec.detach() * state.image_vec.detach()).sum(-1)
        if not bool(aligned.all()):
            others = ~aligned
            ids, mask, feats = itc_inputs(input_ids[others], attention_mask[others], patch_features[others], None,
                                          None if mlm_labels is None else mlm_labels[others])
            out[others] = self.row_cosines(ids, mask, feats).float()
        return out

    def _shares_below_fusion(self, tia_labels, patch_mask, mlm_labels) -> bool:
        """Whether the joint pass can take its states below the fusion layer from the itc passes instead of computing
        them again: with late fusion those layers see the text alone and the patches alone, exactly as the itc
        passes do, so on a clean batch (no MLM/MPM masks) whose rows are all aligned pairs -- the mined negatives
        recombine their texts and images -- the joint pass needs only the layers from the fusion up (about half of
        it). The gradient is the same: both losses reach the shared states. Not with a recall encoder or [CLS]
        pooling (the itc passes then differ from the joint pass's halves). Under DDP a mined partner's states live on
        another process: they are gathered with their gradient, and the processes decide together (one that shared
        alone would wait in that gather forever)."""
        share = (int(self.config.fusion_layer) > 0 and getattr(self, "recall_encoder", None) is None
                 and self.itc_head.pooling == "mean" and patch_mask is None and mlm_labels is None
                 and tia_labels is not None and bool(tia_labels.bool().all()))
        if world_size() == 1:
            return share
        flag = torch.tensor([int(share)], device=tia_labels.device if tia_labels is not None else None)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def _fuse_shared(self, below_fusion: tuple[torch.Tensor, torch.Tensor], attention_mask: torch.Tensor,
                     mined_sources: tuple[torch.Tensor, torch.Tensor] | None, bank: MiningBank | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """The joint pass from the itc passes' below-fusion states: the batch's aligned rows in order, then each mined
        row's text and image (`_mined_rows`' sources, rows of the gathered batch under DDP, then of the mining bank,
        whose sides are encoded up to the fusion layer here) -> `fuse`'s outputs."""
        text_below, patch_below = below_fusion
        rows = attention_mask.shape[0] - (len(mined_sources[0]) if mined_sources is not None else 0)
        text_rows = image_rows = torch.arange(rows, device=text_below.device) + rank_offset(rows)
        if mined_sources is not None:
            text_rows, image_rows = torch.cat([text_rows, mined_sources[0]]), torch.cat([image_rows, mined_sources[1]])
        # The itc passes ran on texts trimmed to their longest (padded to max_text_len under DDP); the joint rows have
        # their own width. Either way the positions added or cut are padding, which attention masks.
        width = attention_mask.shape[1]
        text_below = F.pad(text_below, (0, 0, 0, width - text_below.shape[1])) if width >= text_below.shape[1] \
            else text_below[:, :width]
        if bank is not None:
            device = text_below.device
            text_below, text_rows = _with_bank_rows(text_below, text_rows, lambda picked: self.encode_text_below_fusion(
                self.embed_text(bank["clean_ids"][picked][:, :width].to(device)),
                bank["mask"][picked][:, :width].to(device)))
            patch_below, image_rows = _with_bank_rows(patch_below, image_rows, lambda picked: (
                self.encode_patches_below_fusion(self.embed_patches(bank["feats"][picked].to(device)))))
        # index_select, not indexing: rows repeat (a positive's text is also its mined row's), and the backward of
        # indexing (index_put_ with accumulate) sums the repeats in a thread-dependent order on a CPU, which made
        # two runs of one joint step differ in the last bits (so --resume was not bitwise); index_select's backward
        # (index_add_) sums them in order.
        return self.fuse(torch.index_select(text_below, 0, text_rows), attention_mask,
                         torch.index_select(patch_below, 0, image_rows))

    def _itc_vectors(self, head: ContrastiveHead, ids, mask, feats, keep_below_fusion: bool):
        """-> (text vectors, image vectors, the passes' states entering the fusion layer or None)."""
        if not keep_below_fusion:
            return *head(self, ids, mask, feats), None
        text_below = self.encode_text_below_fusion(self.embed_text(ids), mask)
        patch_below = self.encode_patches_below_fusion(self.embed_patches(feats))
        top = self.bert.encoder.layer[int(self.config.fusion_layer):]
        return (head.pool_text(self.run_layers(text_below, mask, top), mask),
                head.pool_image(self.run_layers(patch_below, None, top)), (text_below, patch_below))

    def _contrastive(self, input_ids, attention_mask, patch_features, tia_labels, mlm_labels, groups=None,
                     queue: EmbeddingQueue | None = None, keep_below_fusion: bool = False
                     ) -> tuple[torch.Tensor, ContrastiveState | None]:
        """The itc loss on the aligned rows, and their vectors for mining (and with `keep_below_fusion` the states
        the joint pass reuses). Under DDP every process's vectors are gathered (with their gradient), so each text
        meets world x batch images as negatives; a queue adds its own and then takes the (gathered) batch's."""
        head: ContrastiveHead = self.itc_head
        ids, mask, feats = itc_inputs(input_ids, attention_mask, patch_features, tia_labels, mlm_labels)
        if ids.shape[0] == 0:
            return unused_head_zero(head), None
        if groups is None:  # no product groups given: each row its own
            groups = torch.arange(ids.shape[0], device=ids.device) + rank_offset(ids.shape[0])
        if len(groups) != ids.shape[0]:
            raise ValueError(f"{len(groups)} group codes for {ids.shape[0]} aligned rows")
        text_vec, image_vec, below_fusion = self._itc_vectors(head, ids, mask, feats, keep_below_fusion)
        scale = head.scale()
        if world_size() == 1:
            codes = text_groups(ids, mask)
            state = ContrastiveState(text_vec, image_vec, text_vec, image_vec, codes, codes, groups, groups,
                                     float(scale.detach()), below_fusion)
            loss = contrastive_loss(text_vec, image_vec, scale, codes, queue=queue, product_groups=groups)
        else:
            all_text_vec, all_image_vec = gather_with_grad(text_vec), gather_with_grad(image_vec)
            if below_fusion is not None:
                text_below, patch_below = below_fusion
                text_below = F.pad(text_below, (0, 0, 0, int(self.config.max_text_len) - text_below.shape[1]))
                below_fusion = gather_with_grad(text_below), gather_with_grad(patch_below)
            all_ids = gather(self._pad_to_max_len(ids * mask))
            all_codes = text_groups(all_ids, torch.ones_like(all_ids))
            offset = rank_offset(ids.shape[0])
            codes = all_codes[offset:offset + ids.shape[0]]
            state = ContrastiveState(text_vec, image_vec, all_text_vec, all_image_vec, codes, all_codes, groups,
                                     gather(groups), float(scale.detach()), below_fusion)
            loss = contrastive_loss(text_vec, image_vec, scale, codes, all_text_vec, all_image_vec, all_codes, offset,
                                    queue=queue, product_groups=groups)
        if queue is not None:
            queue.push(state.all_text_vec, state.all_image_vec, state.all_groups)
        return loss, state

    def _pad_to_max_len(self, ids: torch.Tensor, value: int = 0) -> torch.Tensor:
        """Texts right-padded to config.max_text_len, so that every process's rows have one shape to gather."""
        width = int(self.config.max_text_len)
        if ids.shape[1] > width:
            raise ValueError(f"texts of {ids.shape[1]} tokens exceed the model's max_text_len {width}")
        return F.pad(ids, (0, width - ids.shape[1]), value=value)

    @staticmethod
    def _mining_pool(state: ContrastiveState, bank: MiningBank | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The itc vectors (text, image; float32, detached) of every candidate a mined row may take a side from: the
        (gathered) batch's positives, then the bank's rows."""
        text, image = state.all_text_vec.detach().float(), state.all_image_vec.detach().float()
        if bank is None or not len(bank):
            return text, image
        return (torch.cat([text, bank["text_vec"].to(text.device)]),
                torch.cat([image, bank["image_vec"].to(image.device)]))

    def _mined_rows(self, request: MiningRequest, state: ContrastiveState, input_ids, attention_mask, patch_features,
                    patch_mask, mlm_labels, tia_labels, bank: MiningBank | None = None) -> tuple:
        """The batch's tensors with the mined negative rows appended (label 0, no MLM target), each mined row's
        text and image as rows of the pool (the (gathered) aligned rows, then the bank's), the batch row of the
        positive it was mined for, and the rows the bank is to take (None without a bank). A mined row keeps its
        anchor's masked text or masked patches and takes the other side from the partner the draw chose."""
        # Row copying only: autocast's dtype promotion refuses float16 features in torch.cat on CPU.
        with torch.autocast(device_type=patch_features.device.type, enabled=False):
            return self._append_mined_rows(request, state, input_ids, attention_mask, patch_features, patch_mask,
                                           mlm_labels, tia_labels, bank)

    def _append_mined_rows(self, request, state, input_ids, attention_mask, patch_features, patch_mask, mlm_labels,
                           tia_labels, bank: MiningBank | None = None) -> tuple:
        positives = torch.nonzero(tia_labels.bool()).squeeze(1)
        excluded = (state.groups.unsqueeze(1) == state.all_groups.unsqueeze(0)) | \
                   (state.codes.unsqueeze(1) == state.all_codes.unsqueeze(0))
        pmask = patch_mask if patch_mask is not None else torch.zeros(patch_features.shape[:2], dtype=torch.bool,
                                                                      device=patch_features.device)
        ids, mask = input_ids[positives], attention_mask[positives]
        feats, pm = patch_features[positives], pmask[positives]
        if world_size() > 1 or bank is not None:  # one width for every process's rows and the bank's
            ids, mask = self._pad_to_max_len(ids, int(self.config.pad_token_id)), self._pad_to_max_len(mask)
        clean = None  # the texts with MLM's masks put back, padding 0: the bank compares and stores them
        if bank is not None:
            labels = None if mlm_labels is None else self._pad_to_max_len(mlm_labels[positives], IGNORE_INDEX)
            clean = (ids if labels is None else torch.where(labels != IGNORE_INDEX, labels, ids)) * mask
        if world_size() > 1:
            all_ids, all_mask, all_feats, all_pm = gather(ids), gather(mask), gather(feats), gather(pm)
            all_clean = gather(clean) if bank is not None else None
        else:
            all_ids, all_mask, all_feats, all_pm, all_clean = ids, mask, feats, pm, clean
        text_pool, image_pool = self._mining_pool(state, bank)
        if bank is not None and len(bank):
            device = ids.device
            same_text = (clean.unsqueeze(1) == bank["clean_ids"].to(device).unsqueeze(0)).all(dim=2)
            excluded = torch.cat([excluded, (state.groups.unsqueeze(1) == bank["groups"].to(device).unsqueeze(0))
                                  | same_text], dim=1)
        scale = 1.0 / request.temperature if request.temperature > 0 else state.scale
        anchors, swap_image, partner = mine(request, state.text_vec, state.image_vec, text_pool, image_pool, excluded,
                                            scale)
        # What the bank takes once the joint pass has read it (forward): this batch's positives, never its own pool
        bank_rows = None if bank is None else dict(
            ids=all_ids, mask=all_mask, clean_ids=all_clean, feats=all_feats, patch_mask=all_pm,
            text_vec=state.all_text_vec, image_vec=state.all_image_vec, groups=state.all_groups)
        keep_text = swap_image.unsqueeze(1)
        new_ids = torch.where(keep_text, ids[anchors], _pool_rows(all_ids, bank, "ids", partner))
        new_mask = torch.where(keep_text, mask[anchors], _pool_rows(all_mask, bank, "mask", partner))
        new_feats = torch.where(swap_image.view(-1, 1, 1), _pool_rows(all_feats, bank, "feats", partner),
                                feats[anchors])
        new_pm = torch.where(keep_text, _pool_rows(all_pm, bank, "patch_mask", partner), pm[anchors])
        width = max(int(input_ids.shape[1]), int(new_mask.sum(dim=1).max()) if len(new_mask) else 0)
        pad = int(self.config.pad_token_id)
        input_ids = torch.cat([F.pad(input_ids, (0, width - input_ids.shape[1]), value=pad), new_ids[:, :width]])
        attention_mask = torch.cat([F.pad(attention_mask, (0, width - attention_mask.shape[1])), new_mask[:, :width]])
        patch_features = torch.cat([patch_features, new_feats.to(patch_features.dtype)])
        if patch_mask is not None:
            patch_mask = torch.cat([patch_mask, new_pm.to(patch_mask.dtype)])
        if mlm_labels is not None:
            mlm_labels = torch.cat([F.pad(mlm_labels, (0, width - mlm_labels.shape[1]), value=IGNORE_INDEX),
                                    torch.full_like(new_ids[:, :width], IGNORE_INDEX)])
        tia_labels = torch.cat([tia_labels, torch.zeros_like(anchors).to(tia_labels.dtype)])
        local = anchors + rank_offset(len(positives))
        sources = torch.where(swap_image, local, partner), torch.where(swap_image, partner, local)
        return ((input_ids, attention_mask, patch_features, patch_mask, mlm_labels, tia_labels), sources,
                positives[anchors], bank_rows)

    @staticmethod
    def _gathered_loss(states, select, head, loss_fn) -> torch.Tensor:
        if bool(select.any()):
            return loss_fn(head(states[select]), select)
        # No masked position in this batch: a zero that still touches the head, so every parameter takes part in
        # the backward (DDP requires it) and the zero is honest.
        return head(states[:1, 0]).float().sum() * 0.0

    @torch.no_grad()
    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, patch_features: torch.Tensor) -> torch.Tensor:
        """The TIA head's P(aligned) for each (text, image) row. Call `.eval()` first (`from_checkpoint` returns the
        model in eval mode); wrap in autocast for bf16. The product ranks by this fused with the itc cosine
        (`rank.cross_encoder.PairScorer`, fashionbert/model/score_fusion.py) when the model folder has a score_fusion.json."""
        sequence_output, pooled = self.encode(input_ids, attention_mask, patch_features)
        residual = self.row_cosines(input_ids, attention_mask, patch_features) if self.config.tia_residual else None
        return torch.softmax(self.alignment_logits(sequence_output, attention_mask, pooled, residual).float(),
                             dim=-1)[:, 1]


def _read_backbone_state(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Tensors whose names start with `prefix` from a BERT folder's safetensors or pytorch_model.bin
    (the latter with weights_only=True: never arbitrary unpickling)."""
    st = path / "model.safetensors"
    if st.is_file():
        from safetensors import safe_open

        with safe_open(str(st), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    binary = path / "pytorch_model.bin"
    if binary.is_file():
        state = torch.load(str(binary), map_location="cpu", weights_only=True)
        return {k: v for k, v in state.items() if k.startswith(prefix)}
    return {}

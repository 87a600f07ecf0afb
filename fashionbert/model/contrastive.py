"""Dual (one-modality-at-a-time) embeddings for the recall stage, and the in-batch contrastive task "itc".

Why: the cross-encoder must see a text and an image together, so it cannot index a catalog (100k x 100k
pairs). The same backbone run on one modality at a time can: the model's text-only pass (`encode_text`:
[CLS] text [SEP], segment 0) and image-only pass (`encode_image`: the patch embeddings alone, segment 1) each
give one vector per item, projection
heads map both into one space, and a nearest-neighbour index ranks candidates by cosine. Trained with a
symmetric in-batch InfoNCE loss, a batch of B aligned pairs gives B^2 scored pairs for 2B single-modality
passes, which is also a cheap extra training signal for the shared encoder.

Integration with training: `fashionbert train --itc-dim D` (default 256) makes the model build a head here as
`model.itc_head` (config.itc_dim / itc_pooling), so its weights sit in the model's state dict (`itc_head.*` in
model.safetensors) and travel with every checkpoint; `FashionBertModel.forward` adds `itc_loss` as the fourth
task, weighted with the other three by the same adaptive loss. `FashionBertModel.from_checkpoint` also attaches
a head to a loaded model whose weights file has one but whose config predates `itc_dim`. A model without a head
(`--itc-dim 0`) still gives recall vectors (`DualEncoder` then mean-pools the backbone's hidden states,
unprojected): usable, but untrained for the purpose.

Imports torch and the model config only (the model itself is passed in): training runs on boxes without faiss
or Beam.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fashionbert.model.config import IGNORE_INDEX

POOLINGS = ("mean", "cls")
ITC_PREFIX = "itc_head."


# ----------------------------------------------------------------------------------------------- pooling
def masked_mean(states: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return states.float().mean(dim=1)
    m = mask.to(torch.float32).unsqueeze(-1)
    return (states.float() * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


# ----------------------------------------------------------------------------------------------- head
class ContrastiveHead(nn.Module):
    """Projections of pooled text-only / image-only states into a shared `dim`-d space, plus the learnable
    temperature of the InfoNCE loss (CLIP's parameterisation: logit scale = exp(t), capped at 100 so that it
    cannot grow until the softmax saturates)."""

    MAX_SCALE = 100.0

    def __init__(self, hidden_size: int, dim: int = 256, pooling: str = "mean", temperature: float = 0.07):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling {pooling!r}; choose one of {POOLINGS}")
        self.text_proj = nn.Linear(hidden_size, dim)
        self.image_proj = nn.Linear(hidden_size, dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))
        # A persistent buffer, so the pooling a head was trained with is saved in the weights file with it
        # (config.json is the training engineer's schema and drops keys it does not know).
        self.register_buffer("pooling_code", torch.tensor(POOLINGS.index(pooling), dtype=torch.long))

    @property
    def pooling(self) -> str:
        return POOLINGS[int(self.pooling_code)]

    @property
    def dim(self) -> int:
        return int(self.text_proj.out_features)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=self.MAX_SCALE)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], prefix: str = ITC_PREFIX) -> "ContrastiveHead":
        """A head shaped like the saved one (the projections' shapes give hidden size and dim)."""
        weight = state[prefix + "text_proj.weight"]
        code = state.get(prefix + "pooling_code")
        pooling = POOLINGS[int(code)] if code is not None else "mean"
        head = cls(int(weight.shape[1]), int(weight.shape[0]), pooling)
        head.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        return head

    def project_text(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(pooled.to(self.text_proj.weight.dtype)).float(), dim=-1)

    def project_image(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(pooled.to(self.image_proj.weight.dtype)).float(), dim=-1)

    def pool_text(self, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """A text-only pass's states (B, T, H) -> its vectors (B, dim)."""
        return self.project_text(states[:, 0].float() if self.pooling == "cls" else masked_mean(states, attention_mask))

    def pool_image(self, states: torch.Tensor) -> torch.Tensor:
        """An image-only pass's states -> its vectors (B, dim)."""
        return self.project_image(states[:, 0].float() if self.pooling == "cls" else masked_mean(states, None))

    def embed_text(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.pool_text(model.encode_text(input_ids, attention_mask), attention_mask)

    def embed_image(self, model, patch_features: torch.Tensor) -> torch.Tensor:
        return self.pool_image(model.encode_image(patch_features, with_cls=self.pooling == "cls"))

    def agreement(self, text_states: torch.Tensor, text_mask: torch.Tensor, patch_states: torch.Tensor) -> torch.Tensor:
        """Cosine (B,) float32 between the two halves of a joint pass, each mean-pooled (the patches have no [CLS] of
        their own there) and projected as the single-modality vectors are: the "halves" TIA head's input."""
        return (self.project_text(masked_mean(text_states, text_mask))
                * self.project_image(masked_mean(patch_states, None))).sum(dim=-1)

    def forward(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                patch_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (text vectors (B, dim), image vectors (B, dim)), L2-normalised, float32."""
        return self.embed_text(model, input_ids, attention_mask), self.embed_image(model, patch_features)


# ----------------------------------------------------------------------------------------------- loss
class EmbeddingQueue:
    """The itc vectors of the last `size` positives of training, detached, with their group codes: contrastive
    negatives beyond one batch (MoCo / ALBEF keep such a queue; without their momentum encoder, as a memory bank of
    the live encoder's recent outputs). The newest come first. Not a module: it is training state, saved with each
    checkpoint (`state_dict`), never with the model."""

    def __init__(self, size: int, dim: int):
        self.size = int(size)
        self.text = torch.zeros(0, dim)
        self.image = torch.zeros(0, dim)
        self.groups = torch.zeros(0, dtype=torch.long)

    def __len__(self) -> int:
        return int(self.text.shape[0])

    def push(self, text_vec: torch.Tensor, image_vec: torch.Tensor, groups: torch.Tensor) -> None:
        # New tensors, not writes into the old ones: the batch that read the queue still needs them for its backward.
        self.text = torch.cat([text_vec.detach().float(), self.text.to(text_vec.device)])[: self.size]
        self.image = torch.cat([image_vec.detach().float(), self.image.to(image_vec.device)])[: self.size]
        self.groups = torch.cat([groups.detach().long(), self.groups.to(groups.device)])[: self.size]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"text": self.text.cpu(), "image": self.image.cpu(), "groups": self.groups.cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.text, self.image, self.groups = state["text"].float(), state["image"].float(), state["groups"].long()


def contrastive_loss(text_vec: torch.Tensor, image_vec: torch.Tensor, scale: torch.Tensor | float,
                     groups: torch.Tensor | None = None, all_text_vec: torch.Tensor | None = None,
                     all_image_vec: torch.Tensor | None = None, all_groups: torch.Tensor | None = None,
                     offset: int = 0, queue: EmbeddingQueue | None = None,
                     product_groups: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric in-batch InfoNCE: row i's text and image are the positive pair, every other row's image
    (text) a negative for its text (image); the mean of the text->image and image->text cross-entropies.

    `groups` (B,) marks rows of one product (two images sharing a text): those are not negatives of each
    other, since telling them apart is not the task and would push a product's images away from its text.

    Under DDP, `all_*` are every process's rows gathered (this process's rows start at `offset`): each process's
    rows then meet every process's rows as negatives, and DDP's gradient average gives the loss over the gathered
    batch. A `queue` adds its vectors as negatives of every row, except those of the row's own product group
    (`product_groups`, one per row).
    """
    scale = scale.float() if torch.is_tensor(scale) else float(scale)
    all_text_vec = text_vec if all_text_vec is None else all_text_vec
    all_image_vec = image_vec if all_image_vec is None else all_image_vec
    t2i = scale * (text_vec.float() @ all_image_vec.float().t())
    i2t = scale * (image_vec.float() @ all_text_vec.float().t())
    labels = torch.arange(text_vec.shape[0], device=t2i.device) + offset
    if groups is not None:
        all_groups = groups if all_groups is None else all_groups
        same = groups.unsqueeze(1) == all_groups.unsqueeze(0)
        same[torch.arange(len(labels), device=same.device), labels] = False
        t2i, i2t = t2i.masked_fill(same, float("-inf")), i2t.masked_fill(same, float("-inf"))
    if queue is not None and len(queue):
        own = product_groups.unsqueeze(1) == queue.groups.to(product_groups.device).unsqueeze(0)
        t2i = torch.cat([t2i, (scale * (text_vec.float() @ queue.image.to(t2i.device).t())).masked_fill(own, float("-inf"))], 1)
        i2t = torch.cat([i2t, (scale * (image_vec.float() @ queue.text.to(i2t.device).t())).masked_fill(own, float("-inf"))], 1)
    return 0.5 * (F.cross_entropy(t2i, labels) + F.cross_entropy(i2t, labels))


def itc_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor, patch_features: torch.Tensor,
               tia_labels: torch.Tensor | None = None, mlm_labels: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows the "itc" task trains on, from a training batch (the tensors `FashionBertModel.forward` takes):
    the aligned rows only (tia_labels == 1; TIA negatives are not pairs), with MLM-masked tokens put back (the
    recall embedding is computed on clean text at indexing time), trimmed to their longest text, and the original
    patch features (MPM zeroes patches inside `encode`, not in the batch tensor). -> (ids, mask, features)."""
    rows = tia_labels.bool() if tia_labels is not None else torch.ones(input_ids.shape[0], dtype=torch.bool,
                                                                       device=input_ids.device)
    ids = input_ids if mlm_labels is None else torch.where(mlm_labels != IGNORE_INDEX, mlm_labels, input_ids)
    ids, mask, feats = ids[rows], attention_mask[rows], patch_features[rows]
    length = int(mask.sum(dim=1).max()) if len(ids) else 0
    return ids[:, :length], mask[:, :length], feats


def text_groups(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) codes equal for rows with the same text."""
    _, groups = torch.unique(ids * mask, dim=0, return_inverse=True)
    return groups


def unused_head_zero(head: nn.Module) -> torch.Tensor:
    """A zero that still touches every head parameter (DDP needs all of them in the backward)."""
    return sum(p.sum() for p in head.parameters()) * 0.0


def itc_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, patch_features: torch.Tensor,
             tia_labels: torch.Tensor | None = None, mlm_labels: torch.Tensor | None = None) -> torch.Tensor:
    """The "itc" task on one process's training batch (see `itc_inputs` for the rows it uses)."""
    head: ContrastiveHead = model.itc_head
    ids, mask, feats = itc_inputs(input_ids, attention_mask, patch_features, tia_labels, mlm_labels)
    if ids.shape[0] == 0:
        return unused_head_zero(head)
    text_vec, image_vec = head(model, ids, mask, feats)
    return contrastive_loss(text_vec, image_vec, head.scale(), text_groups(ids, mask))

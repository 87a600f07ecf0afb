"""TIA negatives mined from the contrastive similarity (ALBEF's hard negatives for image-text matching).

Why: a TIA negative drawn at random, or from the same sub-category, is usually told apart by the itc embeddings
already, so the cross-encoder learns nothing the cheap embeddings cannot do, and re-ranking their top-k by it
lowers Rank@1. ALBEF (Li et al. 2021) draws each text's negative image from the batch with probability
softmax(similarity / temperature) under the contrastive head, and likewise each image's negative text: the
negatives are the pairs the embeddings confuse, which is what a re-ranker is for. Early in training the
similarity is near uniform, so the draws start as random negatives and harden as itc learns.

A mined row keeps one side of a positive pair (its text with masked tokens, or its image with masked patches) and
takes the other side from another positive of the batch, never of the same group (a product's other colours
share its group; with `train --group-negatives` the batch's codes are products, and those colours may be drawn) nor
with the same text. Under DDP the candidates are the positives of every process: their
inputs are gathered (no gradient; the joint pass embeds them again here) and the draw sees the gathered
similarity. The draw uses its own generator, seeded per batch, so a resumed run draws the same negatives.

With `similarity="corrected"` the draw reads the similarity the product ranks by rather than the raw cosine: each
candidate's log-sum-exp over the pool's queries is taken off its logits (a dual softmax, the in-batch form of the
catalog-level hubness correction, fashionbert/rank/hubness.py). Why: the raw softmax spends most draws on hubs --
candidates close to every query -- which the corrected cosine already ranks down, so TIA learns what the correction
knows; the corrected draw favours the pairs the corrected cosine still confuses. Measured on hm-dev (README, "Mining
by the corrected similarity"): no gain over the raw draw, from the batch alone (where a candidate's log-sum-exp is
mostly its own positive's cosine) or over a 1,024-positive mining bank (a catalog-sized pool).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist


@dataclasses.dataclass
class MiningRequest:
    """Which positives of a batch get a mined negative, and how the draw is seeded.

    `anchors` index the batch's positive rows in order (0 = the first row with tia_label 1); `swap_image[m]` True
    means anchor m keeps its text and gets a mined image, False that it keeps its image and gets a mined text.
    (Which candidates are excluded comes from the batch's group codes, `FashionBertModel.forward(groups=...)`.)"""

    anchors: torch.Tensor  # (M,) long
    swap_image: torch.Tensor  # (M,) bool
    seed: int
    temperature: float = 0.0  # of the softmax over cosines; 0 = the itc head's learned temperature
    similarity: str = "cosine"  # what the softmax reads: "cosine", or "corrected" (less each candidate's hubness)

    def to(self, device: torch.device) -> "MiningRequest":
        return dataclasses.replace(self, anchors=self.anchors.to(device), swap_image=self.swap_image.to(device))


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Every process's `tensor` concatenated along dim 0, in rank order (no gradient); itself on one process."""
    if world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """`gather`, with the gradient flowing back to each process's own rows (for the contrastive loss over the
    gathered batch)."""
    if world_size() == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor.contiguous()))


def rank_offset(rows: int) -> int:
    """Where this process's rows start in a gathered tensor of `rows` per process."""
    return dist.get_rank() * rows if world_size() > 1 else 0


SIMILARITIES = ("cosine", "corrected")


def negative_probabilities(similarity: torch.Tensor, excluded: torch.Tensor, scale: float,
                           hubness: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(scale x similarity - hubness) over each row's allowed candidates (float64); a row with none is all
    zeros. `hubness` (per candidate, (N,) or one row per anchor (M, N)) is one side of `pool_hubness`, or None for
    the raw cosine."""
    logits = similarity.double() * scale
    if hubness is not None:
        logits = logits - hubness.double()
    logits = logits.masked_fill(excluded, float("-inf"))
    has_any = (~excluded).any(dim=1, keepdim=True)
    probs = torch.softmax(logits.masked_fill(~has_any, 0.0), dim=1)
    return torch.where(has_any, probs, torch.zeros_like(probs))


def pool_hubness(texts: torch.Tensor, images: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(each image's, each text's) log-sum-exp of scale x cosine over the pool's other side: how strongly the pool's
    queries claim a candidate. Every query counts, the candidate's own positive too, as the catalog-level correction
    counts a candidate's nearest queries whatever they are. One product serves both sides."""
    logits = scale * (texts.double() @ images.double().t())
    return torch.logsumexp(logits, dim=0), torch.logsumexp(logits, dim=1)


def draw(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One candidate per row of `probs` (CPU), -1 for a row with no candidate."""
    usable = probs.sum(dim=1) > 0
    out = torch.full((probs.shape[0],), -1, dtype=torch.long)
    if bool(usable.any()):
        out[usable] = torch.multinomial(probs[usable], 1, generator=generator).squeeze(1)
    return out


def mine(request: MiningRequest, text_vec: torch.Tensor, image_vec: torch.Tensor, all_text_vec: torch.Tensor,
         all_image_vec: torch.Tensor, excluded: torch.Tensor, scale: float
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (anchors that got a negative (M',), their `swap_image`, the partner of each: an index into the gathered
    positives). An anchor every candidate of which is excluded gets none.

    text_vec / image_vec (B, d) are this process's positives, all_* (W*B, d) the gathered ones; `excluded` (B, W*B)
    marks the candidates no anchor may draw (same group, same text). The similarity is detached: mining chooses
    rows, the losses on those rows train the model. With `request.similarity == "corrected"` each candidate's
    hubness over the pool's queries (the gathered texts for an image, the gathered images for a text) is taken off
    its logits."""
    if request.similarity not in SIMILARITIES:
        raise ValueError(f"MiningRequest.similarity {request.similarity!r}: one of {SIMILARITIES}")
    with torch.no_grad():
        t2i = text_vec.detach().float() @ all_image_vec.detach().float().t()
        i2t = image_vec.detach().float() @ all_text_vec.detach().float().t()
        anchors, swap = request.anchors.cpu(), request.swap_image.cpu()
        similarity = torch.where(swap.unsqueeze(1), t2i.cpu()[anchors], i2t.cpu()[anchors])
        hubness = None
        if request.similarity == "corrected":
            image_hubs, text_hubs = pool_hubness(all_text_vec.detach().cpu(), all_image_vec.detach().cpu(), scale)
            hubness = torch.where(swap.unsqueeze(1), image_hubs.unsqueeze(0), text_hubs.unsqueeze(0))
        probs = negative_probabilities(similarity, excluded.cpu()[anchors], scale, hubness)
        generator = torch.Generator().manual_seed(int(request.seed))
        partner = draw(probs, generator)
    device = request.anchors.device
    kept = (partner >= 0).to(device)
    return request.anchors[kept], request.swap_image[kept], partner.to(device)[kept]


class MiningBank:
    """The last `size` training positives of the joint steps (a ring): the inputs a mined row takes one side
    from (texts as the batch held them, padded to max_text_len, with their clean ids; patch features and their MPM
    mask) and the itc vectors they had then. Mined negatives are drawn from the batch's positives and these.

    Why: by the joint steps the itc loss is near 0.05 -- inside a batch of 32 the cosine already ranks almost every
    positive first, so in-batch mined negatives are pairs the cosine gets right, and the TIA head learns the cosine
    again (per-query correlation 0.98-0.99 on hm-dev). Over a pool of a thousand products the cosine's own
    confusions (the held-out queries' 100 candidates of one sub-category are that) are there to be drawn. The
    vectors are stale by up to size / batch steps; they only choose rows (MoCo's memory bank, without its momentum
    encoder). Not a module: training state, saved with each checkpoint, never with the model; under DDP every
    process pushes the gathered positives, so the processes hold one bank. Memory ~ size x (patches x feature_dim x
    2 bytes), ~165 KB an entry for 64 patches of 1,286 values."""

    FIELDS = ("ids", "mask", "clean_ids", "feats", "patch_mask", "text_vec", "image_vec", "groups")

    def __init__(self, size: int):
        self.size = int(size)
        # A ring: the buffers are allocated by the first push and overwritten in place (copying ~170 MB of patches
        # each step to keep them in order would cost ~10% of a step); `filled` rows are valid, `next` is written next.
        self.buffers: dict[str, torch.Tensor] = {}
        self.filled = self.next = 0

    def __len__(self) -> int:
        return self.filled

    def __getitem__(self, name: str) -> torch.Tensor:
        """The valid rows of one field (a view)."""
        return self.buffers[name][: self.filled]

    def push(self, **rows: torch.Tensor) -> None:
        """Store rows (every field of FIELDS, one row per positive; on the CPU, detached) over the oldest."""
        if set(rows) != set(self.FIELDS):
            raise ValueError(f"MiningBank.push takes {self.FIELDS}, got {sorted(rows)}")
        n = min(int(rows["ids"].shape[0]), self.size)
        if not self.buffers:
            self.buffers = {k: torch.zeros((self.size,) + tuple(v.shape[1:]),
                                           dtype=torch.float32 if k.endswith("_vec") else v.dtype)
                            for k, v in rows.items()}
        slots = (self.next + torch.arange(n)) % self.size
        for name, value in rows.items():
            self.buffers[name][slots] = value[-n:].detach().cpu().to(self.buffers[name].dtype)
        self.next = (self.next + n) % self.size
        self.filled = min(self.size, self.filled + n)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**{k: self[k].clone() for k in self.buffers}, "next": torch.tensor(self.next)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.buffers, self.filled, self.next = {}, 0, 0
        if not state or "ids" not in state:
            return
        filled = int(state["ids"].shape[0])
        self.buffers = {k: torch.zeros((self.size,) + tuple(state[k].shape[1:]), dtype=state[k].dtype)
                        for k in self.FIELDS}
        for k in self.FIELDS:
            self.buffers[k][:filled] = state[k]
        self.filled, self.next = filled, int(state["next"])

"""Token -> patch attention of the joint pass: which of the 64 patches a text's words look at.

What a map is (`token_patch_attention`), for one (text, image) pair of the joint pass `[CLS] text [SEP] | patches`:
- A layer's attention matrix is its softmax attention, averaged over heads: row i is how query position i spreads
  its attention over the sequence's positions (padding gets none), so each row sums to 1.
- `method="last"`: the last encoder layer's matrix A. `method="rollout"` (Abnar & Zuidema 2020; the default):
  per layer 0.5 A + 0.5 I (the residual connection), rows renormalised, multiplied from the first layer up; row i then
  says how much position i's final state draws on each input embedding, through every layer. On hm-dev the last
  layer's maps sit mostly on background patches and its most image-attending tokens are stopwords (attention sinks),
  while rollout's follow the product words (README, `explain`). In a late-fusion model
  (`config.fusion_layer` k) the first k layers see the text and the patches apart: their matrices are block-diagonal
  (text x text, patches x patches), so text reaches the patches only through the layers from k up, and the rollout
  still counts what each patch state gathered from the other patches below k.
- Rows: the text's word tokens (its real WordPiece tokens, without [CLS], [SEP] and padding). Columns: the patches,
  row-major over the grid x grid image (patch 0 top left, patch grid-1 top right).
- `image_mass[t]`: the fraction of token t's attention (row) that lands on patches at all, in [0, 1]: the words
  with the most are the ones that "look at the image" (what the report highlights).
- `token_maps[t]`: token t's attention over the patches, renormalised so that it sums to 1.
- `patch_map`: the text's attention to each patch summed over its word tokens, divided by the sum over all patches
  (= the `image_mass`-weighted mean of the token maps): it sums to 1, and a word that barely looks at the image
  moves it barely.

Caveat: attention says where the model gathered information from, not why it scored the pair as it did (attention is
not attribution); the [CLS] state the TIA head reads is left out of the rows.

Attention weights need transformers' "eager" attention (sdpa computes them without returning them): the model's
backbone is switched to eager for the call and back afterwards, and forward hooks on the self-attention modules take
each layer's weights. The pass is the model's own pieces (`encode_text_below_fusion`, `encode_patches_below_fusion`,
`fuse`), as the cross-encoder scorer runs them, so the maps belong to the scores it gives.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from fashionbert.model.modeling import FashionBertModel

METHODS = ("rollout", "last")


@dataclasses.dataclass
class TokenPatchAttention:
    """Maps of a batch of B pairs (see the module docstring for what each holds)."""

    token_positions: list[np.ndarray]  # per pair: the word tokens' positions in its input_ids row (n_b,)
    token_maps: list[np.ndarray]  # per pair: (n_b, P) float32, each row sums to 1
    image_mass: list[np.ndarray]  # per pair: (n_b,) float32 in [0, 1]
    patch_map: np.ndarray  # (B, P) float32, each row sums to 1
    margin: np.ndarray  # (B,) float32 TIA logit margin of the same pass


class _AttentionRecorder:
    """Forward hooks on every layer's self-attention: each call appends its head-averaged weights (B, L, L) float32."""

    def __init__(self, model: FashionBertModel):
        self.calls: list[torch.Tensor] = []
        layers = list(model.bert.encoder.layer) + list(getattr(model, "fusion_layers", None) or [])
        self.handles = [layer.attention.self.register_forward_hook(self._hook) for layer in layers]

    def _hook(self, module, args, output) -> None:
        weights = output[1]
        if weights is None:
            raise RuntimeError("self-attention returned no weights: the backbone is not on eager attention")
        self.calls.append(weights.float().mean(dim=1))

    def take(self) -> list[torch.Tensor]:
        calls, self.calls = self.calls, []
        return calls

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _block_diagonal(text: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """(B, T, T) and (B, P, P) -> (B, T+P, T+P): a below-fusion layer, where the two sides do not meet."""
    b, t, p = text.shape[0], text.shape[1], patches.shape[1]
    out = text.new_zeros((b, t + p, t + p))
    out[:, :t, :t] = text
    out[:, t:, t:] = patches
    return out


def _rollout(layers: list[torch.Tensor]) -> torch.Tensor:
    eye = torch.eye(layers[0].shape[-1], device=layers[0].device)
    rolled = None
    for a in layers:
        a = 0.5 * a + 0.5 * eye
        a = a / a.sum(dim=-1, keepdim=True)
        rolled = a if rolled is None else a @ rolled
    return rolled


@torch.inference_mode()
def token_patch_attention(model: FashionBertModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          patch_features: torch.Tensor, method: str = "rollout") -> TokenPatchAttention:
    """Maps for B pairs: input_ids/attention_mask (B, T) ([CLS] ... [SEP], right-padded), patch_features (B, P, D).
    The model should be in eval mode (dropout off), in the dtype it scores in (fp32 or bf16; the maps are computed in
    fp32 from its weights)."""
    if method not in METHODS:
        raise ValueError(f"method {method!r}: one of {METHODS}")
    m, cfg = model, model.config
    fusion = int(cfg.fusion_layer)
    with m.attention("eager"):  # sdpa computes the weights without returning them
        recorder = _AttentionRecorder(m)
        try:
            text = m.encode_text_below_fusion(m.embed_text(input_ids), attention_mask)
            text_layers = recorder.take()
            patches = m.encode_patches_below_fusion(m.embed_patches(patch_features).to(text.dtype))
            patch_layers = recorder.take()
            sequence_output, pooled = m.fuse(text, attention_mask, patches)
            joint_layers = recorder.take()
        finally:
            recorder.close()
    residual = m.row_cosines(input_ids, attention_mask, patch_features) if cfg.tia_residual else None
    margin = m.tia_margin(sequence_output, attention_mask, pooled, residual)
    if method == "last":
        attention = joint_layers[-1]
    else:
        below = [_block_diagonal(t, p) for t, p in zip(text_layers[:fusion], patch_layers[:fusion])]
        attention = _rollout(below + joint_layers)
    t_len = input_ids.shape[1]
    flow = attention[:, :t_len, t_len:]  # (B, T, P): text queries -> patch keys
    words = attention_mask.bool() & (input_ids != int(cfg.cls_token_id)) & (input_ids != int(cfg.sep_token_id))
    mass = flow.sum(dim=-1)
    token_maps = flow / mass.clamp_min(1e-30).unsqueeze(-1)
    weighted = (flow * words.unsqueeze(-1)).sum(dim=1)
    patch_map = weighted / weighted.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    words_np, maps_np, mass_np = words.cpu().numpy(), token_maps.cpu().numpy(), mass.cpu().numpy()
    positions = [np.flatnonzero(w) for w in words_np]
    return TokenPatchAttention(
        token_positions=positions,
        token_maps=[maps_np[b, pos].astype(np.float32) for b, pos in enumerate(positions)],
        image_mass=[mass_np[b, pos].astype(np.float32) for b, pos in enumerate(positions)],
        patch_map=patch_map.cpu().numpy().astype(np.float32),
        margin=margin.float().cpu().numpy(),
    )

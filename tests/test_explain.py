"""Token -> patch attention maps (fashionbert/model/attention.py): they sum as documented, come from the pass that
scores (same margins as the model's own encode), leave the backbone on its own attention implementation, and point at the
patch a constructed model makes decisive, for single-stream, late-fusion and "halves" models, in fp32 and bf16. The
stage and the report's heatmaps are tested in test_report.py (they share its trained model and image sources)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fashionbert.model.attention import METHODS, token_patch_attention
from fashionbert.model.config import FashionBertConfig
from fashionbert.model.modeling import FashionBertModel

torch.set_num_threads(1)
FEATURE_DIM = 16
DECISIVE = 37


def _model(backbone, **kw) -> FashionBertModel:
    cfg = FashionBertConfig(backbone=str(backbone), feature_dim=FEATURE_DIM, dropout=0.0, **kw)
    torch.manual_seed(0)
    return FashionBertModel.from_pretrained_backbone(cfg).eval()


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([[101, 2417, 3797, 2000, 102, 0, 0], [101, 2304, 3536, 12730, 2080, 2005, 102]])
    feats = torch.rand((2, 64, FEATURE_DIM), generator=g)
    return ids, (ids != 0).long(), feats


VARIANTS = {"single-stream": {}, "late-fusion": {"fusion_layer": 1}, "halves": {"itc_dim": 8, "tia_pooling": "halves"},
            "tokens": {"tia_pooling": "tokens", "tia_token_dim": 8},
            "own-fusion-layers": {"fusion_layer": 1, "own_fusion_layers": True}}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("method", METHODS)
def test_maps_sum_as_documented_and_belong_to_the_scored_pass(tiny_backbone, variant, method):
    model = _model(tiny_backbone, **VARIANTS[variant])
    ids, mask, feats = _inputs()
    before = model.bert.config._attn_implementation
    maps = token_patch_attention(model, ids, mask, feats, method)
    assert model.bert.config._attn_implementation == before  # switched to eager for the call only
    # rows: the word tokens, without [CLS], [SEP] and padding
    assert [p.tolist() for p in maps.token_positions] == [[1, 2, 3], [1, 2, 3, 4, 5]]
    for rows, mass, patch_map in zip(maps.token_maps, maps.image_mass, maps.patch_map):
        assert rows.shape == (len(mass), 64)
        np.testing.assert_allclose(rows.sum(axis=1), 1.0, atol=1e-5)
        assert np.all(mass > 0) and np.all(mass < 1)
        np.testing.assert_allclose(patch_map.sum(), 1.0, atol=1e-5)
        # the pair map is the image-mass-weighted mean of the token maps
        np.testing.assert_allclose(patch_map, (mass[:, None] * rows).sum(0) / mass.sum(), atol=1e-6)
    with torch.no_grad():
        seq, pooled = model.encode(ids, mask, feats)
        np.testing.assert_allclose(maps.margin, model.tia_margin(seq, mask, pooled).numpy(), atol=1e-5)


def _make_patch_decisive(model: FashionBertModel, feats: torch.Tensor) -> torch.Tensor:
    """Every layer's queries look for a large hidden component 0, and only the patch DECISIVE has one: its feature
    channel 0 alone projects onto hidden 0 (no position or segment part there), every query is a constant vector
    and every key reads hidden 0. Returns the features with channel 0 on at DECISIVE only."""
    with torch.no_grad():
        proj = model.patch_embeddings.projection
        proj.weight[:, 0] = 0.0
        proj.weight[0, :] = 0.0
        proj.weight[0, 0] = 60.0
        proj.bias[0] = 0.0
        model.patch_embeddings.position_embeddings.weight[:, 0] = 0.0
        model.bert.embeddings.token_type_embeddings.weight[1, 0] = 0.0
        for layer in model.bert.encoder.layer:
            att = layer.attention.self
            att.query.weight.zero_()
            att.query.bias.fill_(2.0)
            att.key.weight.zero_()
            att.key.bias.zero_()
            att.key.weight[:, 0] = 2.0
    feats = feats.clone()
    feats[:, :, 0] = 0.0
    feats[:, DECISIVE, 0] = 1.0
    return feats


@pytest.mark.parametrize("variant", ["single-stream", "late-fusion"])
@pytest.mark.parametrize("method", METHODS)
def test_the_map_points_at_the_decisive_patch(tiny_backbone, variant, method):
    model = _model(tiny_backbone, **VARIANTS[variant])
    ids, mask, feats = _inputs(1)
    untouched = token_patch_attention(model, ids, mask, feats, method)
    assert untouched.patch_map.max() < 0.2  # a random model spreads its attention
    feats = _make_patch_decisive(model, feats)
    maps = token_patch_attention(model, ids, mask, feats, method)
    assert maps.patch_map.argmax(axis=1).tolist() == [DECISIVE, DECISIVE]
    assert maps.patch_map[:, DECISIVE].min() > 0.5
    for rows in maps.token_maps:
        assert (rows.argmax(axis=1) == DECISIVE).all()


def test_bf16_model_gives_the_fp32_maps(tiny_backbone):
    model = _model(tiny_backbone)
    ids, mask, feats = _inputs(2)
    feats = _make_patch_decisive(model, feats)
    fp32 = token_patch_attention(model, ids, mask, feats, "rollout")
    bf16 = token_patch_attention(copy.deepcopy(model).to(torch.bfloat16), ids, mask, feats, "rollout")
    np.testing.assert_allclose(bf16.patch_map.sum(axis=1), 1.0, atol=1e-4)
    assert bf16.patch_map.argmax(axis=1).tolist() == [DECISIVE, DECISIVE]
    np.testing.assert_allclose(bf16.patch_map, fp32.patch_map, atol=0.03)


def test_unknown_method_is_refused(tiny_backbone):
    with pytest.raises(ValueError, match="method"):
        token_patch_attention(_model(tiny_backbone), *_inputs(), method="gradients")

"""`--fusion-token-drop P`: in training each joint-pass row hides a share P of its text tokens and patches from the
fusion layers' attention ([CLS] kept). The mask hides about P of the positions, never [CLS] or a padded one back into
view, and is the same under the same seed; a hidden token cannot reach the pooled verdict; the joint pass equals
the layers run by hand with that mask; eval mode (scoring) sees every token; training records the option, changes
the run, resumes bit for bit and refuses a mismatch or a share outside [0, 1); a distilled student does not inherit
it."""
from __future__ import annotations

import json
import math

import pytest
import torch

from fashionbert.errors import UserError
from fashionbert.model.config import FashionBertConfig
from fashionbert.model.modeling import FashionBertModel
from fashionbert.train import checkpoint as ckpt
from fashionbert.train.distill import build_student
from fashionbert.train.trainer import run
from tests.test_modeling import FEATURE_DIM, _inputs
from tests.test_train import _train_records, features, make_args, resumed_copy  # noqa: F401 (features: the module fixture)


def _model(backbone, drop: float, fusion_layer: int = 1) -> FashionBertModel:
    torch.manual_seed(0)
    return FashionBertModel.from_pretrained_backbone(FashionBertConfig(
        backbone=str(backbone), feature_dim=FEATURE_DIM, fusion_layer=fusion_layer, dropout=0.0, tia_pooling="cls",
        fusion_token_drop=drop))


def test_the_mask_hides_about_p_of_each_row_never_cls_and_never_unhides_padding(tiny_backbone):
    model = _model(tiny_backbone, 0.25).train()
    mask = torch.ones(500, 80, dtype=torch.long)
    mask[:, 60:70] = 0  # padding
    torch.manual_seed(3)
    keys = model.fusion_keys(mask)
    assert bool((keys[:, 0] == 1).all()) and bool((keys[:, 60:70] == 0).all())
    open_positions = torch.cat([keys[:, 1:60], keys[:, 70:]], dim=1)
    assert float(1 - open_positions.float().mean()) == pytest.approx(0.25, abs=0.01)
    torch.manual_seed(3)
    assert torch.equal(model.fusion_keys(mask), keys)
    assert torch.equal(model.eval().fusion_keys(mask), mask)
    assert torch.equal(_model(tiny_backbone, 0.0).train().fusion_keys(mask), mask)


def test_the_joint_pass_runs_the_fusion_layers_with_the_mask_and_eval_sees_every_token(tiny_backbone):
    dropping, plain = _model(tiny_backbone, 0.4), _model(tiny_backbone, 0.0)  # the same weights
    ids, attn, feats = _inputs(batch=3)
    attn[2, -2:] = 0
    with torch.no_grad():
        dropping.train()
        torch.manual_seed(5)
        seq, pooled = dropping.encode(ids, attn, feats)
        torch.manual_seed(5)
        keys = dropping.fusion_keys(torch.cat([attn, torch.ones(3, 64, dtype=torch.long)], dim=1))
        assert 0 < int((keys == 0).sum()) - 2 < keys.numel()
        text = plain.encode_text_below_fusion(plain.embed_text(ids), attn)
        patches = plain.encode_patches_below_fusion(plain.embed_patches(feats))
        expected = plain.run_layers(torch.cat([text, patches], dim=1), keys, plain.joint_top_layers())
        torch.testing.assert_close(seq, expected)
        torch.testing.assert_close(pooled, plain.bert.pooler(expected))
        dropping.eval()
        for a, b in zip(dropping.encode(ids, attn, feats), plain.eval().encode(ids, attn, feats)):
            assert torch.equal(a, b)


def test_a_hidden_token_cannot_reach_the_verdict(tiny_backbone):
    """With fusion from the first layer every layer runs with the mask: changing a hidden text token leaves the
    pooled [CLS] (what the TIA head reads) as it was; changing a visible one moves it."""
    model = _model(tiny_backbone, 0.5, fusion_layer=0).train()
    ids, attn, feats = _inputs(batch=1, text_len=12)
    torch.manual_seed(7)
    keys = model.fusion_keys(torch.cat([attn, torch.ones(1, 64, dtype=torch.long)], dim=1))[0, :12]
    hidden, visible = int((keys == 0).nonzero()[0]), int((keys[1:] == 1).nonzero()[0]) + 1

    def pooled(token_ids):
        torch.manual_seed(7)
        with torch.no_grad():
            return model.encode(token_ids, attn, feats)[1]

    base = pooled(ids)
    for position, moves in ((hidden, False), (visible, True)):
        changed = ids.clone()
        changed[0, position] = 2500 if int(ids[0, position]) != 2500 else 2501
        assert (not torch.allclose(pooled(changed), base, atol=1e-6)) == moves, position


def test_training_records_it_resumes_bitwise_and_refuses_a_mismatch(tmp_path, features, tiny_backbone):
    args = ("--steps", 4, "--checkpoint-every", 2, "--val-every", 0, "--matching-only", "--fusion-token-drop", 0.3)
    out = tmp_path / "drop"
    run(make_args(features, out, tiny_backbone, *args))
    assert json.loads((out / "model" / "config.json").read_text())["fusion_token_drop"] == 0.3
    assert json.loads((ckpt.latest_checkpoint(out) / ckpt.STATE_JSON).read_text())["options"]["fusion_token_drop"] == 0.3
    records = _train_records(out)
    assert len(records) == 4 and all(math.isfinite(r["loss_tia"]) for r in records)
    plain = tmp_path / "plain"
    run(make_args(features, plain, tiny_backbone, *args[:-2]))
    assert [r["loss"] for r in _train_records(plain)] != [r["loss"] for r in records]
    resumed = resumed_copy(out, tmp_path / "resumed", features, tiny_backbone, args)
    assert [r["loss"] for r in records] == [r["loss"] for r in _train_records(resumed)]
    with pytest.raises(UserError, match=r"--fusion-token-drop 0.0 \(checkpoint: 0.3\)"):
        run(make_args(features, resumed, tiny_backbone, *args[:-2], "--steps", 6, "--resume"))
    with pytest.raises(UserError, match=r"--fusion-token-drop 1.0: .*\[0, 1\)"):
        run(make_args(features, tmp_path / "all", tiny_backbone, "--steps", 1, "--fusion-token-drop", 1))


def test_a_distilled_student_sees_every_token(tiny_backbone):
    teacher = _model(tiny_backbone, 0.25)
    assert build_student(teacher, 1).config.fusion_token_drop == 0.0
    assert teacher.config.fusion_token_drop == 0.25

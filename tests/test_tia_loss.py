"""`--tia-loss`: the TIA loss as binary cross-entropy per row, as each mined negative ranked against the positive it
was mined for (pairwise), or both; checked against hand-computed values, through the model's forward with a loader
negative among the rows, and through training (recorded, resumed, a mismatch and a run without mined negatives
refused)."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from fashionbert.errors import UserError
from fashionbert.model.config import FashionBertConfig
from fashionbert.model.modeling import FashionBertModel, pairwise_alignment_loss
from fashionbert.train.trainer import run
from tests.test_hard_negatives import FEATURE_DIM, _batch, _request
from tests.test_train import features, make_args, trained_and_resumed  # noqa: F401 (features: the module fixture)

torch.set_num_threads(1)


def test_pairwise_loss_is_the_two_row_softmax_of_each_pairs_margins():
    logits = torch.tensor([[0.0, 2.0], [1.0, 0.5], [0.3, 0.1], [0.0, -1.0], [0.2, 0.4]], requires_grad=True)
    margins = [2.0, -0.5, -0.2, -1.0, 0.2]
    positive, negative = torch.tensor([0, 2, 0]), torch.tensor([3, 4, 1])
    expected = sum(-math.log(math.exp(margins[p]) / (math.exp(margins[p]) + math.exp(margins[n])))
                   for p, n in zip(positive.tolist(), negative.tolist())) / 3
    loss = pairwise_alignment_loss(logits, positive, negative)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)
    # a shift of every margin (a whole query's level) changes nothing; only the order inside a pair counts
    shifted = logits + torch.tensor([0.0, 5.0])
    assert float(pairwise_alignment_loss(shifted, positive, negative).detach()) == pytest.approx(expected, rel=1e-6)
    empty = pairwise_alignment_loss(logits, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    empty.backward()
    assert float(empty.detach()) == 0.0 and logits.grad is not None  # no pair: a zero that still reaches the logits


def _model(backbone, tia_loss: str) -> FashionBertModel:
    torch.manual_seed(0)
    cfg = FashionBertConfig(backbone=str(backbone), feature_dim=FEATURE_DIM, itc_dim=8, dropout=0.0, max_text_len=12,
                            fusion_layer=1, tia_pooling="halves", tia_loss=tia_loss)
    return FashionBertModel.from_pretrained_backbone(cfg).float()


@pytest.mark.parametrize("tia_loss", ["pairwise", "both"])
def test_the_forward_pairs_each_mined_row_with_the_batch_row_of_its_positive(tiny_backbone, tia_loss):
    """Rows 0, 2, 3 are positives and row 1 a loader negative; anchors index the positives, so the mined rows 4, 5, 6
    pair with batch rows 0, 2, 3 (not 0, 1, 2), and the loader negative is in no pair."""
    model = _model(tiny_backbone, tia_loss)
    ids, attn, feats, _ = _batch(4, seed=2)
    labels = torch.tensor([1, 0, 1, 1])
    out = model(ids, attn, feats, tia_labels=labels, groups=torch.tensor([0, 2, 3]),
                mining=_request([0, 1, 2], [True, False, True], seed=4))
    assert out.mined == 3
    logits = out.tia_logits.detach().float()
    margins = logits[:, 1] - logits[:, 0]
    pairwise = F.softplus(margins[[4, 5, 6]] - margins[[0, 2, 3]]).mean()
    expected = pairwise if tia_loss == "pairwise" else pairwise + F.cross_entropy(logits, torch.tensor([1, 0, 1, 1, 0, 0, 0]))
    assert float(out.losses["tia"].detach()) == pytest.approx(float(expected), rel=1e-5)


def test_an_unknown_tia_loss_is_refused(tiny_backbone):
    with pytest.raises(UserError, match="tia_loss 'hinge' must be one of"):
        FashionBertConfig(backbone=str(tiny_backbone), feature_dim=FEATURE_DIM, tia_loss="hinge",
                          bert=_model(tiny_backbone, "binary").config.bert).validate()


def test_training_records_the_tia_loss_resumes_bitwise_and_refuses_a_mismatch(tmp_path, features, tiny_backbone):
    """`train --tia-loss pairwise`: config.json and the checkpoints record it, a resume reaches the uninterrupted run's
    losses, a resume with another loss is refused, and so is a run that mines no negatives to pair."""
    out = tmp_path / "pairwise"
    args = ("--steps", 4, "--checkpoint-every", 2, "--val-every", 0, "--matching-only", "--tia-loss", "pairwise")
    options, resumed = trained_and_resumed(out, features, tiny_backbone, args)
    assert json.loads((out / "model" / "config.json").read_text())["tia_loss"] == "pairwise"
    assert options["tia_loss"] == "pairwise"
    with pytest.raises(UserError, match=r"--tia-loss 'binary' \(checkpoint: 'pairwise'\)"):
        run(make_args(features, resumed, tiny_backbone, "--steps", 6, "--checkpoint-every", 2, "--matching-only",
                      "--resume"))
    with pytest.raises(UserError, match="--tia-loss both .*mines none"):
        run(make_args(features, tmp_path / "unmined", tiny_backbone, "--steps", 1, "--hard-neg-fraction", 0,
                      "--tia-loss", "both"))

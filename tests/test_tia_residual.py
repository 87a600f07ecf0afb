"""The residual TIA head (`--tia-residual`): the aligned logit adds the row's itc cosine, centred on a running mean
and scaled, with no gradient into the itc vectors; the scorer, the model's own `score` and training's validation
add the same term; training records the option, resumes bitwise and refuses a mismatch; distill refuses such a
teacher."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fashionbert.data.feature_catalog import ArrayImages
from fashionbert.errors import UserError
from fashionbert.model.config import FashionBertConfig
from fashionbert.model.modeling import FashionBertModel
from fashionbert.rank.cross_encoder import CrossEncoderScorer, _pair_lookup
from fashionbert.rank.score_cache import ItemKeys, ScoreCache
from fashionbert.runtime import resolve_runtime
from fashionbert.train import checkpoint as ckpt
from fashionbert.train.distill import build_student
from fashionbert.train.trainer import run
from tests.test_hard_negatives import FEATURE_DIM, _batch, _free_port, _request
from tests.test_train import _train_records, features, make_args, resumed_copy  # noqa: F401 (features: the module fixture)

torch.set_num_threads(1)


def _residual_model(backbone, pooling="cls", residual=True) -> FashionBertModel:
    torch.manual_seed(0)
    cfg = FashionBertConfig(backbone=str(backbone), feature_dim=FEATURE_DIM, itc_dim=8, dropout=0.0, max_text_len=12,
                            fusion_layer=1, tia_pooling=pooling, tia_residual=residual)
    return FashionBertModel.from_pretrained_backbone(cfg).float()


def test_the_aligned_logit_adds_the_scaled_cosine_less_its_running_centre(tiny_backbone):
    """A training forward (aligned rows, one loader negative, mined rows): each row's TIA logits are the joint head's
    plus scale x (its itc cosine - centre) on the aligned side, the cosine being the one the recall stage computes
    for that row; the first batch sets the centre to its mean, later ones move it by 0.1 of the difference, and
    neither an eval forward nor the scorer moves it."""
    model = _residual_model(tiny_backbone).train()
    ids, attn, feats, _ = _batch(4, seed=1)
    labels, groups = torch.tensor([1, 1, 1, 0]), torch.tensor([0, 1, 2])
    out = model(ids, attn, feats, tia_labels=labels, groups=groups, mining=_request([0, 1, 2], [True, False, True]))
    assert out.mined == 3 and out.tia_logits.shape == (7, 2)
    joint_ids, joint_attn, joint_feats = out.joint_inputs
    model.eval()
    cosine = model.row_cosines(joint_ids, joint_attn, joint_feats.float())
    center, seen = model.tia_head.residual_center.tolist()
    assert seen == 1 and center == pytest.approx(float(cosine.mean()), abs=1e-5)
    with torch.no_grad():
        sequence_output, pooled = model.encode(joint_ids, joint_attn, joint_feats)
        plain = model.tia_head.classifier(pooled)
        reference = model.alignment_logits(sequence_output, joint_attn, pooled, cosine)
    torch.testing.assert_close(out.tia_logits.detach(), reference, rtol=1e-5, atol=1e-5)
    scale = float(model.tia_head.residual_scale.detach().exp())
    assert scale == pytest.approx(1 / 0.07, rel=1e-5)  # CLIP's starting temperature, as the itc head's
    torch.testing.assert_close(reference[:, 1] - plain[:, 1], scale * (cosine - center), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reference[:, 0], plain[:, 0])
    assert model.tia_head.residual_center.tolist() == [center, 1.0]  # eval: unchanged

    model.train()
    ids2, attn2, feats2, _ = _batch(4, seed=2)
    model(ids2, attn2, feats2, tia_labels=torch.ones(4, dtype=torch.long), groups=torch.arange(4))
    second = float(model.row_cosines(ids2, attn2, feats2.float()).mean())
    assert model.tia_head.residual_center[0] == pytest.approx(0.9 * center + 0.1 * second, abs=1e-5)
    with pytest.raises(ValueError, match="residual_cosine"):
        model.alignment_logits(sequence_output, joint_attn, pooled)


def test_the_tia_loss_trains_the_residual_scale_but_never_the_itc_vectors(tiny_backbone):
    """With the [CLS] head the TIA loss reaches the itc head only through the residual, which is detached: the itc
    projections and temperature get no gradient from it, the residual's scale does."""
    model = _residual_model(tiny_backbone).train()
    ids, attn, feats, _ = _batch(4, seed=3)
    out = model(ids, attn, feats, tia_labels=torch.ones(4, dtype=torch.long), groups=torch.arange(4),
                mining=_request([0, 1, 2, 3], [True, False, True, False]))
    out.losses["tia"].backward()
    assert all(p.grad is None for p in model.itc_head.parameters())
    assert model.tia_head.residual_scale.grad is not None and float(model.tia_head.residual_scale.grad) != 0.0


def test_the_scorer_and_score_add_the_same_residual_as_the_model(tiny_backbone, tmp_path):
    """The scorer embeds each text and image of a call once and adds scale x (cosine - centre) per pair: its
    margins equal the model's own joint pass with `row_cosines` (fp32), `score` is their sigmoid, and a saved and
    reloaded model (centre included) scores the same."""
    model = _residual_model(tiny_backbone, pooling="halves").train()
    ids, attn, feats, _ = _batch(4, seed=4)
    model(ids, attn, feats, tia_labels=torch.ones(4, dtype=torch.long), groups=torch.arange(4))  # sets the centre
    model.save(tmp_path / "m")
    model = FashionBertModel.from_checkpoint(tmp_path / "m")
    assert model.tia_head.residual_center[1] == 1.0
    rng = np.random.default_rng(0)
    images = rng.random((5, 64, FEATURE_DIM)).astype(np.float16)
    texts = [np.asarray([101, 2000 + i, 2100 + 3 * i, 102]) for i in range(6)]
    pairs = np.stack([np.tile(np.arange(6), 5), np.repeat(np.arange(5), 6)], axis=1)
    got = CrossEncoderScorer(model, resolve_runtime("cpu", "fp32"), block_images=2).score(texts, ArrayImages(images),
                                                                                           pairs)
    pair_ids = torch.from_numpy(np.stack([texts[t] for t in pairs[:, 0]]))
    mask, x = torch.ones_like(pair_ids), torch.from_numpy(images[pairs[:, 1]]).float()
    with torch.no_grad():
        sequence_output, pooled = model.encode(pair_ids, mask, x)
        cosine = model.row_cosines(pair_ids, mask, x)
        reference = model.tia_margin(sequence_output, mask, pooled, cosine).numpy()
        without = model.tia_head(pooled, model.itc_head.agreement(sequence_output[:, :4], mask, sequence_output[:, 4:]))
        probability = model.score(pair_ids, mask, x).numpy()
    np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(probability, 1 / (1 + np.exp(-reference)), atol=1e-6)
    # the recall stage's cosines, handed over instead of embedding again; through the cache's subset too
    given = CrossEncoderScorer(model, resolve_runtime("cpu", "fp32")).score(texts, ArrayImages(images), pairs,
                                                                            cosines=cosine.numpy())
    np.testing.assert_allclose(given, got, rtol=1e-5, atol=1e-5)
    keys = ItemKeys(np.array([f"t{i}" for i in range(6)], dtype=object), np.array([f"i{i}" for i in range(5)],
                                                                                  dtype=object))
    cached = CrossEncoderScorer(model, resolve_runtime("cpu", "fp32"), cache=ScoreCache("v", "fp32")).score(
        texts, ArrayImages(images), pairs, keys, cosine.numpy())
    np.testing.assert_allclose(cached, got, rtol=1e-5, atol=1e-5)
    some = pairs[[17, 3, 29, 0]]
    np.testing.assert_array_equal(_pair_lookup(pairs, np.arange(30.0))(some), [17, 3, 29, 0])
    assert np.abs(reference - (without[:, 1] - without[:, 0]).numpy()).max() > 1e-3  # the residual is there


def test_two_stage_hands_the_recall_cosines_to_a_residual_scorer(tiny_backbone, monkeypatch):
    """Retrieval re-ranks with the recall stage's cosines (the scorer embeds nothing again): its logits equal the
    scorer's when it embeds alone."""
    from fashionbert.rank import cross_encoder
    from fashionbert.rank.embeddings import DualEncoder
    from fashionbert.rank.retrieve import two_stage

    model = _residual_model(tiny_backbone).eval()
    rng = np.random.default_rng(1)
    images = ArrayImages(rng.random((6, 64, FEATURE_DIM)).astype(np.float16))
    texts = [np.asarray([101, 2000 + i, 2200 + 5 * i, 102]) for i in range(5)]
    scorer = CrossEncoderScorer(model, resolve_runtime("cpu", "fp32"))
    embed_again = cross_encoder.pair_cosines
    with monkeypatch.context() as patched:
        patched.setattr(cross_encoder, "pair_cosines", lambda *a, **k: pytest.fail("the scorer embedded again"))
        result = two_stage(scorer, DualEncoder(model, torch.device("cpu")), texts, images, recall_k=3, index="flat")
    assert cross_encoder.pair_cosines is embed_again
    alone = scorer.score(texts, images, np.stack([result.t2i.query, result.t2i.candidate], axis=1))
    np.testing.assert_allclose(np.sort(result.t2i.logit), np.sort(alone), rtol=1e-5, atol=1e-5)


def test_the_residual_needs_the_itc_head(tiny_backbone):
    with pytest.raises(UserError, match="tia_residual .*itc head"):
        FashionBertModel(FashionBertConfig(backbone=str(tiny_backbone), feature_dim=FEATURE_DIM, itc_dim=0,
                                           tia_residual=True, bert=_residual_model(tiny_backbone).config.bert))


def test_training_records_the_residual_resumes_bitwise_and_refuses_a_mismatch(tmp_path, features, tiny_backbone):
    """`train --tia-residual`: config.json and the checkpoints record it, training's validation fits the fusion on
    margins that include it, a resume from a checkpoint reaches the uninterrupted weights (the running centre is a
    buffer of the weights file) and a resume without the option, or the option without the itc head, is refused."""
    from safetensors.torch import load_file

    out = tmp_path / "residual"
    args = ("--steps", 4, "--checkpoint-every", 2, "--val-every", 2, "--matching-only", "--tia-residual")
    run(make_args(features, out, tiny_backbone, *args))
    assert json.loads((out / "model" / "config.json").read_text())["tia_residual"] is True
    assert json.loads((ckpt.latest_checkpoint(out) / ckpt.STATE_JSON).read_text())["options"]["tia_residual"]
    weights = load_file(out / "model" / "model.safetensors")
    assert weights["tia_head.residual_center"][1] == 4.0  # one update per training step
    resumed = resumed_copy(out, tmp_path / "resumed", features, tiny_backbone, args)
    again = load_file(resumed / "model" / "model.safetensors")
    assert all(torch.equal(weights[k], again[k]) for k in weights), [k for k in weights
                                                                      if not torch.equal(weights[k], again[k])][:5]
    assert [r["loss"] for r in _train_records(out)] == [r["loss"] for r in _train_records(resumed)]
    with pytest.raises(UserError, match=r"--tia-residual False \(checkpoint: True\)"):
        run(make_args(features, resumed, tiny_backbone, "--steps", 6, "--checkpoint-every", 2, "--matching-only",
                      "--resume"))
    with pytest.raises(UserError, match="--tia-residual .*--itc-dim 0"):
        run(make_args(features, tmp_path / "no-itc", tiny_backbone, "--steps", 1, "--itc-dim", 0, "--tia-pooling",
                      "cls", "--tia-residual"))


def test_distill_refuses_a_residual_teacher(tiny_backbone):
    with pytest.raises(UserError, match="--tia-residual"):
        build_student(_residual_model(tiny_backbone), layers=1)


def _ddp_worker(rank: int, world: int, port: int, backbone: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = _residual_model(backbone, pooling="halves").train()
        ids, attn, feats, _ = _batch(8, seed=2)
        rows = slice(4 * rank, 4 * rank + 4)
        ids, attn, feats = ids[rows], attn[rows], feats[rows]
        output = model(ids, attn, feats, tia_labels=torch.ones(4, dtype=torch.long), groups=torch.arange(4) + 4 * rank,
                       mining=_request([0, 1, 2, 3], [True, False, True, False], seed=rank))
        model.eval()
        joint_ids, joint_attn, joint_feats = output.joint_inputs
        with torch.no_grad():
            cosine = model.row_cosines(joint_ids, joint_attn, joint_feats.float())
            sequence_output, pooled = model.encode(joint_ids, joint_attn, joint_feats)
            reference = model.alignment_logits(sequence_output, joint_attn, pooled, cosine)
        Path(out, f"rank{rank}.json").write_text(json.dumps({
            "mined": output.mined, "center": model.tia_head.residual_center.tolist(), "cosine_sum": float(cosine.sum()),
            "logit_diff": float((output.tia_logits.detach() - reference).abs().max())}))
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_adds_the_mined_rows_cosines_and_keeps_one_centre(tmp_path, tiny_backbone):
    """Under DDP a mined row's partner may live on the other process: its cosine comes from the gathered vectors,
    and the running centre is the mean over both processes' rows, the same on each."""
    import torch.multiprocessing as mp

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(_ddp_worker, args=(2, _free_port(), str(tiny_backbone), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert all(r["mined"] == 4 and r["logit_diff"] < 1e-5 for r in results)
    assert results[0]["center"] == results[1]["center"]
    assert results[0]["center"][0] == pytest.approx(sum(r["cosine_sum"] for r in results) / 16, abs=1e-5)

"""`--mining-bank`: mined TIA negatives drawn from the batch's positives and the last N positives of the joint steps.
The ring keeps the newest rows and round-trips through its state; a batch whose own candidates are all excluded
takes every mined side from the bank (never of the anchor's group or text), the bank then holds that batch's
positives; the late-fusion shortcut gives the logits of a full joint pass; training records the option, saves the
bank with each checkpoint, resumes bitwise and refuses a mismatch; `--mining-bank-after` keeps the bank empty and
unread through its joint steps, then fills it, and resumes bitwise across the switch."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fashionbert.errors import UserError
from fashionbert.model.config import FashionBertConfig
from fashionbert.model.hard_negatives import MiningBank
from fashionbert.model.modeling import FashionBertModel
from fashionbert.train import checkpoint as ckpt
from fashionbert.train.trainer import run
from tests.test_hard_negatives import FEATURE_DIM, _batch, _request
from tests.test_train import _train_records, features, make_args, resumed_copy, trained_and_resumed  # noqa: F401 (features: the module fixture)

torch.set_num_threads(1)


def _rows(start: int, n: int) -> dict[str, torch.Tensor]:
    r = torch.arange(start, start + n)
    return dict(ids=r.view(-1, 1).repeat(1, 3), mask=torch.ones(n, 3, dtype=torch.long), clean_ids=r.view(-1, 1),
                feats=r.view(-1, 1, 1).half(), patch_mask=torch.zeros(n, 1, dtype=torch.bool),
                text_vec=r.view(-1, 1).float(), image_vec=-r.view(-1, 1).float(), groups=r)


def test_the_ring_keeps_the_newest_rows_and_round_trips_through_its_state():
    bank = MiningBank(5)
    assert len(bank) == 0 and bank.state_dict() == {"next": torch.tensor(0)}
    bank.push(**_rows(0, 3))
    assert len(bank) == 3 and bank["groups"].tolist() == [0, 1, 2]
    bank.push(**_rows(3, 3))  # 5 overwrites the oldest, 0
    assert len(bank) == 5 and sorted(bank["groups"].tolist()) == [1, 2, 3, 4, 5]
    assert bank["text_vec"].dtype == torch.float32 and bank["feats"].dtype == torch.float16
    restored = MiningBank(5)
    restored.load_state_dict(bank.state_dict())
    for b in (bank, restored):
        b.push(**_rows(6, 2))
    assert sorted(bank["groups"].tolist()) == [3, 4, 5, 6, 7]
    for k in MiningBank.FIELDS:
        assert torch.equal(bank[k], restored[k]), k
    with pytest.raises(ValueError, match="takes"):
        bank.push(ids=torch.zeros(1, 3))


def _model(backbone) -> FashionBertModel:
    torch.manual_seed(0)
    cfg = FashionBertConfig(backbone=str(backbone), feature_dim=FEATURE_DIM, itc_dim=8, dropout=0.0, max_text_len=12,
                            fusion_layer=1, tia_pooling="halves")
    return FashionBertModel.from_pretrained_backbone(cfg).float()


def test_a_batch_with_no_candidate_of_its_own_mines_from_the_bank_and_then_joins_it(tiny_backbone):
    """Batch A (4 products) fills the bank. Batch B's 4 positives share one group, so none may draw another of B:
    every mined side comes from the bank, never A's row of B's group (group 9) nor the row with B's first text; the
    clean batch's shortcut below the fusion layer gives the logits of a full joint pass over the same rows."""
    model = _model(tiny_backbone)
    bank = MiningBank(16)
    a = _batch(4, seed=0)
    labels = torch.ones(4, dtype=torch.long)
    model(a[0], a[1], a[2], tia_labels=labels, groups=torch.tensor([0, 1, 9, 3]),
          mining=_request([0, 1, 2, 3], [True, False, True, False], seed=1), mining_bank=bank)
    assert len(bank) == 4 and bank["groups"].tolist() == [0, 1, 9, 3]
    ids, attn, feats, _ = _batch(4, seed=1)
    ids[0], attn[0] = a[0][3], a[1][3]  # B's first text is A's last
    out = model(ids, attn, feats, tia_labels=labels, groups=torch.tensor([9, 9, 9, 9]),
                mining=_request([0, 1, 2, 3], [False, True, False, True], seed=2), mining_bank=bank)
    assert out.mined == 4
    joint_ids, joint_attn, joint_feats = out.joint_inputs
    # allowed partners among A's rows: never A's row 2 (group 9); for anchor 0 not A's row 3 (its own text)
    allowed = {0: {0, 1}, 1: {0, 1, 3}, 2: {0, 1, 3}, 3: {0, 1, 3}}
    for m, swap_image in enumerate([False, True, False, True]):
        row = 4 + m
        if swap_image:  # B's text with an image of A
            assert torch.equal(joint_ids[row], ids[m]) and torch.equal(joint_attn[row], attn[m])
            sources = {i for i in range(4) if torch.equal(joint_feats[row], a[2][i])}
        else:  # B's image with a text of A
            assert torch.equal(joint_feats[row], feats[m])
            sources = {i for i in range(4) if torch.equal(joint_ids[row], a[0][i])
                       and torch.equal(joint_attn[row], a[1][i])}
        assert len(sources) == 1 and sources <= allowed[m], (m, sources)
    assert sorted(bank["groups"].tolist()) == [0, 1, 3, 9, 9, 9, 9, 9]
    sequence_output, pooled = model.encode(joint_ids, joint_attn, joint_feats)
    torch.testing.assert_close(out.tia_logits, model.alignment_logits(sequence_output, joint_attn, pooled),
                               rtol=1e-5, atol=1e-5)


def test_training_saves_the_bank_resumes_bitwise_and_refuses_a_mismatch(tmp_path, features, tiny_backbone):
    out = tmp_path / "bank"
    args = ("--steps", 4, "--checkpoint-every", 2, "--val-every", 0, "--matching-only", "--mining-bank", 16,
            "--tia-loss", "pairwise")
    options, resumed = trained_and_resumed(out, features, tiny_backbone, args)
    assert options["mining_bank"] == 16
    saved = torch.load(out / "checkpoints" / "step-0000002" / ckpt.STATE_PT, weights_only=True)["mining_bank"]
    assert saved["ids"].shape[0] > 0 and int(saved["next"]) == saved["ids"].shape[0] % 16
    with pytest.raises(UserError, match=r"--mining-bank 0 \(checkpoint: 16\)"):
        run(make_args(features, resumed, tiny_backbone, "--steps", 6, "--checkpoint-every", 2, "--matching-only",
                      "--tia-loss", "pairwise", "--resume"))
    with pytest.raises(UserError, match="--mining-bank 8: .*draws none"):
        run(make_args(features, tmp_path / "unmined", tiny_backbone, "--steps", 1, "--hard-neg-fraction", 0,
                      "--mining-bank", 8))


def test_corrected_mining_over_the_bank_resumes_bitwise_and_refuses_a_mismatch(tmp_path, features, tiny_backbone):
    args = ("--steps", 4, "--checkpoint-every", 2, "--val-every", 0, "--matching-only", "--mining-bank", 16,
            "--hard-neg-similarity", "corrected")
    options, resumed = trained_and_resumed(tmp_path / "corrected", features, tiny_backbone, args)
    assert options["hard_neg_similarity"] == "corrected"
    with pytest.raises(UserError, match=r"--hard-neg-similarity 'cosine' \(checkpoint: 'corrected'\)"):
        run(make_args(features, resumed, tiny_backbone, "--steps", 6, "--checkpoint-every", 2, "--matching-only",
                      "--mining-bank", 16, "--resume"))
    with pytest.raises(UserError, match="--hard-neg-similarity corrected .*mines none"):
        run(make_args(features, tmp_path / "unmined", tiny_backbone, "--steps", 1, "--hard-neg-fraction", 0,
                      "--hard-neg-similarity", "corrected"))


def test_the_bank_joins_after_the_joint_steps_mining_bank_after_names(tmp_path, features, tiny_backbone):
    out = tmp_path / "late"
    # 2 itc-alone steps, then 2 joint steps on the batch's candidates alone, then 2 with the bank.
    args = ("--steps", 6, "--checkpoint-every", 1, "--keep-checkpoints", 0, "--val-every", 0, "--matching-only",
            "--itc-warmup", 2, "--mining-bank", 64, "--mining-bank-after", 2)
    run(make_args(features, out, tiny_backbone, *args))
    assert json.loads((ckpt.latest_checkpoint(out) / ckpt.STATE_JSON).read_text())["options"]["mining_bank_after"] == 2

    def banked(step: int) -> int:
        saved = torch.load(out / "checkpoints" / f"step-{step:07d}" / ckpt.STATE_PT, weights_only=True)
        return int(saved["mining_bank"]["ids"].shape[0]) if "ids" in saved.get("mining_bank", {}) else 0

    # Each step pushes its 4 positives (batch size 4): none through step 4, then two batches' worth.
    assert [banked(s) for s in range(1, 7)] == [0, 0, 0, 0, 4, 8]
    records = _train_records(out)
    assert len(records) == 6 and all(math.isfinite(r["loss_tia"]) for r in records[2:])
    # Killed after the step before the switch: the resumed run switches at the same step, bit for bit.
    resumed = resumed_copy(out, tmp_path / "resumed", features, tiny_backbone, args,
                           drop=("step-0000004", "step-0000005", "step-0000006"))
    assert [r["loss"] for r in records] == [r["loss"] for r in _train_records(resumed)]
    with pytest.raises(UserError, match=r"--mining-bank-after 0 \(checkpoint: 2\)"):
        run(make_args(features, resumed, tiny_backbone, *args[:-2], "--steps", 8, "--resume"))
    with pytest.raises(UserError, match="--mining-bank-after 5: .*--mining-bank N"):
        run(make_args(features, tmp_path / "no-bank", tiny_backbone, "--steps", 1, "--mining-bank-after", 5))


def _ddp_worker(rank: int, world: int, port: int, backbone: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = _model(backbone)
        bank = MiningBank(32)
        labels, rows = torch.ones(4, dtype=torch.long), slice(4 * rank, 4 * rank + 4)
        ids, attn, feats, _ = _batch(8, seed=0)
        model(ids[rows], attn[rows], feats[rows], tia_labels=labels, groups=torch.arange(4) + 4 * rank,
              mining=_request([0, 1, 2, 3], [True, False, True, False], seed=rank), mining_bank=bank)
        ids, attn, feats, _ = _batch(8, seed=3)  # every row of the gathered batch in group 99: only the bank is left
        out_ = model(ids[rows], attn[rows], feats[rows], tia_labels=labels, groups=torch.full((4,), 99),
                     mining=_request([0, 1, 2, 3], [True, False, True, False], seed=10 + rank), mining_bank=bank)
        joint_ids, joint_attn, joint_feats = out_.joint_inputs
        sequence_output, pooled = model.encode(joint_ids, joint_attn, joint_feats)
        logits = model.alignment_logits(sequence_output, joint_attn, pooled)
        result = {"mined": out_.mined, "logit_diff": float((out_.tia_logits - logits).detach().abs().max()),
                  "bank_groups": bank["groups"].tolist(), "bank_feats_sum": float(bank["feats"].float().sum()),
                  "mined_feats": joint_feats[4:].float().tolist()}
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_processes_hold_one_bank_of_the_gathered_positives(tmp_path, tiny_backbone):
    import os

    import torch.multiprocessing as mp

    from tests.test_hard_negatives import _free_port

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(_ddp_worker, args=(2, _free_port(), str(tiny_backbone), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    first_feats = _batch(8, seed=0)[2]
    for res in results:
        assert res["mined"] == 4 and res["logit_diff"] < 1e-5, res
        assert res["bank_groups"] == [0, 1, 2, 3, 4, 5, 6, 7] + [99] * 8  # both steps' gathered positives, in order
        for m in (0, 2):  # swap_image anchors: an image of the first batch, from either process
            assert any(torch.equal(torch.tensor(res["mined_feats"][m]), first_feats[i].float()) for i in range(8))
    assert results[0]["bank_feats_sum"] == results[1]["bank_feats_sum"]

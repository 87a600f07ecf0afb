"""TIA negatives mined from the itc similarity: the draw's exclusions and distribution (against a hand-computed
softmax), its determinism, the rows it adds to the joint pass, and the gathered batch under 2-process gloo DDP."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fashionbert.model.config import FashionBertConfig
from fashionbert.model.contrastive import EmbeddingQueue, contrastive_loss, text_groups
from fashionbert.model.hard_negatives import MiningRequest, mine, negative_probabilities, pool_hubness
from fashionbert.model.modeling import FashionBertModel

torch.set_num_threads(1)
FEATURE_DIM = 16


def _request(anchors, swap, seed=0, temperature=0.0, similarity="cosine"):
    return MiningRequest(anchors=torch.tensor(anchors), swap_image=torch.tensor(swap, dtype=torch.bool), seed=seed,
                         temperature=temperature, similarity=similarity)


def _excluded(groups, codes=None):
    g = torch.tensor(groups)
    out = g.unsqueeze(1) == g.unsqueeze(0)
    if codes is not None:
        c = torch.tensor(codes)
        out |= c.unsqueeze(1) == c.unsqueeze(0)
    return out


def test_probabilities_match_a_hand_computed_softmax():
    # one text against four images: itself (group 0), a same-group colour (group 0) and two others
    similarity = torch.tensor([[0.9, 0.8, 0.5, -0.2]])
    excluded = torch.tensor([[True, True, False, False]])
    p = negative_probabilities(similarity, excluded, scale=2.0)
    e2, e3 = math.exp(2 * 0.5), math.exp(2 * -0.2)
    assert p[0].tolist() == pytest.approx([0.0, 0.0, e2 / (e2 + e3), e3 / (e2 + e3)], abs=1e-7)
    # nothing allowed: no draw at all, not a uniform one
    assert negative_probabilities(similarity, torch.ones_like(excluded), 2.0).sum() == 0


def test_draws_follow_the_softmax_and_never_the_positive_or_its_group():
    torch.manual_seed(0)
    vec = F.normalize(torch.randn(6, 8), dim=-1)
    groups = [0, 0, 1, 2, 3, 3]  # rows 0/1 and 4/5 are colours of one product each
    excluded = _excluded(groups)
    scale = 5.0
    counts = np.zeros((6, 6))
    request = _request(list(range(6)) * 400, [True] * 2400)
    for seed in range(5):
        request.seed = seed
        anchors, swap, partner = mine(request, vec, vec, vec, vec, excluded, scale)
        assert len(anchors) == 2400 and bool(swap.all())
        np.add.at(counts, (anchors.numpy(), partner.numpy()), 1)
    assert not counts[excluded.numpy()].any()  # never itself, never its group
    expected = negative_probabilities(vec @ vec.t(), excluded, scale).numpy()
    freq = counts / counts.sum(axis=1, keepdims=True)
    assert np.abs(freq - expected).max() < 0.03  # 2,000 draws per row: ~0.011 standard error at p = 0.5


def test_image_side_uses_the_image_to_text_similarity():
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    image = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    excluded = _excluded([0, 1, 2])
    request = _request([0] * 200, [False] * 200)
    _, _, partner = mine(request, text, image, text, image, excluded, scale=50.0)
    # image 0 looks like texts 1 and 2 (cos 1), not like its own text: both drawn, nearly evenly
    assert set(partner.tolist()) == {1, 2}
    request = _request([0] * 200, [True] * 200)
    _, _, partner = mine(request, text, image, text, image, excluded, scale=50.0)
    assert set(partner.tolist()) == {1, 2}  # text 0 = (1, 0) is images 1 and 2


def _unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_corrected_draws_follow_a_hand_computed_dual_softmax():
    # three products; image 1 is nearer text 0 than image 2 is, but its own text claims it more strongly still,
    # while no text is much nearer image 2 than text 0 is
    text = _unit([1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0])
    image = _unit([1.0, 0.1, 0.0], [0.6, 0.8, 0.0], [0.5, 0.5, 0.5])
    scale = 5.0
    cos = (text @ image.t()).double()
    # by hand: text 0's logit for image j is scale x cos(t0, ij) less log sum_k exp(scale x cos(tk, ij))
    hub = [math.log(sum(math.exp(scale * float(cos[k, j])) for k in range(3))) for j in range(3)]
    logit = [scale * float(cos[0, j]) - hub[j] for j in (1, 2)]
    expected = [math.exp(v) / sum(math.exp(u) for u in logit) for v in logit]
    assert pool_hubness(text, image, scale)[0].tolist() == pytest.approx(hub, abs=1e-9)
    excluded = _excluded([0, 1, 2])
    p = negative_probabilities(cos[:1], excluded[:1], scale, pool_hubness(text, image, scale)[0])
    assert p[0].tolist() == pytest.approx([0.0] + expected, abs=1e-9)
    counts = np.zeros(3)
    for seed in range(4):
        request = _request([0] * 1000, [True] * 1000, seed=seed, similarity="corrected")
        _, _, partner = mine(request, text, image, text, image, excluded, scale)
        np.add.at(counts, partner.numpy(), 1)
    assert counts[0] == 0 and counts[1:] / counts.sum() == pytest.approx(expected, abs=0.03)
    # the raw cosine draws image 1 most; the corrected draw image 2, which the corrected cosine ranks nearer text 0
    raw = negative_probabilities(cos[:1], excluded[:1], scale)[0]
    assert raw[1] > raw[2] and expected[1] > expected[0]


def test_corrected_image_side_reads_each_texts_hubness_over_the_images():
    text = _unit([1.0, 0.0], [0.3, 1.0], [0.7, 0.7])
    image = _unit([0.0, 1.0], [1.0, 0.2], [1.0, 0.0])
    scale, excluded = 3.0, _excluded([0, 1, 2])
    request = _request([0] * 3, [False] * 3, seed=3, similarity="corrected")
    hubness = pool_hubness(text, image, scale)[1]  # each text's log-sum-exp over the pool's images
    want = negative_probabilities((image @ text.t())[:1], excluded[:1], scale, hubness)[0]
    generator = torch.Generator().manual_seed(3)
    expected = torch.multinomial(want.expand(3, -1), 1, generator=generator).squeeze(1)
    assert torch.equal(mine(request, text, image, text, image, excluded, scale)[2], expected)
    with pytest.raises(ValueError, match="similarity 'dual'"):
        mine(_request([0], [False], similarity="dual"), text, image, text, image, excluded, scale)


def test_the_draw_is_a_function_of_the_seed():
    torch.manual_seed(1)
    vec = F.normalize(torch.randn(8, 4), dim=-1)
    excluded = _excluded(list(range(8)))
    first = mine(_request(list(range(8)) * 4, [True, False] * 16, seed=7), vec, vec, vec, vec, excluded, 1.0)
    again = mine(_request(list(range(8)) * 4, [True, False] * 16, seed=7), vec, vec, vec, vec, excluded, 1.0)
    other = mine(_request(list(range(8)) * 4, [True, False] * 16, seed=8), vec, vec, vec, vec, excluded, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[2], other[2])


def test_an_anchor_with_no_allowed_candidate_gets_no_row():
    vec = F.normalize(torch.randn(3, 4), dim=-1)
    anchors, _, partner = mine(_request([0, 1, 2], [True] * 3), vec, vec, vec, vec,
                               _excluded([5, 5, 6]), 1.0)
    # rows 0 and 1 may draw row 2 only; row 2 may draw 0 or 1
    assert anchors.tolist() == [0, 1, 2] and partner[:2].tolist() == [2, 2] and partner[2] in (0, 1)
    anchors, _, _ = mine(_request([0, 1], [True] * 2), vec[:2], vec[:2], vec[:2], vec[:2],
                         _excluded([5, 5]), 1.0)
    assert len(anchors) == 0


# ------------------------------------------------------------------------------------------ the joint pass's rows
def _model(backbone, itc_dim=8) -> FashionBertModel:
    torch.manual_seed(0)
    cfg = FashionBertConfig(backbone=str(backbone), feature_dim=FEATURE_DIM, itc_dim=itc_dim, dropout=0.0,
                            max_text_len=12)
    return FashionBertModel.from_pretrained_backbone(cfg)


def _batch(rows: int, seed: int, text_len=6):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2000, 3000, (rows, text_len), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    attn = torch.ones_like(ids)
    attn[0, -2:] = 0  # one padded text
    feats = torch.rand(rows, 64, FEATURE_DIM, generator=g).half()
    pmask = torch.rand(rows, 64, generator=g) < 0.2
    return ids, attn, feats, pmask


def test_mined_rows_keep_one_side_and_take_the_other_from_the_partner(tiny_backbone):
    model = _model(tiny_backbone)
    ids, attn, feats, pmask = _batch(4, seed=0)
    labels = torch.ones(4, dtype=torch.long)
    mlm = torch.full_like(ids, -100)
    request = _request([0, 1, 2, 3], [True, False, True, False], seed=3)
    groups = torch.tensor([0, 1, 2, 3])
    _, state = model._contrastive(ids, attn, feats, labels, mlm, groups)
    rows, (text_src, image_src), anchor_rows, _ = model._mined_rows(request, state, ids, attn, feats, pmask, mlm, labels)
    anchors, swap, partner = mine(request, state.text_vec, state.image_vec, state.all_text_vec, state.all_image_vec,
                                  _excluded([0, 1, 2, 3]), state.scale)
    new_ids, new_attn, new_feats, new_pmask, new_mlm, new_labels = rows
    assert new_labels.tolist() == [1, 1, 1, 1, 0, 0, 0, 0] and (new_mlm[4:] == -100).all()
    for m, (a, s, p) in enumerate(zip(anchors.tolist(), swap.tolist(), partner.tolist())):
        text_from, image_from = (a, p) if s else (p, a)
        assert p != a
        assert torch.equal(new_ids[4 + m], ids[text_from]) and torch.equal(new_attn[4 + m], attn[text_from])
        assert torch.equal(new_feats[4 + m], feats[image_from]) and torch.equal(new_pmask[4 + m], pmask[image_from])
        assert (text_src[m], image_src[m]) == (text_from, image_from)
        assert anchor_rows[m] == a  # every row is a positive here: the anchor's row is its index
    out = model(ids, attn, feats, pmask, mlm, labels, groups=groups, mining=request)
    assert out.mined == 4 and out.tia_logits.shape == (8, 2) and set(out.losses) == {"mlm", "mpm", "tia", "itc"}


def test_a_clean_late_fusion_batch_reuses_the_itc_passes_below_the_fusion_with_the_same_logits_and_gradient(
        tiny_backbone):
    """The joint pass of a clean batch takes its below-fusion states from the itc passes: its TIA logits and every
    parameter's gradient equal those of a separate full joint pass over the same rows."""
    torch.manual_seed(0)
    cfg = FashionBertConfig(backbone=str(tiny_backbone), feature_dim=FEATURE_DIM, itc_dim=8, dropout=0.0,
                            max_text_len=12, fusion_layer=1, tia_pooling="halves")
    model = FashionBertModel.from_pretrained_backbone(cfg).float()
    ids, attn, feats, pmask = _batch(4, seed=1)
    labels, groups = torch.ones(4, dtype=torch.long), torch.tensor([0, 1, 2, 3])
    request = _request([0, 1, 2, 3], [True, False, True, False], seed=5)
    assert model._shares_below_fusion(labels, None, None)
    assert not model._shares_below_fusion(labels, pmask, torch.full_like(ids, -100))  # masked: MLM/MPM rows differ
    assert not model._shares_below_fusion(torch.tensor([1, 1, 0, 1]), None, None)  # a loader negative of its own

    out = model(ids, attn, feats, tia_labels=labels, groups=groups, mining=request)
    assert out.mined == 4
    (out.losses["tia"] + out.losses["itc"]).backward()
    shared = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    joint_ids, joint_attn, joint_feats = out.joint_inputs
    itc, _ = model._contrastive(ids, attn, feats, labels, None, groups)
    sequence_output, pooled = model.encode(joint_ids, joint_attn, joint_feats)
    logits = model.alignment_logits(sequence_output, joint_attn, pooled)
    torch.testing.assert_close(out.tia_logits, logits, rtol=1e-5, atol=1e-5)
    (F.cross_entropy(logits.float(), torch.tensor([1] * 4 + [0] * 4)) + itc).backward()
    separate = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert shared.keys() == separate.keys()
    for name in shared:
        torch.testing.assert_close(shared[name], separate[name], rtol=1e-4, atol=1e-6, msg=name)


def test_mining_needs_the_itc_head(tiny_backbone):
    model = _model(tiny_backbone, itc_dim=0)
    ids, attn, feats, _ = _batch(2, seed=0)
    with pytest.raises(ValueError, match="itc"):
        model(ids, attn, feats, tia_labels=torch.ones(2, dtype=torch.long), mining=_request([0], [True]))


# ------------------------------------------------------------------------------------------ DDP
def _ddp_worker(rank: int, world: int, port: int, backbone: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = _model(backbone)
        ids, attn, feats, pmask = _batch(8, seed=0)  # the same 8 rows everywhere; each rank holds 4 of them
        mine_rows = slice(4 * rank, 4 * rank + 4)
        ids, attn, feats, pmask = ids[mine_rows], attn[mine_rows], feats[mine_rows], pmask[mine_rows]
        labels = torch.ones(4, dtype=torch.long)
        # every local row in one group: the only candidates are the other process's rows
        loss, state = model._contrastive(ids, attn, feats, labels, None, torch.tensor([rank] * 4))
        request = _request([0, 1, 2, 3], [True, False, True, False], seed=rank)
        rows, _, _, _ = model._mined_rows(request, state, ids, attn, feats, pmask, None, labels)
        anchors, swap, partner = mine(request, state.text_vec, state.image_vec, state.all_text_vec, state.all_image_vec,
                                      torch.tensor([rank] * 4).unsqueeze(1) == torch.tensor([0] * 4 + [1] * 4), state.scale)
        loss.backward()
        grad = model.itc_head.text_proj.weight.grad.clone()
        dist.all_reduce(grad)
        corrected = dataclasses.replace(request, similarity="corrected")
        corrected_partner = mine(corrected, state.text_vec, state.image_vec, state.all_text_vec, state.all_image_vec,
                                 torch.tensor([rank] * 4).unsqueeze(1) == torch.tensor([0] * 4 + [1] * 4),
                                 state.scale)[2]
        result = {"loss": float(loss), "partner": partner.tolist(), "swap": swap.tolist(),
                  "corrected_partner": corrected_partner.tolist(),
                  "image_hubness": pool_hubness(state.all_text_vec, state.all_image_vec, state.scale)[0].tolist(),
                  "mined_features": rows[2][4:].float().tolist(), "mined_ids": rows[0][4:].tolist(),
                  "grad_mean": (grad / world).tolist()}
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_mines_over_the_gathered_batch(tmp_path, tiny_backbone):
    import torch.multiprocessing as mp

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(_ddp_worker, args=(2, _free_port(), str(tiny_backbone), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    ids, attn, feats, _ = _batch(8, seed=0)
    for rank, res in enumerate(results):
        other = range(4, 8) if rank == 0 else range(0, 4)
        assert all(p in other for p in res["partner"])  # drawn from the other process's rows
        for m, (p, s) in enumerate(zip(res["partner"], res["swap"])):
            if s:  # the image came from the other process
                assert torch.equal(torch.tensor(res["mined_features"][m]), feats[p].float())
            else:  # the text came from the other process (padded to max_text_len for the gather, then trimmed)
                got = torch.tensor(res["mined_ids"][m])
                assert torch.equal(got[: int(attn[p].sum())], ids[p][: int(attn[p].sum())])
        assert all(p in other for p in res["corrected_partner"])
    # the contrastive loss over the gathered batch: the processes' mean is the one-process loss over all 8 rows,
    # and so is the gradient DDP averages
    model = _model(tiny_backbone)
    clean_ids = ids[:, : int(attn.sum(dim=1).max())]
    text_vec, image_vec = model.itc_head(model, clean_ids, attn, feats)
    # the corrected draw's hubness is over every process's texts, one value per gathered image on both processes
    whole_hubness = pool_hubness(text_vec.detach(), image_vec.detach(), float(model.itc_head.scale().detach()))[0]
    for res in results:
        assert torch.allclose(torch.tensor(res["image_hubness"]), whole_hubness.float(), atol=1e-4)
    whole = contrastive_loss(text_vec, image_vec, model.itc_head.scale(), text_groups(clean_ids, attn))
    assert np.mean([r["loss"] for r in results]) == pytest.approx(float(whole.detach()), abs=1e-5)
    whole.backward()
    assert torch.allclose(torch.tensor(results[0]["grad_mean"]), model.itc_head.text_proj.weight.grad, atol=1e-5)


def _ddp_shared_worker(rank: int, world: int, port: int, backbone: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        cfg = FashionBertConfig(backbone=backbone, feature_dim=FEATURE_DIM, itc_dim=8, dropout=0.0, max_text_len=12,
                                fusion_layer=1, tia_pooling="halves")
        model = FashionBertModel.from_pretrained_backbone(cfg).float()
        ids, attn, feats, _ = _batch(8, seed=2)
        rows = slice(4 * rank, 4 * rank + 4)
        ids, attn, feats = ids[rows], attn[rows], feats[rows]
        ids, attn = ids[:, : int(attn.sum(dim=1).max())], attn[:, : int(attn.sum(dim=1).max())]  # ranks differ
        labels, groups = torch.ones(4, dtype=torch.long), torch.arange(4) + 4 * rank
        # one process with a loader negative of its own: neither shares (a lone sharer would hang in its gather)
        mixed = model._shares_below_fusion(torch.tensor([1, 1, 1, 1 - rank]), None, None)
        shares = model._shares_below_fusion(labels, None, None)
        request = _request([0, 1, 2, 3], [True, False, True, False], seed=rank)
        output = model(ids, attn, feats, tia_labels=labels, groups=groups, mining=request)
        (output.losses["tia"] + output.losses["itc"]).backward()
        names = [n for n, p in model.named_parameters() if p.grad is not None]
        shared = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        itc, _ = model._contrastive(ids, attn, feats, labels, None, groups)
        joint_ids, joint_attn, joint_feats = output.joint_inputs
        sequence_output, pooled = model.encode(joint_ids, joint_attn, joint_feats)
        logits = model.alignment_logits(sequence_output, joint_attn, pooled)
        (F.cross_entropy(logits.float(), torch.tensor([1] * 4 + [0] * output.mined)) + itc).backward()
        outside = []
        for n in names:  # what DDP averages: the processes' sum
            a, b = shared[n], dict(model.named_parameters())[n].grad.clone()
            dist.all_reduce(a)
            dist.all_reduce(b)
            if not torch.allclose(a, b, rtol=1e-4, atol=1e-6):
                outside.append([n, float((a - b).abs().max()), float(b.abs().max())])
        result = {"mixed": mixed, "shares": shares, "mined": output.mined,
                  "logit_diff": float((output.tia_logits - logits).detach().abs().max()), "grads_outside": outside}
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_shares_the_below_fusion_states_over_the_gathered_batch(tmp_path, tiny_backbone):
    import torch.multiprocessing as mp

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(_ddp_shared_worker, args=(2, _free_port(), str(tiny_backbone), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    for rank in range(2):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert res["mixed"] is False and res["shares"] is True and res["mined"] == 4
        assert res["logit_diff"] < 1e-5 and res["grads_outside"] == [], res


# ------------------------------------------------------------------------------------------ the itc queue
def test_queue_keeps_the_newest_and_round_trips():
    q = EmbeddingQueue(size=5, dim=2)
    for start in (0, 3):
        rows = torch.arange(start, start + 3, dtype=torch.float32)
        q.push(torch.stack([rows, rows], 1), torch.stack([-rows, -rows], 1), torch.arange(start, start + 3))
    assert len(q) == 5 and q.groups.tolist() == [3, 4, 5, 0, 1]  # the newest batch first, the oldest dropped
    again = EmbeddingQueue(size=5, dim=2)
    again.load_state_dict(q.state_dict())
    assert torch.equal(again.text, q.text) and torch.equal(again.image, q.image) and torch.equal(again.groups, q.groups)


def test_queue_adds_negatives_except_the_rows_own_group():
    torch.manual_seed(0)
    text, image = F.normalize(torch.randn(3, 4), dim=-1), F.normalize(torch.randn(3, 4), dim=-1)
    q = EmbeddingQueue(size=4, dim=4)
    q.push(F.normalize(torch.randn(4, 4), dim=-1), F.normalize(torch.randn(4, 4), dim=-1), torch.tensor([7, 1, 8, 9]))
    groups = torch.tensor([1, 2, 3])  # row 0's product group is in the queue: that entry is not its negative
    got = contrastive_loss(text, image, 10.0, queue=q, product_groups=groups)
    t2i = torch.cat([10 * text @ image.t(), 10 * text @ q.image.t()], 1)
    i2t = torch.cat([10 * image @ text.t(), 10 * image @ q.text.t()], 1)
    t2i[0, 3 + 1] = i2t[0, 3 + 1] = float("-inf")
    labels = torch.arange(3)
    expected = 0.5 * (F.cross_entropy(t2i, labels) + F.cross_entropy(i2t, labels))
    assert float(got) == pytest.approx(float(expected), abs=1e-6)
    assert float(contrastive_loss(text, image, 10.0, queue=q, product_groups=groups)) > \
        float(contrastive_loss(text, image, 10.0))  # more negatives, a larger loss


def test_forward_reads_the_queue_then_pushes_the_batch(tiny_backbone):
    model = _model(tiny_backbone)
    ids, attn, feats, _ = _batch(4, seed=0)
    labels, groups = torch.ones(4, dtype=torch.long), torch.tensor([10, 11, 12, 13])
    q = EmbeddingQueue(size=6, dim=8)
    first = model(ids, attn, feats, tia_labels=labels, groups=groups, itc_queue=q)
    assert q.groups.tolist() == [10, 11, 12, 13] and len(q) == 4
    before = EmbeddingQueue(size=6, dim=8)
    before.load_state_dict(q.state_dict())
    second = model(ids, attn, feats, tia_labels=labels, groups=groups, itc_queue=q)
    assert q.groups.tolist() == [10, 11, 12, 13, 10, 11]  # the batch pushed in front, the queue cut at 6
    clean = ids[:, : int(attn.sum(dim=1).max())]
    text_vec, image_vec = model.itc_head(model, clean, attn, feats)
    expected = contrastive_loss(text_vec, image_vec, model.itc_head.scale(), text_groups(clean, attn), queue=before,
                                product_groups=groups)
    assert float(second.losses["itc"].detach()) == pytest.approx(float(expected.detach()), abs=1e-5)
    assert float(second.losses["itc"].detach()) > float(first.losses["itc"].detach())  # more negatives
    second.losses["itc"].backward()  # the queue's later push did not touch what this loss saved


def test_a_late_fusion_joint_step_has_the_same_gradient_twice_on_two_threads(tiny_backbone):
    """Mined rows repeat the batch's texts and images, so their below-fusion states are gathered with repeats; the
    gradient must sum those in one order (index_select's backward), or --resume is not bitwise on a multi-core
    CPU (two runs of one joint step differed in the last bits with plain indexing)."""
    torch.manual_seed(0)
    cfg = FashionBertConfig(backbone=str(tiny_backbone), feature_dim=FEATURE_DIM, itc_dim=8, dropout=0.0,
                            max_text_len=12, fusion_layer=1, tia_pooling="halves")
    model = FashionBertModel.from_pretrained_backbone(cfg).float()
    ids, attn, feats, _ = _batch(64, seed=4)
    labels = torch.ones(64, dtype=torch.long)
    request = _request(list(range(64)), [i % 2 == 0 for i in range(64)], seed=6)

    def gradients():
        model.zero_grad(set_to_none=True)
        out = model(ids, attn, feats, tia_labels=labels, groups=torch.arange(64), mining=request)
        (out.losses["tia"] + out.losses["itc"]).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        first, others = gradients(), [gradients() for _ in range(3)]  # an unordered sum differs in most tries
    finally:
        torch.set_num_threads(threads)
    for again in others:
        assert [n for n in first if not torch.equal(first[n], again[n])] == []

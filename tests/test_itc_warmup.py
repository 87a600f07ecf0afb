"""`train --itc-warmup`: the first steps train the contrastive itc task alone (the model's forward with
joint=False: no joint pass, no TIA, no mined rows), then TIA joins and mines from the embeddings trained so far;
the option round-trips through checkpoints, --resume across the switch is bitwise and refuses a mismatch, and the
steps run under 2-process DDP."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fashionbert.errors import UserError
from fashionbert.model.config import FashionBertConfig
from fashionbert.model.modeling import FashionBertModel
from fashionbert.train import checkpoint as ckpt
from fashionbert.train.trainer import run
from tests.test_hard_negatives import FEATURE_DIM, _batch, _request
from tests.test_train import REPO, _train_records, assert_same_weights, cli_args, features, make_args, resumed_copy  # noqa: F401 (features: fixture)

torch.set_num_threads(1)


def _model(backbone, itc_dim=8) -> FashionBertModel:
    torch.manual_seed(0)
    cfg = FashionBertConfig(backbone=str(backbone), feature_dim=FEATURE_DIM, itc_dim=itc_dim, dropout=0.0,
                            max_text_len=12, fusion_layer=1, tia_pooling="halves" if itc_dim else "cls")
    return FashionBertModel.from_pretrained_backbone(cfg).float()


def test_a_forward_without_the_joint_pass_is_the_itc_loss_alone(tiny_backbone):
    """joint=False returns the same itc loss (and gradient into the itc passes) as a full forward on the same batch,
    and nothing else: no TIA logits, no mined rows, no gradient into the TIA head."""
    model = _model(tiny_backbone).train()
    ids, attn, feats, _ = _batch(4, seed=1)
    labels, groups = torch.tensor([1, 1, 1, 0]), torch.tensor([0, 1, 2])
    full = model(ids, attn, feats, tia_labels=labels, groups=groups, mining=_request([0, 1, 2], [True, False, True]))
    alone = model(ids, attn, feats, tia_labels=labels, groups=groups, joint=False)
    assert set(alone.losses) == {"itc"} and alone.tia_logits is None and alone.mined == 0
    torch.testing.assert_close(alone.losses["itc"], full.losses["itc"])
    model.zero_grad()
    alone.losses["itc"].backward()
    assert all(p.grad is None for p in model.tia_head.parameters())
    assert model.itc_head.text_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="mined TIA negatives"):
        model(ids, attn, feats, tia_labels=labels, groups=groups, mining=_request([0], [True]), joint=False)
    no_itc = _model(tiny_backbone, itc_dim=0)
    with pytest.raises(ValueError, match="itc head"):
        no_itc(ids, attn, feats, tia_labels=labels, joint=False)


def test_itc_warmup_steps_train_the_itc_task_alone_then_tia_joins(tmp_path, features, tiny_backbone):
    """The first --itc-warmup steps log the itc loss alone at weight 1 with no mined rows, and leave the TIA head as
    it was (no gradient, so AdamW does not decay it either); from the next step on TIA trains on mined negatives as
    without the option. config and checkpoints record the option; the start line says so."""
    from safetensors.torch import load_file

    out = tmp_path / "itcw"
    run(make_args(features, out, tiny_backbone, "--steps", 4, "--checkpoint-every", 2, "--val-every", 0,
                  "--matching-only", "--itc-warmup", 2, "--weight-decay", 0.1))
    recs = _train_records(out)
    assert [r["loss_tia"] is None for r in recs] == [True, True, False, False]
    assert all(r["w_itc"] == 1.0 and r["w_tia"] == 0.0 and r["pairs"] == 4 for r in recs[:2])
    assert all(r["w_itc"] == r["w_tia"] == 0.5 and r["pairs"] == 8 for r in recs[2:])  # 4 positives + 4 mined
    options = json.loads((ckpt.latest_checkpoint(out) / ckpt.STATE_JSON).read_text())["options"]
    assert options["itc_warmup"] == 2
    fresh = _model_of_step_zero(tmp_path, features, tiny_backbone)
    at_two = load_file(out / "checkpoints" / "step-0000002" / "model.safetensors")
    at_four = load_file(out / "model" / "model.safetensors")
    tia = [k for k in at_two if k.startswith("tia_head.")]
    assert tia and all(torch.equal(at_two[k], fresh[k]) for k in tia)  # no TIA gradient, so no decay either
    assert any(not torch.equal(at_four[k], fresh[k]) for k in tia)
    assert not torch.equal(at_two["itc_head.text_proj.weight"], fresh["itc_head.text_proj.weight"])


def adam_steps(checkpoint) -> dict[str, int | None]:
    """AdamW's step count per parameter name in a checkpoint (None: the optimizer holds no state for it yet)."""
    from fashionbert.train.optim import param_groups

    model = FashionBertModel.from_checkpoint(checkpoint)
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in param_groups(model, 0.01) for p in group["params"]]
    _, tensors = ckpt.load_training_state(checkpoint)
    state = tensors["optimizer"]["state"]
    return {name: int(state[i]["step"]) if i in state else None for i, name in enumerate(order)}


def test_parameters_the_itc_alone_steps_do_not_reach_start_adamw_at_their_first_gradient(tmp_path, features,
                                                                                         tiny_backbone):
    """A parameter that no step has trained yet has no AdamW state: the TIA head (and the pooler [CLS] reads)
    through the itc-alone steps, the MLM and MPM heads through matching-only steps. So the TIA head's first joint
    step is AdamW's step 1 for it, with the bias corrections of a first step, not of step itc-warmup + 1 (whose
    nearly-unit corrections over moments grown from zero made its first updates several times the rate)."""
    out = tmp_path / "adam"
    run(make_args(features, out, tiny_backbone, "--steps", 5, "--checkpoint-every", 3, "--val-every", 0,
                  "--matching-only", "--itc-warmup", 3, "--tia-pooling", "cls"))
    at_three, at_five = (adam_steps(out / "checkpoints" / f"step-000000{k}") for k in (3, 5))
    heads = [name for name in at_three if name.startswith(("tia_head.", "bert.pooler."))]
    unused = [name for name in at_three if name.startswith(("mlm_head.", "mpm_head."))]
    assert heads and unused and all(at_three[name] is None for name in heads + unused)
    assert at_three["itc_head.text_proj.weight"] == 3 and at_three["bert.embeddings.word_embeddings.weight"] == 3
    assert all(at_five[name] == 2 for name in heads)  # the two joint steps
    assert all(at_five[name] is None for name in unused) and at_five["itc_head.text_proj.weight"] == 5


def _model_of_step_zero(tmp_path, features, tiny_backbone) -> dict[str, torch.Tensor]:
    """The weights a run starts from (a 1-step run at learning rate 0 leaves them as initialised)."""
    from safetensors.torch import load_file

    out = tmp_path / "step0"
    run(make_args(features, out, tiny_backbone, "--steps", 1, "--lr", 0, "--checkpoint-every", 0, "--val-every", 0,
                  "--matching-only"))
    return load_file(out / "model" / "model.safetensors")


def test_resume_across_the_switch_is_bitwise_and_refuses_a_mismatch(tmp_path, features, tiny_backbone):
    """Killed inside the warm-up (newest checkpoint at step 2 of 3 itc-alone steps) and resumed, the run reaches the
    uninterrupted weights and losses; resuming with another --itc-warmup is refused; so are --itc-warmup with
    --itc-dim 0, one that leaves TIA no step, and a negative one."""

    args = ("--steps", 5, "--checkpoint-every", 2, "--val-every", 0, "--matching-only", "--itc-warmup", 3)
    out = tmp_path / "whole"
    run(make_args(features, out, tiny_backbone, *args))
    resumed = resumed_copy(out, tmp_path / "resumed", features, tiny_backbone, args,
                           drop=("step-0000004", "step-0000005"))
    assert_same_weights(out / "model", resumed / "model")
    assert [r["loss"] for r in _train_records(out)] == [r["loss"] for r in _train_records(resumed)]
    with pytest.raises(UserError, match=r"--itc-warmup 1\.0 \(checkpoint: 3\.0\)"):
        run(make_args(features, resumed, tiny_backbone, "--steps", 7, "--checkpoint-every", 2, "--matching-only",
                      "--itc-warmup", 1, "--resume"))
    with pytest.raises(UserError, match="--itc-warmup .*--itc-dim 0"):
        run(make_args(features, tmp_path / "no-itc", tiny_backbone, "--steps", 2, "--itc-dim", 0, "--tia-pooling",
                      "cls", "--itc-warmup", 1))
    with pytest.raises(UserError, match="TIA would never train"):
        run(make_args(features, tmp_path / "all", tiny_backbone, "--steps", 4, "--itc-warmup", 4))
    with pytest.raises(UserError, match="must be >= 0"):
        run(make_args(features, tmp_path / "neg", tiny_backbone, "--steps", 4, "--itc-warmup", -1))


def test_ddp_two_processes_run_the_itc_warmup(tmp_path, features, tiny_backbone):
    """Under torchrun (gloo, 2 processes) an itc-alone step leaves the joint pass's parameters out of the graph
    but in DDP's reduction (at zero), so the run neither hangs nor errors, and TIA joins after the warm-up."""
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "fashionbert.train",
                           *cli_args(features, out, tiny_backbone, "--steps", 3, "--checkpoint-every", 0, "--prefetch", 0,
                                     "--matching-only", "--itc-warmup", 2)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "itc alone for the first 2 steps (--itc-warmup)" in proc.stderr
    recs = _train_records(out)
    assert [r["loss_tia"] is None for r in recs] == [True, True, False]
    assert [r["pairs"] for r in recs] == [8, 8, 16]  # 2 ranks x 4 positives, then + as many mined
    # the joint pass's parameters joined DDP's reduction at zero, then were dropped: AdamW did not count those steps
    steps = adam_steps(ckpt.latest_checkpoint(out))
    assert steps["tia_head.agreement_scale"] == 1 and steps["itc_head.text_proj.weight"] == 3
    assert all(v is None for name, v in steps.items() if name.startswith(("mlm_head.", "mpm_head.")))

"""`train --joint-lr`: the learning-rate schedule starts again at the first joint step after --itc-warmup (a warm-up
from where it stands to the new peak, then linear decay to 0). The schedule against hand-computed values; a run logs
that rate and trains its itc-alone steps exactly as without the option; --resume across the restart is bitwise (a
resumed run sets the rate of its first step from the current schedule, also when --steps changed) and refuses a
mismatch; the option's misuses get one message each."""
from __future__ import annotations

import json

import pytest
import torch

from fashionbert.errors import UserError
from fashionbert.train import checkpoint as ckpt
from fashionbert.train.optim import lr_lambda
from fashionbert.train.trainer import run
from tests.test_train import _train_records, assert_same_weights, features, make_args, resumed_copy  # noqa: F401 (features: fixture)

torch.set_num_threads(1)

LR = 1e-3  # make_args' --lr


def test_the_schedule_without_a_restart_is_warm_up_then_linear_decay():
    f = lr_lambda(2, 10)
    assert [f(s) for s in range(10)] == pytest.approx([0.5, 1.0, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8])
    assert [lr_lambda(2, 10, 6, 0.0)(s) for s in range(10)] == [f(s) for s in range(10)]


def test_the_restart_warms_up_from_where_the_schedule_stands_then_decays_to_zero():
    # warm-up 2 steps, 10 in all, restart at step 6 to 2x: the base schedule stands at 4/8 there.
    f = lr_lambda(2, 10, 6, 2.0)
    start = 4 / 8
    expected = [0.5, 1.0, 1.0, 7 / 8, 6 / 8, 5 / 8,  # the base schedule, untouched before the restart
                start + (2.0 - start) * 1 / 2, 2.0,  # the warm-up to the new peak
                2.0 * 2 / 2, 2.0 * 1 / 2]  # linear decay over the 2 steps left, to 0 at step 10
    assert [f(s) for s in range(10)] == pytest.approx(expected)
    assert f(10) == 0.0


def _options(out) -> dict:
    return json.loads((ckpt.latest_checkpoint(out) / ckpt.STATE_JSON).read_text())["options"]


ARGS = ("--steps", 6, "--checkpoint-every", 2, "--val-every", 0, "--matching-only", "--itc-warmup", 2,
        "--warmup", 1)


def test_a_run_logs_the_restarted_rate_and_its_itc_alone_steps_are_untouched(tmp_path, features, tiny_backbone):

    run(make_args(features, tmp_path / "restart", tiny_backbone, *ARGS, "--joint-lr", 2e-3))
    run(make_args(features, tmp_path / "plain", tiny_backbone, *ARGS))
    restarted, plain = _train_records(tmp_path / "restart"), _train_records(tmp_path / "plain")
    schedule = lr_lambda(1, 6, 2, 2.0)
    assert [r["lr"] for r in restarted] == pytest.approx([LR * schedule(s) for s in range(6)])
    assert [r["lr"] for r in restarted][:2] == [r["lr"] for r in plain][:2]
    assert [r["loss"] for r in restarted][:2] == [r["loss"] for r in plain][:2]
    assert restarted[2]["lr"] == pytest.approx(2e-3) and plain[2]["lr"] == pytest.approx(LR * 4 / 5)
    assert_same_weights(tmp_path / "restart" / "checkpoints" / "step-0000002",
                        tmp_path / "plain" / "checkpoints" / "step-0000002")
    assert _options(tmp_path / "restart")["joint_lr"] == 2e-3 and _options(tmp_path / "plain")["joint_lr"] == 0.0


def test_resume_at_the_restart_is_bitwise_and_refuses_a_mismatch(tmp_path, features, tiny_backbone):
    """Killed at the switch (newest checkpoint: step 2, the last itc-alone step; its optimizer holds the old rate for
    the next step) and resumed, the run reaches the uninterrupted weights, losses and rates."""

    args = (*ARGS, "--joint-lr", 2e-3)
    out = tmp_path / "whole"
    run(make_args(features, out, tiny_backbone, *args))
    resumed = resumed_copy(out, tmp_path / "resumed", features, tiny_backbone, args,
                           drop=("step-0000004", "step-0000006"))
    assert_same_weights(out / "model", resumed / "model")
    assert [(r["loss"], r["lr"]) for r in _train_records(out)] == [(r["loss"], r["lr"]) for r in _train_records(resumed)]
    with pytest.raises(UserError, match=r"--joint-lr 0\.0 \(checkpoint: 0\.002\)"):
        run(make_args(features, resumed, tiny_backbone, *ARGS, "--resume"))


def test_a_resumed_run_takes_its_first_rate_from_the_current_schedule(tmp_path, features, tiny_backbone):
    """A run resumed with more --steps follows the longer schedule from its first resumed step on (the checkpoint's
    optimizer holds the rate the shorter schedule set for that step)."""
    args = ("--checkpoint-every", 2, "--val-every", 0, "--matching-only", "--warmup", 1)
    out = tmp_path / "short"
    run(make_args(features, out, tiny_backbone, "--steps", 4, *args))
    run(make_args(features, out, tiny_backbone, "--steps", 8, *args, "--resume"))
    rates = [r["lr"] for r in _train_records(out)]
    assert rates[4:] == pytest.approx([LR * lr_lambda(1, 8)(s) for s in range(4, 8)])


def test_misuses_get_one_message_each(tmp_path, features, tiny_backbone):
    with pytest.raises(UserError, match="--joint-lr restarts .* no --itc-warmup steps"):
        run(make_args(features, tmp_path / "no-warmup", tiny_backbone, "--steps", 4, "--joint-lr", 1e-3))
    with pytest.raises(UserError, match=r"--joint-lr -0\.001: must be >= 0"):
        run(make_args(features, tmp_path / "negative", tiny_backbone, "--steps", 4, "--itc-warmup", 2,
                      "--joint-lr", -1e-3))
    with pytest.raises(UserError, match=r"--joint-lr needs --lr > 0"):
        run(make_args(features, tmp_path / "no-lr", tiny_backbone, "--steps", 4, "--itc-warmup", 2, "--lr", 0,
                      "--joint-lr", 1e-3))

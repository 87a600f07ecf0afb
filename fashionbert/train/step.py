"""One optimizer step: --grad-accum micro-batches (forward, task weights, backward), clip, AdamW, schedule."""
from __future__ import annotations

import contextlib
import dataclasses
import time

import numpy as np
import torch

from fashionbert.data.batching import Batch
from fashionbert.runtime import Runtime
from fashionbert.train.state import TrainState

# The tasks that match text to image; the warm-up trains these alone.
MATCHING_TASKS = ("tia", "itc")


@dataclasses.dataclass
class StepResult:
    """A step's numbers, per task in `model.tasks` order, averaged over its micro-batches."""
    losses: torch.Tensor  # also averaged over processes; nan for a task the step did not train
    weights: torch.Tensor  # task weights
    n: torch.Tensor  # the adaptive weights' n_i (zeros in the warm-up)
    grad_norm: float  # before clipping
    lr: float  # the rate this step used
    pairs: float  # rows over all processes
    seconds: float


def train_step(state: TrainState, rt: Runtime) -> StepResult:
    t0 = time.perf_counter()
    accum = state.config.grad_accum
    tasks = state.tasks
    micro_step = state.objective.micro_step or _micro_step
    task_sum, w_sum, n_sum = torch.zeros(len(tasks)), torch.zeros(len(tasks)), torch.zeros(len(tasks))
    rows = 0
    with state.model.attention(rt.training_attention):  # the step's own; validation and scoring keep sdpa
        for micro in range(accum):
            batch = next(state.batches).to(rt.device)
            losses, weights, n, mined = micro_step(state, rt, batch, last=micro == accum - 1)
            task_sum += losses
            w_sum += weights
            n_sum += n
            rows += batch.rows + mined
            state.position = batch.position
    clip = state.config.clip_grad if state.config.clip_grad > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), clip)
    lr = state.optimizer.param_groups[0]["lr"]  # the rate this step uses (a resumed run sets it from its schedule)
    state.optimizer.step()
    state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    reduced = rt.all_reduce_mean(torch.cat([task_sum / accum, torch.tensor([float(rows)])]))
    return StepResult(losses=reduced[: len(tasks)], weights=w_sum / accum, n=n_sum / accum,
                      grad_norm=float(grad_norm), lr=lr, pairs=float(reduced[-1]) * rt.world,
                      seconds=time.perf_counter() - t0)


def _micro_step(state: TrainState, rt: Runtime, batch: Batch, last: bool):
    """Forward and backward of one micro-batch -> (per-task losses, task weights, n, mined negative rows); the
    pretraining objective's."""
    tasks = state.model.tasks
    # DDP syncs gradients only on the last micro-batch of a step.
    sync = contextlib.nullcontext() if (not rt.distributed or last) else state.train_model.no_sync()
    with sync:
        torch.manual_seed(step_seed(state.config.seed, rt.rank, batch.index))  # dropout: same draws on resume
        state.weighter.reset()
        itc_alone = state.step < state.itc_steps
        with rt.autocast():
            output = state.train_model(**batch.model_inputs(joint=not itc_alone), itc_queue=state.queue,
                                       mining_bank=state.bank_in_use)
        if itc_alone:
            total, weights, n = _itc_alone(state, output.losses)
        elif batch.tia_only:
            total, weights, n = _matching_only(state, output.losses)
        else:
            total, weights, n = state.weighter(output.losses)
        idle = _unreached_parameters(state, total) if rt.distributed and (itc_alone or batch.tia_only) else []
        ((total + 0.0 * sum(p.sum() for p in idle)) / state.config.grad_accum).backward()
        # The itc-alone and matching-only losses never read the probe's records: drop them now, or the last step's
        # activations outlive it, held through validation (and a bf16 scorer's copy of the model fails on them).
        state.weighter.reset()
    if last:
        for p in idle:  # after DDP's reduction: the optimizer skips them, as a single process does
            p.grad = None
    nan = torch.tensor(float("nan"))
    losses = torch.stack([output.losses[t].detach().float().cpu() if t in output.losses else nan for t in tasks])
    return losses, weights, n, output.mined


def _matching_only(state: TrainState, losses: dict[str, torch.Tensor]):
    """The warm-up's loss: the matching tasks, equal weights -> (total, weights, n)."""
    tasks = state.model.tasks
    matching = [t for t in tasks if t in MATCHING_TASKS]
    weights = torch.tensor([1.0 / len(matching) if t in matching else 0.0 for t in tasks])
    total = sum(w.item() * losses[t] for w, t in zip(weights, tasks) if w > 0)
    return total, weights, torch.zeros(len(tasks))


def _itc_alone(state: TrainState, losses: dict[str, torch.Tensor]):
    """An --itc-warmup step's loss: the contrastive task alone -> (total, weights, n)."""
    tasks = state.model.tasks
    weights = torch.tensor([1.0 if t == "itc" else 0.0 for t in tasks])
    return losses["itc"], weights, torch.zeros(len(tasks))


def _unreached_parameters(state: TrainState, loss: torch.Tensor) -> list[torch.nn.Parameter]:
    """The trained parameters `loss` does not reach (the MLM and MPM heads in a matching step; the joint pass's and
    the heads' in an itc-alone step). Under DDP the step joins them to the graph at zero cost, since every process
    must reduce every parameter, and drops their gradients after the reduction: AdamW then skips them as it does on
    one process. Zero gradients would not be the same: AdamW would count the step for them and decay them, so a
    head that first trains after the itc-alone steps would start with bias corrections for ~1,500 steps it never
    took (its first updates up to ~6x the rate)."""
    reached, seen, stack = set(), set(), [loss.grad_fn]
    while stack:  # the autograd graph back from the loss: a parameter is reached where its AccumulateGrad node is
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:
            reached.add(id(variable))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return [p for p in state.model.parameters() if p.requires_grad and id(p) not in reached]


def step_seed(seed: int, rank: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, rank, index, 0xD209]).generate_state(1)[0])

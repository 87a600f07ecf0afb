"""Task weights for the MLM + MPM + TIA (+ itc) loss (FashionBERT's "adaptive loss").

Each batch the weights solve  min_w 1/2 sum_i (aK - n_i) w_i^2  s.t.  sum_i w_i = 1  (K tasks, a = 1), whose
closed form is  w_i = (aK - n_i)^-1 / sum_j (aK - n_j)^-1.  A task with a larger n_i gets a larger weight.
The weights are treated as constants in the backward pass (they are a per-batch solution, not a parameter).

Three ways to get n:

- `adaptive-grad` (the paper): n_i is task i's squared gradient norm on a shared parameter set. The set is the
  weight matrix of the last encoder layer's FFN output projection (`bert.encoder.layer[-1].output.dense`).
  Why that one: it is the last matrix all the tasks share (after it only LayerNorm, then the task heads), so
  its gradient is the closest parameter-space measure of how hard each task pulls on the shared encoder, and it
  is cheap: the per-task gradient only needs a backward through the small heads and one LayerNorm, and the
  weight gradient is computed as X^T dY from the layer's saved input X and dY = dL_i/d(output), with no extra
  backward through the encoder and without touching `.grad` (so it works under DDP, whose reducer only sees
  the single real backward).
  Scaling: raw squared norms differ between tasks by orders of magnitude (a 30k-way softmax against a 2-way
  one) and drift over training, so no fixed a makes aK - n_i > 0 on every batch. n is therefore taken as each
  task's share of the total, n_i = g_i / sum_j g_j in [0, 1]: aK - n_i >= K - 1 > 0 for K >= 2, the weights are
  invariant to the loss scale, and n lives on the same [0, 1] scale as the official code's softmax(losses)^2.
- `adaptive-loss` (the official code's stand-in): n = softmax(losses)^2, computed on the detached losses.
- `fixed`: w_i = 1/K.

Under DDP the n vector is averaged across ranks before the closed form, so every rank scales its loss alike.
"""
from __future__ import annotations

from typing import Sequence

import torch

MODES = ("adaptive-grad", "adaptive-loss", "fixed")


def closed_form_weights(n: torch.Tensor, a: float = 1.0) -> torch.Tensor:
    """w_i = (aK - n_i)^-1 / sum_j (aK - n_j)^-1; refuses n with aK - n_i <= 0 (the QP is then not convex)."""
    n = n.detach().double()
    k = n.numel()
    d = a * k - n
    if bool((d <= 0).any()):
        raise ValueError(f"adaptive weights need aK - n_i > 0 (a={a}, K={k}, n={n.tolist()})")
    inv = 1.0 / d
    return (inv / inv.sum()).float()


def n_from_losses(losses: torch.Tensor) -> torch.Tensor:
    """The official FashionBERT code's n: softmax over the task losses, squared."""
    return torch.softmax(losses.detach().float(), dim=0) ** 2


def n_from_grad_norms(sq_norms: torch.Tensor) -> torch.Tensor:
    """Squared gradient norms -> shares in [0, 1] (see the module doc for why)."""
    g = sq_norms.detach().double().clamp_min(0.0)
    total = g.sum()
    if not torch.isfinite(total) or total <= 0:
        return torch.full_like(g, 1.0 / g.numel()).float()
    return (g / total).float()


class SharedLayerProbe:
    """Keeps the input and output of every training-mode pass through the shared Linear since the last `clear`.

    Several passes per batch are normal: the itc task runs the encoder on the text alone and on the image alone
    besides the joint pass, and the weight's gradient is the sum over passes of dY_k^T X_k.
    """

    def __init__(self, linear: torch.nn.Linear):
        self.linear = linear
        self.records: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._handle = linear.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        if module.training and torch.is_grad_enabled():
            self.records.append((inputs[0], output))

    def clear(self) -> None:
        self.records = []

    def remove(self) -> None:
        self._handle.remove()

    def weight_grad_sq_norms(self, losses: Sequence[torch.Tensor]) -> torch.Tensor:
        """||dL_i/dW||_F^2 for each loss, W the probed Linear's weight, via dW = sum_k dY_k^T X_k."""
        if not self.records:
            raise RuntimeError("SharedLayerProbe: no forward recorded (model in eval mode or no_grad?)")
        xs = [x.detach().reshape(-1, x.shape[-1]).float() for x, _ in self.records]
        outputs = [y for _, y in self.records]
        device = xs[0].device
        norms = []
        for loss in losses:
            if not loss.requires_grad:
                norms.append(torch.zeros((), device=device))
                continue
            grads = torch.autograd.grad(loss, outputs, retain_graph=True, allow_unused=True)
            dw = None
            for x, dy in zip(xs, grads):
                if dy is not None:
                    part = dy.reshape(-1, dy.shape[-1]).float().t() @ x
                    dw = part if dw is None else dw + part
            norms.append(torch.zeros((), device=device) if dw is None else dw.pow(2).sum())
        return torch.stack(norms)


def shared_linear(model: torch.nn.Module) -> torch.nn.Linear:
    """The parameter set adaptive-grad measures on: the last encoder layer's FFN output projection, or with the joint
    pass's own fusion layers the last layer below them (the last one every task's gradient reaches)."""
    inner = getattr(model, "module", model)
    if getattr(inner, "fusion_layers", None) is not None:
        return inner.bert.encoder.layer[int(inner.config.fusion_layer) - 1].output.dense
    return inner.bert.encoder.layer[-1].output.dense


class TaskWeighter:
    """Computes the per-batch task weights for one of MODES and the weighted total loss."""

    def __init__(self, mode: str, model: torch.nn.Module | None = None, tasks: Sequence[str] = ("mlm", "mpm", "tia"),
                 a: float = 1.0, distributed: bool = False):
        if mode not in MODES:
            raise ValueError(f"task weight mode {mode!r}; choose one of {MODES}")
        self.mode = mode
        self.tasks = tuple(tasks)
        self.a = a
        self.distributed = distributed
        self.probe = SharedLayerProbe(shared_linear(model)) if mode == "adaptive-grad" else None

    def n(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        stacked = [losses[t] for t in self.tasks]
        if self.mode == "fixed":
            return torch.zeros(len(self.tasks))
        if self.mode == "adaptive-loss":
            vals = torch.stack([l.detach().float() for l in stacked])
            vals = self._mean_over_ranks(vals)
            return n_from_losses(vals).cpu()
        sq = self.probe.weight_grad_sq_norms(stacked)
        sq = self._mean_over_ranks(sq.detach().float())
        return n_from_grad_norms(sq).cpu()

    def _mean_over_ranks(self, v: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            import torch.distributed as dist

            v = v.clone()
            dist.all_reduce(v, op=dist.ReduceOp.SUM)
            v /= dist.get_world_size()
        return v

    def reset(self) -> None:
        """Forget recorded passes; call before each training forward (batches that skip the weighting, such as
        the TIA warm-up, would otherwise pile up activations)."""
        if self.probe is not None:
            self.probe.clear()

    def __call__(self, losses: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (weighted total loss, weights (K,), n (K,)); weights are constants for the backward."""
        n = self.n(losses)
        weights = closed_form_weights(n, self.a)
        if self.probe is not None:
            self.probe.clear()
        total = sum(w.item() * losses[t] for w, t in zip(weights, self.tasks))
        return total, weights, n

"""Adaptive task weights: the closed form on given n, its constraints, and each way of getting n."""
import math

import pytest
import torch

from fashionbert.train.adaptive_loss import (MODES, SharedLayerProbe, TaskWeighter, closed_form_weights,
                                             n_from_grad_norms, n_from_losses)

torch.set_num_threads(1)


def test_closed_form_on_given_n():
    n = torch.tensor([0.2, 0.5, 0.1])
    # aK - n = [2.8, 2.5, 2.9]; w_i = (1/d_i) / sum_j (1/d_j), worked out by hand.
    inv = [1 / 2.8, 1 / 2.5, 1 / 2.9]
    expected = [v / sum(inv) for v in inv]
    w = closed_form_weights(n)
    assert w.tolist() == pytest.approx(expected, abs=1e-6)
    assert w.tolist() == pytest.approx([0.3241, 0.3630, 0.3129], abs=1e-4)
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-6)


def test_closed_form_solves_the_qp():
    # KKT of min 1/2 sum (aK - n_i) w_i^2 s.t. sum w = 1: (aK - n_i) w_i is the same for every i.
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        n = torch.rand(3, generator=g)
        w = closed_form_weights(n, a=1.0)
        lam = (3 - n.double()) * w.double()
        assert torch.allclose(lam, lam[0].expand(3), atol=1e-6)
        assert bool((w > 0).all())
        assert float(w.sum()) == pytest.approx(1.0, abs=1e-6)
        # larger n -> larger weight, as in the paper's formulation
        assert torch.equal(torch.argsort(n), torch.argsort(w))


def test_equal_n_gives_equal_weights_and_bad_n_is_refused():
    assert closed_form_weights(torch.zeros(3)).tolist() == pytest.approx([1 / 3] * 3)
    with pytest.raises(ValueError):
        closed_form_weights(torch.tensor([3.0, 0.0, 0.0]))  # aK - n_0 = 0


def test_n_from_losses_is_softmax_squared():
    losses = torch.tensor([math.log(1.0), math.log(2.0), math.log(5.0)])  # softmax = [1, 2, 5] / 8
    assert n_from_losses(losses).tolist() == pytest.approx([(1 / 8) ** 2, (2 / 8) ** 2, (5 / 8) ** 2])


def test_n_from_grad_norms_is_a_share_and_keeps_weights_positive():
    n = n_from_grad_norms(torch.tensor([1e6, 1.0, 1e-6]))  # wildly different raw scales
    assert float(n.sum()) == pytest.approx(1.0)
    assert bool((n >= 0).all()) and bool((n <= 1).all())
    w = closed_form_weights(n)
    assert bool((w > 0).all())
    assert n_from_grad_norms(torch.zeros(3)).tolist() == pytest.approx([1 / 3] * 3)


def test_probe_gradient_norm_equals_parameter_gradient():
    torch.manual_seed(0)
    shared = torch.nn.Linear(5, 4)
    heads = [torch.nn.Linear(4, 1) for _ in range(3)]
    probe = SharedLayerProbe(shared)
    x = torch.randn(2, 3, 5)
    h = shared(x)
    losses = [(head(h) ** 2).mean() * (i + 1) for i, head in enumerate(heads)]
    got = probe.weight_grad_sq_norms(losses)
    for i, loss in enumerate(losses):
        (g,) = torch.autograd.grad(loss, shared.weight, retain_graph=True)
        assert float(got[i]) == pytest.approx(float(g.pow(2).sum()), rel=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_weighter_modes(mode):
    torch.manual_seed(0)

    class Tiny(torch.nn.Module):  # just enough structure for shared_linear(): bert.encoder.layer[-1].output.dense
        def __init__(self):
            super().__init__()
            layer = torch.nn.Module()
            layer.output = torch.nn.Module()
            layer.output.dense = torch.nn.Linear(3, 3)
            self.bert = torch.nn.Module()
            self.bert.encoder = torch.nn.Module()
            self.bert.encoder.layer = torch.nn.ModuleList([layer])

    model = Tiny()
    weighter = TaskWeighter(mode, model)
    h = model.bert.encoder.layer[0].output.dense(torch.randn(4, 3))
    losses = {"mlm": h.pow(2).mean() * 10, "mpm": h.abs().mean(), "tia": h.sum() * 0.01}
    total, w, n = weighter(losses)
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-6) and bool((w > 0).all())
    assert torch.allclose(w, closed_form_weights(n))
    expected = sum(float(w[i]) * float(losses[t].detach()) for i, t in enumerate(("mlm", "mpm", "tia")))
    assert total.item() == pytest.approx(expected, rel=1e-5)
    if mode == "fixed":
        assert w.tolist() == pytest.approx([1 / 3] * 3)
    else:
        assert int(torch.argmax(w)) == 0  # the MLM stand-in dominates both loss and gradient here
    total.backward()  # the weights are constants: one ordinary backward works

"""NovoGrad: NeMo's update rule step by step on small tensors, weight decay, state round trip, training."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate
from torch import nn
from training_helpers import compose_train

from kws_lightning.optim import NovoGrad


def reference_steps(
    w0: list[float], grads: list[list[float]], lr: float, b1: float, b2: float, wd: float, eps: float = 1e-8
) -> list[list[float]]:
    """NeMo's Novograd on one tensor, in plain Python floats: the weights after each step."""
    w, m, v = list(w0), [0.0] * len(w0), 0.0
    out = []
    for g in grads:
        norm = sum(x * x for x in g)
        v = norm if v == 0 else b2 * v + (1 - b2) * norm
        d = [gi / (math.sqrt(v) + eps) + wd * wi for gi, wi in zip(g, w, strict=True)]
        m = [b1 * mi + di for mi, di in zip(m, d, strict=True)]
        w = [wi - lr * mi for wi, mi in zip(w, m, strict=True)]
        out.append(w)
    return out


def run_steps(optimizer: NovoGrad, param: nn.Parameter, grads: list[list[float]]) -> list[list[float]]:
    out = []
    for g in grads:
        param.grad = torch.tensor(g, dtype=torch.float64)
        optimizer.step()
        out.append(param.detach().tolist())
    return out


GRADS = [[3.0, -4.0], [1.0, 0.5], [-2.0, 2.0], [0.3, 0.1]]


def test_steps_match_a_hand_computed_reference() -> None:
    param = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    optimizer = NovoGrad([param], lr=0.05, betas=(0.95, 0.5), weight_decay=0.0)
    got = run_steps(optimizer, param, GRADS)
    # First step by hand (eps = 1e-8 aside): v = ||g||^2 = 25, d = g / 5 = [0.6, -0.8], m = d, w -= 0.05 m.
    assert got[0] == pytest.approx([1.0 - 0.03, -2.0 + 0.04], abs=1e-9)
    # Second: v = 0.5 * 25 + 0.5 * 1.25 = 13.125; m = 0.95 m + g / sqrt(v).
    m2 = [0.95 * 0.6 + 1.0 / math.sqrt(13.125), 0.95 * -0.8 + 0.5 / math.sqrt(13.125)]
    assert got[1] == pytest.approx([got[0][0] - 0.05 * m2[0], got[0][1] - 0.05 * m2[1]], abs=1e-9)
    expected = reference_steps([1.0, -2.0], GRADS, lr=0.05, b1=0.95, b2=0.5, wd=0.0)
    for g, e in zip(got, expected, strict=True):
        assert g == pytest.approx(e, abs=1e-12)
    # The moment is one number per tensor (layer-wise), not one per element as in Adam.
    assert optimizer.state[param]["exp_avg_sq"].shape == ()
    # p.grad is left as given (NeMo divides it in place).
    assert param.grad.tolist() == GRADS[-1]


def test_weight_decay_adds_wd_times_the_weights_to_the_normalised_gradient() -> None:
    param = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    got = run_steps(NovoGrad([param], lr=0.05, betas=(0.95, 0.5), weight_decay=0.1), param, GRADS)
    expected = reference_steps([1.0, -2.0], GRADS, lr=0.05, b1=0.95, b2=0.5, wd=0.1)
    for g, e in zip(got, expected, strict=True):
        assert g == pytest.approx(e, abs=1e-12)
    # First step: the decay term moves each weight by lr * wd * w beyond the plain step.
    plain = reference_steps([1.0, -2.0], GRADS[:1], lr=0.05, b1=0.95, b2=0.5, wd=0.0)[0]
    assert [p - g for p, g in zip(plain, got[0], strict=True)] == pytest.approx([0.005, -0.01], abs=1e-9)
    # With a zero gradient only the decay acts: the weights shrink towards 0.
    param = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    optimizer = NovoGrad([param], lr=0.1, weight_decay=0.5)
    run_steps(optimizer, param, [[0.0, 0.0]])
    assert param.tolist() == pytest.approx([0.95, -1.9], abs=1e-12)


def test_grad_averaging_and_amsgrad_variants() -> None:
    param = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    got = run_steps(NovoGrad([param], lr=0.05, betas=(0.9, 0.5), grad_averaging=True), param, GRADS[:1])
    assert got[0] == pytest.approx([1.0 - 0.05 * 0.1 * 0.6, -2.0 + 0.05 * 0.1 * 0.8], abs=1e-9)
    # amsgrad: normalise by the largest v so far; with a shrinking gradient the steps keep the old scale.
    param = nn.Parameter(torch.tensor([0.0], dtype=torch.float64))
    optimizer = NovoGrad([param], lr=1.0, betas=(0.0, 0.5), amsgrad=True)
    run_steps(optimizer, param, [[4.0], [1.0]])
    assert float(optimizer.state[param]["exp_avg_sq"]) == 8.5  # 0.5 * 16 + 0.5 * 1
    assert float(optimizer.state[param]["max_exp_avg_sq"]) == 16.0
    assert param.item() == pytest.approx(-1.0 - 1.0 / 4.0)  # step 2: 1 / sqrt(16), not 1 / sqrt(8.5)


def test_state_dict_round_trip_continues_identically() -> None:
    torch.manual_seed(0)
    grads = [torch.randn(3, 4) for _ in range(6)]

    def make() -> tuple[nn.Linear, NovoGrad]:
        torch.manual_seed(1)
        layer = nn.Linear(4, 3)
        return layer, NovoGrad(layer.parameters(), lr=0.05, betas=(0.95, 0.5), weight_decay=1e-3)

    def step(layer: nn.Linear, optimizer: NovoGrad, grad: torch.Tensor) -> None:
        layer.weight.grad, layer.bias.grad = grad, grad.sum(dim=1)
        optimizer.step()

    straight, opt_straight = make()
    for grad in grads:
        step(straight, opt_straight, grad)

    first, opt_first = make()
    for grad in grads[:3]:
        step(first, opt_first, grad)
    saved = {"model": first.state_dict(), "optimizer": opt_first.state_dict()}
    resumed, opt_resumed = make()
    resumed.load_state_dict(saved["model"])
    opt_resumed.load_state_dict(saved["optimizer"])
    assert opt_resumed.state[resumed.weight]["step"] == 3
    for grad in grads[3:]:
        step(resumed, opt_resumed, grad)
    torch.testing.assert_close(resumed.weight, straight.weight, rtol=0, atol=0)
    torch.testing.assert_close(resumed.bias, straight.bias, rtol=0, atol=0)


def test_config_trains_a_small_classifier() -> None:
    cfg = compose_train("optimizer=novograd")
    assert cfg.optimizer.lr == 0.05 and list(cfg.optimizer.betas) == [0.95, 0.5]
    torch.manual_seed(0)
    inputs = torch.randn(64, 8)
    targets = (inputs[:, 0] + inputs[:, 1] > 0).long()
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    optimizer = instantiate(cfg.optimizer)(params=model.parameters())
    assert isinstance(optimizer, NovoGrad)
    losses = []
    for _ in range(60):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs), targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses[::10]
    assert (model(inputs).argmax(dim=1) == targets).float().mean() > 0.95


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"lr": -1.0}, "optimizer.lr"), ({"betas": (0.9, 1.0)}, "optimizer.betas"), ({"eps": -1}, "eps")],
)
def test_rejects_bad_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NovoGrad([nn.Parameter(torch.zeros(1))], **kwargs)

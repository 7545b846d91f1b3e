"""Logit KD (methods.md §1) against an independent float64 computation."""

import math

import pytest
import torch

from shd_vision.distill.logit import kd_loss


def reference_kd(zs, zt, t):
    """T² · mean_b Σ_c p_t log(p_t / p_s), written out with Python floats."""
    total = 0.0
    for row_s, row_t in zip(zs.tolist(), zt.tolist()):
        es = [math.exp(v / t) for v in row_s]
        et = [math.exp(v / t) for v in row_t]
        ps = [v / sum(es) for v in es]
        pt = [v / sum(et) for v in et]
        total += sum(a * math.log(a / b) for a, b in zip(pt, ps))
    return t * t * total / len(zs)


@pytest.mark.parametrize("t", [1.0, 2.0, 4.0])
def test_kd_loss_matches_reference(t):
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(5, 7, generator=g) * 3, torch.randn(5, 7, generator=g) * 3
    assert kd_loss(zs, zt, t).item() == pytest.approx(reference_kd(zs, zt, t), rel=1e-5)


def test_kd_loss_is_zero_for_equal_logits_and_positive_otherwise():
    z = torch.randn(4, 10)
    assert kd_loss(z, z.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(z, z.flip(-1), 4.0).item() > 0


def test_kd_loss_gradient_reaches_the_student_only():
    zs = torch.randn(3, 5, requires_grad=True)
    zt = torch.randn(3, 5, requires_grad=True)
    kd_loss(zs, zt, 2.0).backward()
    assert zs.grad is not None and zs.grad.abs().sum() > 0
    assert zt.grad is None
    # d/dz_s of T²·KL(p_t||p_s) over the batch mean is T·(p_s - p_t)/B
    ps, pt = torch.softmax(zs / 2.0, -1), torch.softmax(zt / 2.0, -1)
    torch.testing.assert_close(zs.grad, 2.0 * (ps - pt).detach() / 3)

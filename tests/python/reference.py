"""Shared helpers for the parity tests: an independent reference step and ulp distances.

`reference_step` is torch.optim.Adagrad's single-tensor arithmetic, op for op, with one change: the
square root is numpy's (IEEE, correctly rounded) instead of torch.sqrt, which on MKL builds goes
through vsSqrt and is not correctly rounded on every CPU. It is what our kernel must equal bitwise.
"""
import numpy as np
import torch


def ieee_sqrt(t: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.asarray(np.sqrt(t.contiguous().numpy())))


def reference_step(p, g, s, step, *, lr=1e-2, lr_decay=0.0, weight_decay=0.0, eps=1e-10,
                   maximize=False, eps_inside_sqrt=False):
    """One step on float32/float64 CPU tensors, in place. `step` is the count after the increment."""
    g = -g if maximize else g
    if weight_decay != 0:
        g = g.add(p, alpha=weight_decay)  # complex arithmetic for complex params, as in torch
    if torch.is_complex(p):
        p, g, s = torch.view_as_real(p), torch.view_as_real(g), torch.view_as_real(s)
    # A tensor lr stays a 0-d tensor, as torch's _to_scalar leaves it: the quotient is then
    # computed and rounded in the tensor's dtype (float32 for torch.tensor(0.01)).
    lr = lr.reshape(()) if torch.is_tensor(lr) else lr
    clr = lr / (1 + (step - 1) * lr_decay)
    clr = clr.item() if torch.is_tensor(clr) else clr
    s.addcmul_(g, g, value=1)
    std = ieee_sqrt(s + eps) if eps_inside_sqrt else ieee_sqrt(s).add_(eps)
    p.addcdiv_(g, std, value=-clr)


def assert_within_ulps(actual, expected, n, magnitude=None):
    """|actual - expected| <= n ulp, the ulp taken at max(|expected|, |magnitude|).

    A step p - u can cancel; an ulp of u then is many ulps of the small result, so per-step
    bounds are stated at the magnitude of the operands (pass the param before the step).
    """
    if actual.is_complex():
        actual, expected = torch.view_as_real(actual), torch.view_as_real(expected)
        magnitude = None if magnitude is None else torch.view_as_real(magnitude)
    scale = expected.abs() if magnitude is None else torch.maximum(expected.abs(), magnitude.abs())
    ulp = torch.nextafter(scale, torch.full_like(scale, float("inf"))) - scale
    diff = (actual - expected).abs()
    worst = (diff / ulp).max().item() if diff.numel() else 0.0
    assert worst <= n, f"{worst} ulp apart, allowed {n}"


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise distance in units in the last place between two float32/float64 tensors."""
    if a.is_complex():
        a, b = torch.view_as_real(a), torch.view_as_real(b)
    int_type = {torch.float32: torch.int32, torch.float64: torch.int64}[a.dtype]

    def ordered(x):
        i = x.contiguous().view(int_type).to(torch.int64)
        sign_bit = torch.iinfo(int_type).min
        return torch.where(i < 0, sign_bit - i, i)  # monotonic in the float value

    return (ordered(a) - ordered(b)).abs()


def assert_same(actual, expected):
    """Equal values, NaN where the other has NaN (NaN bits may differ between CPU and GPU): with
    float16's eps of 0, a g*g that underflows to 0 makes a step inf, and a later one inf - inf,
    as torch's own step does."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)

"""Numbers: FusedAdagrad against torch.optim.Adagrad, step by step and over many steps.

float32/float64. torch's for-loop takes its sqrt from MKL's vsSqrt, which on some CPUs is not
correctly rounded; our kernel (like torch's fused=True) uses the IEEE sqrt. So we check:
  * bitwise equality with `reference_step` (torch's arithmetic with an IEEE sqrt), every kernel;
  * bitwise equality with the for-loop wherever the for-loop and fused=True agree bitwise;
  * elsewhere: from the same state, one step gives the same `sum` bitwise and `param` within 2 ulp (of the
    step's largest term: the param before or after, or the update).
float16/bfloat16: math in float32, rounded to the dtype where torch's for-loop rounds; one step
from the same state within atol = rtol = 5e-3 of the for-loop (or 1 ulp of the dtype, which is
coarser than that for bfloat16 in the lower half of each binade), and 100 steps within 5e-3.
"""
import copy
import os
import subprocess
import sys

import pytest
import torch
from torch.testing._internal.common_optimizers import optim_inputs_func_adagrad

import fused_adagrad
from fused_adagrad import FusedAdagrad
from reference import assert_within_ulps, reference_step

TORCH_CONFIGS = [o.kwargs for o in optim_inputs_func_adagrad("cpu")]
EXTRA_CONFIGS = [
    dict(maximize=True),
    dict(eps=1e-3),
    dict(lr_decay=0.1),
    dict(initial_accumulator_value=0.5, lr=0.05),
    dict(lr=0.05, lr_decay=0.01, weight_decay=0.01, initial_accumulator_value=0.1, eps=1e-6,
         maximize=True),
]
CONFIGS = TORCH_CONFIGS + EXTRA_CONFIGS
SHAPES = [(), (0,), (1,), (15,), (17,), (1023,), (7, 33)]
FLOAT_TYPES = [torch.float32, torch.float64]


def config_id(kw):
    return "-".join(f"{k}={float(v) if torch.is_tensor(v) else v}" for k, v in kw.items()) or "default"


def fresh(kw):
    """Copies tensors in the config (a tensor lr would otherwise be shared between optimizers)."""
    return {k: v.clone() if torch.is_tensor(v) else v for k, v in kw.items()}


def grads(shape, dtype, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    draw = dtype if dtype.is_complex else torch.float64
    return [torch.randn(shape, generator=gen, dtype=draw).to(dtype) for _ in range(steps)]


def train(make_opt, p0, grad_seq, every_other_none=False):
    p = p0.clone()
    opt = make_opt([p])
    for i, g in enumerate(grad_seq):
        p.grad = None if every_other_none and i % 3 == 2 else g.clone()
        opt.step()
    return p, opt


@pytest.mark.parametrize("dtype", FLOAT_TYPES + [torch.complex64, torch.complex128])
@pytest.mark.parametrize("shape", SHAPES + [(1 << 20,)], ids=str)
@pytest.mark.parametrize("kw", CONFIGS + [dict(eps_inside_sqrt=True, weight_decay=0.1)], ids=config_id)
def test_bitwise_equal_to_reference(kw, shape, dtype):
    if shape == (1 << 20,) and kw not in (CONFIGS[0], CONFIGS[-1]):
        pytest.skip("the 1M-element shape runs with two configs only, to keep the suite fast")
    kw = fresh(kw)
    p0 = torch.randn(shape, dtype=dtype)
    seq = grads(shape, dtype, 10)
    p, opt = train(lambda ps: FusedAdagrad(ps, **kw), p0, seq)

    ref_p = p0.clone()
    init = kw.get("initial_accumulator_value", 0.0)
    ref_sum = torch.full_like(ref_p, complex(init, init) if dtype.is_complex else init)
    ref_kw = {k: v for k, v in kw.items() if k != "initial_accumulator_value"}
    for step, g in enumerate(seq, start=1):
        reference_step(ref_p, g, ref_sum, step, **ref_kw)
    assert torch.equal(opt.state[p]["sum"], ref_sum)
    assert torch.equal(p, ref_p)
    assert opt.state[p]["step"].item() == len(seq)


@pytest.mark.parametrize("dtype", FLOAT_TYPES)
@pytest.mark.parametrize("kw", CONFIGS, ids=config_id)
def test_bitwise_equal_to_for_loop_where_torch_paths_agree(kw, dtype):
    agreeing = 0
    for shape in SHAPES:
        p0 = torch.randn(shape, dtype=dtype)
        seq = grads(shape, dtype, 20)
        loop, _ = train(lambda ps: torch.optim.Adagrad(ps, foreach=False, **fresh(kw)), p0, seq)
        fused, _ = train(lambda ps: torch.optim.Adagrad(ps, fused=True, **fresh(kw)), p0, seq)
        ours, _ = train(lambda ps: FusedAdagrad(ps, **fresh(kw)), p0, seq)
        if torch.equal(loop, fused):
            agreeing += 1
            assert torch.equal(ours, loop), f"shape {shape}"
    assert agreeing > 0, "no shape where torch's for-loop and fused=True agree: the check is empty"


def steps_from_torch_state(ref, ref_opt, kw, grad_seq):
    """Steps torch's optimizer over grad_seq; before each step, a FusedAdagrad is made from a copy
    of torch's current param and state and takes the same step. Yields (ours, opt, param before)."""
    for g in grad_seq:
        ours, before = ref.clone(), ref.clone()
        opt = FusedAdagrad([ours], **fresh(kw))
        opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))
        ours.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
        yield ours, opt, before


def low_precision_config(kw, dtype):
    kw = dict(kw)
    if dtype == torch.float16:
        # torch's float16 for-loop rounds eps=1e-10 to 0 and divides by zero where g*g
        # underflows; with a representable eps there is something to compare.
        kw.setdefault("eps", 1e-4)
    return kw


@pytest.mark.parametrize("dtype", FLOAT_TYPES + [torch.complex64])
@pytest.mark.parametrize("shape", [(17,), (1023,), (64, 65)], ids=str)
@pytest.mark.parametrize("kw", CONFIGS, ids=config_id)
def test_each_step_within_2_ulp_of_for_loop(kw, shape, dtype):
    ref = torch.randn(shape, dtype=dtype)
    ref_opt = torch.optim.Adagrad([ref], foreach=False, **fresh(kw))
    for ours, opt, before in steps_from_torch_state(ref, ref_opt, kw, grads(shape, dtype, 30)):
        assert torch.equal(opt.state[ours]["sum"], ref_opt.state[ref]["sum"])
        # An ulp of the update can be two of a smaller result; bound it at the largest term.
        update = ref - before
        largest = torch.maximum(before.abs(), update.abs()) if not dtype.is_complex else None
        if dtype.is_complex:
            b, u = torch.view_as_real(before), torch.view_as_real(update)
            largest = torch.view_as_complex(torch.maximum(b.abs(), u.abs()).contiguous())
        assert_within_ulps(ours, ref, 2, magnitude=largest)
        assert torch.equal(opt.state[ours]["step"], ref_opt.state[ref]["step"])


def dtype_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of the dtype's values at x (float16/bfloat16), as float32."""
    mant_bits = {torch.float16: 10, torch.bfloat16: 7}[x.dtype]
    tiny = torch.finfo(x.dtype).tiny
    exp = torch.floor(torch.log2(x.float().abs().clamp_min(tiny)))
    return torch.exp2(exp - mant_bits)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kw", CONFIGS, ids=config_id)
def test_low_precision_each_step_close_to_for_loop(kw, dtype):
    kw = low_precision_config(kw, dtype)
    # A multiple of 64 elements: torch's result for an element depends on where it sits. Its
    # vectorized loop computes g + wd * p in float; its scalar tail (the last < 64 elements)
    # rounds to the dtype after each operation, which moves `sum` by a few ulp of the dtype.
    shape = (1024,)
    ref = torch.randn(shape, dtype=dtype)
    ref_opt = torch.optim.Adagrad([ref], foreach=False, **fresh(kw))
    for ours, opt, _ in steps_from_torch_state(ref, ref_opt, kw, grads(shape, dtype, 30)):
        for a, b in ((ours, ref), (opt.state[ours]["sum"], ref_opt.state[ref]["sum"])):
            allowed = torch.maximum(5e-3 + 5e-3 * b.float().abs(), dtype_ulp(b))
            assert ((a.float() - b.float()).abs() <= allowed).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kw", CONFIGS, ids=config_id)
def test_low_precision_100_steps_close_to_for_loop(kw, dtype):
    kw = low_precision_config(kw, dtype)
    p0 = torch.randn(1023, dtype=dtype)
    seq = grads((1023,), dtype, 100)
    loop, _ = train(lambda ps: torch.optim.Adagrad(ps, foreach=False, **fresh(kw)), p0, seq)
    ours, _ = train(lambda ps: FusedAdagrad(ps, **fresh(kw)), p0, seq)
    torch.testing.assert_close(ours, loop, atol=5e-3, rtol=5e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kw", CONFIGS + [dict(eps_inside_sqrt=True, weight_decay=0.1)], ids=config_id)
def test_low_precision_simd_body_bitwise_equal_to_scalar_tail(kw, dtype):
    """The kernel runs most elements in vectors (hand-written F16C ones for float16) and the last
    few one at a time. Params of one element take only the one-at-a-time path: stepping each
    element alone must give the numbers of stepping the whole tensor."""
    kw = low_precision_config(kw, dtype)
    n = 16 * 16 + 7
    p0 = torch.randn(n, dtype=dtype) * 4
    seq = grads((n,), dtype, 10)
    whole, opt = train(lambda ps: FusedAdagrad(ps, **fresh(kw)), p0, seq)
    singles = [p0[i:i + 1].clone() for i in range(n)]
    opt_singles = FusedAdagrad(singles, **fresh(kw))
    for g in seq:
        for i, p in enumerate(singles):
            p.grad = g[i:i + 1].clone()
        opt_singles.step()
    assert torch.equal(torch.cat(singles), whole)
    assert torch.equal(torch.cat([opt_singles.state[p]["sum"] for p in singles]),
                       opt.state[whole]["sum"])


@pytest.mark.parametrize("kw", CONFIGS, ids=config_id)
def test_many_steps_close_to_for_loop_with_skipped_grads(kw):
    """Over 100 steps, float64, with some steps where the param has no grad."""
    p0 = torch.randn(257, dtype=torch.float64)
    seq = grads((257,), torch.float64, 100)
    loop, ref_opt = train(lambda ps: torch.optim.Adagrad(ps, foreach=False, **fresh(kw)), p0, seq, True)
    ours, opt = train(lambda ps: FusedAdagrad(ps, **fresh(kw)), p0, seq, True)
    torch.testing.assert_close(ours, loop, atol=0, rtol=1e-12)
    assert torch.equal(opt.state[ours]["step"], ref_opt.state[loop]["step"])


def _views():
    """(param as the user holds it, a buffer around it that must stay untouched or None)."""
    buffer = torch.zeros(10, 40)
    yield "transposed", torch.randn(20, 10).t(), None
    yield "permuted", torch.randn(3, 5, 7).permute(2, 0, 1), None
    strided = buffer[:, ::2]
    strided.copy_(torch.randn(10, 20))
    yield "strided-slice", strided, buffer[:, 1::2]
    offset = torch.zeros(1 + 1000)
    yield "starts-at-element-1", offset[1:].copy_(torch.randn(1000)), offset[:1]


@pytest.mark.parametrize("case", list(_views()), ids=lambda c: c[0] if isinstance(c, tuple) else "")
@pytest.mark.parametrize("grad_layout", ["contiguous", "like-param"])
def test_non_contiguous(case, grad_layout):
    _, ours, untouched = case
    untouched_before = None if untouched is None else untouched.clone()
    ref = ours.detach().clone().contiguous()
    kw = dict(lr=0.1, weight_decay=0.1)
    opt, ref_opt = FusedAdagrad([ours], **kw), torch.optim.Adagrad([ref], foreach=False, **kw)
    for g in grads(ours.shape, torch.float32, 5):
        ours.grad = g.clone() if grad_layout == "contiguous" else torch.empty_like(ours).copy_(g)
        ref.grad = g.clone()
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(opt.state[ours]["sum"], ref_opt.state[ref]["sum"], rtol=1e-5, atol=1e-6)
    if untouched is not None:
        assert torch.equal(untouched, untouched_before), "wrote outside the view"


def test_sum_with_other_strides_than_param():
    """A state loaded from a checkpoint may be contiguous while the param is transposed."""
    p = torch.randn(30, 20).t()
    ref = p.clone()
    opt, ref_opt = FusedAdagrad([p], lr=0.1), torch.optim.Adagrad([ref], lr=0.1, foreach=False)
    opt.state[p]["sum"] = torch.zeros(20, 30)  # contiguous, unlike p
    for g in grads(p.shape, torch.float32, 5):
        p.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(p, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(opt.state[p]["sum"], ref_opt.state[ref]["sum"], rtol=0, atol=0)
    assert opt.state[p]["sum"].is_contiguous()


def test_many_params_one_group_mixed_dtypes_and_sizes():
    params = [torch.randn(n, dtype=dt) for n in (0, 1, 5, 17, 1000, 40000)
              for dt in (torch.float32, torch.float64)]
    refs = [p.clone() for p in params]
    opt, ref_opt = FusedAdagrad(params, lr=0.1), torch.optim.Adagrad(refs, lr=0.1, fused=True)
    for step in range(5):
        for p, r in zip(params, refs):
            p.grad = torch.randn_like(p)
            r.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
    for p, r in zip(params, refs):
        assert torch.equal(p, r)


KERNEL_CAPABILITY = {"base": "default", "avx2": "avx2", "avx512": "avx512"}


def test_selected_kernel_follows_environment():
    forced = os.environ.get("FUSED_ADAGRAD_CPU_KERNEL")
    info = fused_adagrad.build_info()
    assert info["cpu_kernel"] in info["cpu_kernels_runnable"]
    assert info["cpu_kernels_runnable"] == info["cpu_kernels"][:len(info["cpu_kernels_runnable"])]
    if forced:
        assert info["cpu_kernel"] == forced
    else:  # the widest this CPU (or FUSED_ADAGRAD_MAX_ISA) allows
        assert info["cpu_kernel"] == info["cpu_kernels_runnable"][-1]


@pytest.mark.parametrize("kernel", ["base", "avx2", "avx512"])
def test_every_simd_kernel_is_bitwise_equal_to_reference(kernel):
    """Runs the bitwise tests in a child process with the kernel and torch's CPU capability forced
    to the same level (FMA or not), since both are chosen once per process."""
    if os.environ.get("FUSED_ADAGRAD_CPU_KERNEL"):
        pytest.skip("already running under a forced kernel")
    info = fused_adagrad.build_info()
    if kernel not in info["cpu_kernels"]:
        pytest.skip(f"{kernel} not compiled in")
    if kernel not in info["cpu_kernels_runnable"]:
        pytest.skip(f"this CPU cannot run the {kernel} kernel (it runs "
                    f"{', '.join(info['cpu_kernels_runnable'])})")
    env = {**os.environ, "FUSED_ADAGRAD_CPU_KERNEL": kernel,
           "ATEN_CPU_CAPABILITY": KERNEL_CAPABILITY[kernel]}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
         "-k", "bitwise_equal_to_reference or simd_body or selected_kernel or mixed_dtypes"],
        env=env, capture_output=True, text=True, cwd=os.path.dirname(__file__))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout

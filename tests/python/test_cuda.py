"""The CUDA kernel: FusedAdagrad on GPU against torch.optim.Adagrad, and its own guarantees
(GradScaler and torch.compile with CUDA graphs included).

Numbers. After 100 steps, within rtol = atol = 1e-6 of torch's for-loop and fused=True paths for
float32/float64/complex, and 5e-3 (or one ulp of the dtype) of the for-loop for float16/bfloat16:
torch's CUDA for-loop uses FMAs at other places than ours, so it agrees to tolerance, not bits.
Our CPU kernel does the same arithmetic as the CUDA one (IEEE sqrt and division, FMAs at the same
places), so on a CPU with FMA the two agree bitwise; misaligned and aligned copies of the same
data, CUDA-graph replay and eager steps, one launch and many, must agree bitwise too.

Skipped as a whole without a GPU or when the extension was built without CUDA (failed
instead with FUSED_ADAGRAD_REQUIRE_CUDA=1).
"""
import copy

import pytest
import torch

import fused_adagrad
from fused_adagrad import FusedAdagrad

from cuda_available import skip_or_fail_without_cuda
from reference import assert_same
from torch_support import needs_compilable_op

skip_or_fail_without_cuda()

DEV = torch.device("cuda")
OP = torch.ops.fused_adagrad.adagrad_step_
HYPER = dict(lr=0.1, lr_decay=0.0, weight_decay=0.0, eps=1e-10, maximize=False)
STEPS = 100
HALF_TYPES = [torch.float16, torch.bfloat16]
DTYPES = [torch.float32, torch.float64, *HALF_TYPES, torch.complex64, torch.complex128]
SHAPES = [(), (1,), (15,), (17,), (1023,), (33, 7)]
BIG = (1 << 20) + 3
CONFIGS = [
    dict(),
    dict(lr=0.1),
    dict(lr_decay=0.05),
    dict(weight_decay=0.1),
    dict(eps=1e-3),
    dict(maximize=True),
    dict(initial_accumulator_value=0.3),
    dict(lr="tensor"),
    dict(lr=0.05, lr_decay=0.01, weight_decay=0.01, initial_accumulator_value=0.1, eps=1e-6,
         maximize=True),
    dict(lr="tensor", lr_decay=0.05),  # the float32 clr division, step by step
]
# How the backend splits work into launches (eager steps take the large tables where usable):
# a list longer than one table needs several launches.
LAUNCH = fused_adagrad.build_info()["cuda_launch"]
EAGER_TABLE = "large" if LAUNCH["large_tables_usable"] else "small"
MAX_TENSORS_PER_LAUNCH = LAUNCH[f"{EAGER_TABLE}_table_tensors"]
MAX_CHUNKS_PER_LAUNCH = LAUNCH[f"{EAGER_TABLE}_table_chunks"]
CHUNK = LAUNCH["chunk_elements"]


def tol(dtype):
    if dtype in HALF_TYPES:
        return dict(rtol=5e-3, atol=5e-3)
    return dict(rtol=1e-6, atol=1e-6)


def assert_close(actual, expected, dtype):
    """assert_close with tol(dtype); for half/bfloat16 one ulp of the dtype is accepted too.

    A bfloat16 ulp is 2**-8 to 2**-7 of the value, coarser than 5e-3 in the lower part of each
    binade, so a single rounding that goes the other way (an FMA at a different place) would
    otherwise fail a sum of ~100 squared grads.
    """
    if dtype not in HALF_TYPES:
        torch.testing.assert_close(actual, expected, equal_nan=True, **tol(dtype))
        return
    a, b = actual.float(), expected.float()
    mantissa_bits = 7 if dtype == torch.bfloat16 else 10
    _, exponent = torch.frexp(b)
    ulp = torch.ldexp(torch.ones_like(b), (exponent - 1 - mantissa_bits).float())
    allowed = torch.maximum(5e-3 + 5e-3 * b.abs(), ulp)
    # float16 sums underflow to 0 where torch's do, giving inf or NaN params at the same places.
    same = (a == b) | (a.isnan() & b.isnan())
    bad = ~same & ~((a - b).abs() <= allowed)
    assert not bad.any(), f"{int(bad.sum())} {dtype} values beyond max(5e-3 + 5e-3 |x|, 1 ulp)"


def config_id(kw):
    return "-".join(f"{k}={v}" for k, v in kw.items()) or "default"


def resolve(kw, device):
    """The config with a fresh tensor lr on `device` when it asks for one."""
    kw = dict(kw)
    if kw.get("lr") == "tensor":
        kw["lr"] = torch.tensor(0.02, device=device)
    return kw


def rand(shape, dtype, gen, device=DEV):
    """Normal values of `dtype` (complex too), reproducible from `gen`."""
    draw = dtype if dtype.is_complex else torch.float32
    return torch.randn(shape, generator=gen, device=device, dtype=draw).to(dtype)


def initial_params(shapes, dtype, seed=0):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    # |p| < 1 keeps a bfloat16 ulp below the 5e-3 tolerance.
    return [(rand(s, dtype, gen) * 0.5).clamp(-0.9, 0.9) if not dtype.is_complex else
            rand(s, dtype, gen) * 0.5 for s in shapes]


def grad_sequence(params, steps, seed=1):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    return [[rand(p.shape, p.dtype, gen).to(p.device) for p in params] for _ in range(steps)]


def train(opt_cls, params, grads, **kw):
    """Steps a fresh optimizer over clones of `params` with the grads; returns params, optimizer."""
    ps = [p.clone() for p in params]
    opt = opt_cls(ps, **kw)
    for step_grads in grads:
        for p, g in zip(ps, step_grads):
            p.grad = None if g is None else g.clone()
        opt.step()
    return ps, opt


def assert_states_close(ours, theirs, opt_ours, opt_theirs):
    for p, q in zip(ours, theirs):
        assert_close(p, q, p.dtype)
        assert_close(opt_ours.state[p]["sum"], opt_theirs.state[q]["sum"], p.dtype)
        assert float(opt_ours.state[p]["step"]) == float(opt_theirs.state[q]["step"])


def snapshot(tensors):
    return [t.clone() for t in tensors]


def assert_all_equal(before, after):
    for a, b in zip(before, after):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Parity with torch.optim.Adagrad


@pytest.mark.parametrize("kw", CONFIGS, ids=config_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl", ["forloop", "fused"])
def test_parity_with_torch(impl, dtype, kw):
    torch_kw = dict(foreach=False) if impl == "forloop" else dict(fused=True)
    if impl == "fused" and dtype.is_complex:
        pytest.skip("torch's fused Adagrad takes real floating-point params only")
    if impl == "fused" and dtype in HALF_TYPES:
        pytest.skip("for float16/bfloat16 we round g, sum, sqrt and std to the dtype as torch's "
                    "for-loop does; torch's fused kernel keeps them in float32, so 100 steps of "
                    "the two drift apart by more than the tolerance")
    shapes = SHAPES + ([(BIG,)] if kw in (CONFIGS[0], CONFIGS[-1]) else [])
    params = initial_params(shapes, dtype)
    grads = grad_sequence(params, STEPS)
    try:
        theirs, opt_theirs = train(torch.optim.Adagrad, params, grads[:1], **resolve(kw, DEV),
                                   **torch_kw)
    except RuntimeError as e:
        if impl == "fused":
            pytest.skip(f"this torch has no fused CUDA Adagrad for {dtype}: {e}")
        raise
    for step_grads in grads[1:]:
        for p, g in zip(theirs, step_grads):
            p.grad = g.clone()
        opt_theirs.step()
    ours, opt_ours = train(FusedAdagrad, params, grads, **resolve(kw, DEV))
    assert_states_close(ours, theirs, opt_ours, opt_theirs)
    for p in ours:
        assert opt_ours.state[p]["step"].device == p.device


def reference_eps_inside_sqrt(params, grads, lr, weight_decay, maximize):
    """p -= lr * g / sqrt(sum + eps), written with torch ops in the param's dtype."""
    eps = 1e-6
    ps = [p.clone() for p in params]
    sums = [torch.zeros_like(p) for p in params]
    for step_grads in grads:
        for p, s, g in zip(ps, sums, step_grads):
            g = -g if maximize else g
            if weight_decay:
                g = g.add(p, alpha=weight_decay)
            pr, sr, gr = (torch.view_as_real(t) if t.is_complex() else t for t in (p, s, g))
            sr.addcmul_(gr, gr)
            pr.addcdiv_(gr, (sr + eps).sqrt(), value=-lr)
    return ps, sums


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weight_decay,maximize", [(0.0, False), (0.1, True)])
def test_eps_inside_sqrt_matches_handwritten_reference(dtype, weight_decay, maximize):
    params = initial_params(SHAPES + [(BIG,)], dtype)
    grads = grad_sequence(params, STEPS)
    ours, opt = train(FusedAdagrad, params, grads, lr=0.05, eps=1e-6, eps_inside_sqrt=True,
                      weight_decay=weight_decay, maximize=maximize)
    ref_params, ref_sums = reference_eps_inside_sqrt(params, grads, 0.05, weight_decay, maximize)
    for p, q, s in zip(ours, ref_params, ref_sums):
        assert_close(p, q, dtype)
        assert_close(opt.state[p]["sum"], s, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kw", [CONFIGS[-1], dict(eps_inside_sqrt=True, weight_decay=0.1)],
                         ids=config_id)
def test_bitwise_equal_to_cpu_kernel(dtype, kw):
    """CPU and CUDA agree bitwise for float32/float64/complex. Not for half/bfloat16 with weight
    decay: each follows torch on its device, which rounds the weight decay to the dtype on the
    CPU and keeps it in float32 on CUDA."""
    if fused_adagrad.build_info()["cpu_kernel"] == "base":
        pytest.skip("the portable CPU kernel has no FMA; the CUDA kernel uses FMAs")
    if dtype in HALF_TYPES and kw.get("weight_decay", 0) != 0:
        kw = dict(kw, weight_decay=0.0)
    params = initial_params(SHAPES + [(BIG,)], dtype)
    grads = grad_sequence(params, 20)
    ours, opt = train(FusedAdagrad, params, grads, **resolve(kw, DEV))
    cpu, opt_cpu = train(FusedAdagrad, [p.cpu() for p in params],
                         [[g.cpu() for g in gs] for gs in grads], **resolve(kw, "cpu"))
    for p, q in zip(ours, cpu):
        assert_same(p.cpu(), q)
        assert_same(opt.state[p]["sum"].cpu(), opt_cpu.state[q]["sum"])


# ---------------------------------------------------------------------------------------------
# Layouts: odd sizes, misaligned views, non-contiguous params, empty tensors, many tensors


def op_step(params, grads, sums, steps, **kw):
    args = dict(lr=0.05, lr_decay=0.01, weight_decay=0.01, eps=1e-8, maximize=False)
    args.update(kw)
    OP(params, grads, sums, steps, **args)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", [1, 15, 17, 1023, BIG])
@pytest.mark.parametrize("misaligned", ["param", "grad", "sum", "all"])
def test_misaligned_views_match_aligned(dtype, size, misaligned):
    """A view starting at element 1 of its buffer takes the scalar path: same numbers."""
    gen = torch.Generator(device=DEV).manual_seed(3)
    p, g, s = (rand((size,), dtype, gen) for _ in range(3))
    (torch.view_as_real(s) if dtype.is_complex else s).abs_()

    def view(t, shift):
        if not shift:
            return t.clone()
        buf = torch.empty(size + 1, dtype=dtype, device=DEV)
        buf[1:] = t
        return buf[1:]

    mp, mg, ms = (view(t, misaligned in (name, "all")) for t, name in
                  ((p, "param"), (g, "grad"), (s, "sum")))
    if misaligned in ("param", "all") and dtype.itemsize < 16:  # complex128 stays aligned
        assert mp.data_ptr() % 16 != 0
    ap, ag, as_ = p.clone(), g.clone(), s.clone()
    steps_m = [torch.zeros((), device=DEV)]
    steps_a = [torch.zeros((), device=DEV)]
    for _ in range(3):
        op_step([mp], [mg], [ms], steps_m)
        op_step([ap], [ag], [as_], steps_a)
    assert_same(mp, ap)
    assert_same(ms, as_)
    assert torch.equal(mg, g)
    assert float(steps_m[0]) == 3.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.complex64], ids=str)
def test_zero_dim_and_empty_params(dtype):
    params = initial_params([(), (0,), (5,), (0, 3), ()], dtype)
    grads = grad_sequence(params, 10)
    ours, opt = train(FusedAdagrad, params, grads, lr=0.1)
    theirs, opt_t = train(torch.optim.Adagrad, params, grads, lr=0.1, foreach=False)
    assert_states_close(ours, theirs, opt, opt_t)
    assert all(float(opt.state[p]["step"]) == 10 for p in ours)  # empty params step too, as torch


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.complex64], ids=str)
def test_non_contiguous_params(dtype):
    gen = torch.Generator(device=DEV).manual_seed(5)
    base = [rand((40, 30), dtype, gen) * 0.5 for _ in range(3)]
    # Transposed (dense, other strides than its grad), every third column and a slice with an
    # offset (neither dense: the kernel updates copies that are written back).
    ours = [base[0].t(), base[1][:, ::3], base[2][::2, 1:]]
    theirs = [p.clone() for p in ours]
    outside = base[1].clone()
    opt = FusedAdagrad(ours, lr=0.05, weight_decay=0.01)
    opt_t = torch.optim.Adagrad(theirs, lr=0.05, weight_decay=0.01, foreach=False)
    for _ in range(20):
        for p, q in zip(ours, theirs):
            g = rand(p.shape, dtype, gen)
            p.grad, q.grad = g, g.clone()
        opt.step()
        opt_t.step()
    assert ours[1].stride() == (30, 3)  # not dense: updated through a copy
    assert torch.equal(base[1][:, 1::3], outside[:, 1::3])  # elements between the view's stay
    assert_states_close(ours, theirs, opt, opt_t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_many_tensors_span_several_launches(dtype):
    gen = torch.Generator().manual_seed(7)
    count = 5000  # > MAX_TENSORS_PER_LAUNCH and > the 4000 steps one increment launch takes
    assert count > MAX_TENSORS_PER_LAUNCH
    sizes = torch.randint(0, 300, (count,), generator=gen).tolist()
    sizes[10] = sizes[4000] = 0
    sizes[20] = 3 * CHUNK + 1  # one tensor with several chunks
    params = initial_params([(n,) for n in sizes], dtype)
    grads = grad_sequence(params, 3)
    grads[1][30] = None  # a param without grad on one step: its step stays behind
    ours, opt = train(FusedAdagrad, params, grads, lr=0.1, lr_decay=0.01)
    # The for-loop, not foreach: foreach rounds lr * g to bfloat16 before dividing.
    theirs, opt_t = train(torch.optim.Adagrad, params, grads, lr=0.1, lr_decay=0.01,
                          foreach=False)
    assert_states_close(ours, theirs, opt, opt_t)
    assert float(opt.state[ours[30]]["step"]) == 2


def test_tensor_with_more_chunks_than_one_launch():
    n = MAX_CHUNKS_PER_LAUNCH * CHUNK + 5
    if torch.cuda.mem_get_info()[0] < 7 * 4 * n:
        pytest.skip("needs ~6 GB of free GPU memory")
    gen = torch.Generator(device=DEV).manual_seed(9)
    p, g = rand((n,), torch.float32, gen), rand((n,), torch.float32, gen)
    s = torch.zeros_like(p)
    expected = p + ((-0.1) * g) / (g * g).sqrt().add(1e-10)  # one step from sum = 0, same rounding
    OP([p], [g], [s], [torch.zeros((), device=DEV)], lr=0.1, lr_decay=0.0, weight_decay=0.0,
       eps=1e-10, maximize=False)
    assert torch.equal(s, g * g)
    assert torch.equal(p, expected)


# ---------------------------------------------------------------------------------------------
# Capturable: steps and lr on the device, CUDA graphs


def test_step_does_not_synchronize():
    params = initial_params([(1023,), (17,)], torch.float32)
    for p in params:
        p.grad = torch.ones_like(p)
    opt = FusedAdagrad(params, lr=torch.tensor(0.01, device=DEV), lr_decay=0.1)
    opt.step()
    torch.cuda.set_sync_debug_mode("error")  # raises on any synchronizing CUDA call
    try:
        for _ in range(3):
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert float(opt.state[params[0]]["step"]) == 4


def test_cuda_graph_capture_and_replay_match_eager():
    shapes = [(), (17,), (1023,), (64, 33), (BIG,)]
    params_g = initial_params(shapes, torch.float32) + initial_params(shapes[:3], torch.bfloat16)
    params_e = [p.clone() for p in params_g]
    lr_g, lr_e = torch.tensor(0.05, device=DEV), torch.tensor(0.05, device=DEV)
    kw = dict(lr_decay=0.01, weight_decay=0.01)
    opt_g = FusedAdagrad(params_g, lr=lr_g, **kw)
    opt_e = FusedAdagrad(params_e, lr=lr_e, **kw)
    for p in params_g:
        p.grad = torch.zeros_like(p)  # static grads: the graph reads them at fixed addresses
    grads = grad_sequence(params_g, 20)

    def set_grads(k):
        for p, q, g in zip(params_g, params_e, grads[k]):
            p.grad.copy_(g)
            q.grad = g.clone()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graph asks
        for k in range(3):
            set_grads(k)
            opt_g.step()
            opt_e.step()
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt_g.step()
    for k in range(3, 20):
        set_grads(k)
        if k == 10:  # a new lr reaches the captured kernels through the tensor
            lr_g.fill_(0.02)
            lr_e.fill_(0.02)
        graph.replay()
        opt_e.step()
    torch.cuda.synchronize()
    for p, q in zip(params_g, params_e):
        assert torch.equal(p, q)
        assert torch.equal(opt_g.state[p]["sum"], opt_e.state[q]["sum"])
        assert float(opt_g.state[p]["step"]) == float(opt_e.state[q]["step"]) == 20


def capture_matches_eager(params_g, steps=8):
    """Captures one FusedAdagrad step of `params_g`, replays it `steps` times with new grads,
    and asserts bitwise equality with eager steps of copies."""
    params_e = [p.clone() for p in params_g]
    lr_g, lr_e = torch.tensor(0.05, device=DEV), torch.tensor(0.05, device=DEV)
    opt_g, opt_e = FusedAdagrad(params_g, lr=lr_g), FusedAdagrad(params_e, lr=lr_e)
    for p in params_g:
        p.grad = torch.zeros_like(p)
    grads = grad_sequence(params_g, steps + 1)
    for p, q, g in zip(params_g, params_e, grads[0]):  # warm-up, outside the capture
        p.grad.copy_(g)
        q.grad = g.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        opt_g.step()
        opt_e.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt_g.step()
    for k in range(1, steps + 1):
        for p, q, g in zip(params_g, params_e, grads[k]):
            p.grad.copy_(g)
            q.grad = g.clone()
        graph.replay()
        opt_e.step()
    torch.cuda.synchronize()
    for p, q in zip(params_g, params_e):
        assert torch.equal(p, q)
        assert torch.equal(opt_g.state[p]["sum"], opt_e.state[q]["sum"])


def test_capture_splits_a_big_tensor_between_small_tables():
    """Under capture the 4 KB tables hold 32 tensors and 384 chunks: 40 small tensors fill the
    first table and start the second, where the 30 M-element tensor (458 chunks) starts at slot 8
    and continues in the next tables, then 40 small tensors again."""
    shapes = [(97,)] * 40 + [(30_000_000,)] + [(33,)] * 40
    # The big tensor starts at slot 40 - 32 = 8 of the second table.
    assert LAUNCH["small_table_tensors"] < 40 < 2 * LAUNCH["small_table_tensors"]
    assert 30_000_000 // CHUNK > LAUNCH["small_table_chunks"]  # and continues in the next table
    capture_matches_eager(initial_params(shapes, torch.float32))


def test_tensor_split_between_large_tables_from_a_later_slot():
    """Eager 32 KB tables: a tensor with more chunks than one table, starting at slot 5."""
    n = MAX_CHUNKS_PER_LAUNCH * CHUNK + 5
    if torch.cuda.mem_get_info()[0] < 8 * 4 * n:
        pytest.skip("needs ~8 GB of free GPU memory")
    small = initial_params([(100,)] * 5, torch.float32)
    big = initial_params([(n,)], torch.float32, seed=3)
    params = small + big
    grads = grad_sequence(params, 2)
    together, _ = train(FusedAdagrad, params, grads, lr=0.1)
    alone, _ = train(FusedAdagrad, big, [[gs[-1]] for gs in grads], lr=0.1)
    assert torch.equal(together[-1], alone[0])


def test_tensor_of_more_than_2_pow_31_elements():
    n = 2**31 + 5
    if torch.cuda.mem_get_info()[0] < 4 * 2 * n + (1 << 30):
        pytest.skip("needs ~18 GB of free GPU memory")
    gen = torch.Generator(device=DEV).manual_seed(4)
    p = torch.randn(n, generator=gen, device=DEV, dtype=torch.float32).to(torch.bfloat16)
    g = torch.randn(n, generator=gen, device=DEV, dtype=torch.float32).to(torch.bfloat16)
    s = torch.zeros_like(p)
    edges = [slice(0, 1000), slice(2**31 - 500, 2**31 + 5)]  # around the 32-bit boundary
    expected = []
    for e in edges:
        pe, ge, se = p[e].clone(), g[e].clone(), s[e].clone()
        OP([pe], [ge], [se], [torch.zeros((), device=DEV)], **HYPER)
        expected.append((pe, se))
    OP([p], [g], [s], [torch.zeros((), device=DEV)], **HYPER)
    for e, (pe, se) in zip(edges, expected):
        assert torch.equal(p[e], pe) and torch.equal(s[e], se)


@pytest.mark.parametrize("case", ["host step", "host lr", "sparse grad"])
def test_capture_refuses_what_a_graph_would_freeze(case):
    p = torch.randn(17, device=DEV)
    grads, steps, lr_tensor = [torch.randn(17, device=DEV)], [torch.zeros((), device=DEV)], None
    if case == "host step":
        steps, match = [torch.tensor(0.0)], "state 'step' is on the CPU while the step is captured"
    elif case == "host lr":
        lr_tensor, match = torch.tensor(0.1), "lr is a CPU tensor while the step is captured"
    else:
        grads = [torch.sparse_coo_tensor(torch.tensor([[1, 3]], device=DEV),
                                         torch.ones(2, device=DEV), (17,))]
        match = "a sparse grad cannot be captured"
    sums = [torch.zeros_like(p)]
    before = snapshot([p, sums[0], steps[0]])
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match=match):
        with torch.cuda.graph(graph):
            OP([p], grads, sums, steps, **dict(HYPER, weight_decay=0.0), lr_tensor=lr_tensor)
    assert_all_equal(before, [p, sums[0], steps[0]])


def test_host_steps_and_cpu_lr_match_device_ones():
    """A CPU step for a CUDA param (torch.optim.Adagrad's checkpoints) and a CPU lr tensor."""
    params = initial_params([(17,), (1023,)], torch.float32)
    grads = grad_sequence(params, 5)

    def run(step_device, lr, step_dtype=torch.float32):
        ps = [p.clone() for p in params]
        sums = [torch.zeros_like(p) for p in ps]
        steps = [torch.zeros((), dtype=step_dtype, device=step_device) for _ in ps]
        for gs in grads:
            lr_tensor = torch.tensor(lr[0], device=lr[1]) if lr else None
            OP(ps, gs, sums, steps, lr=0.0 if lr else 0.03, lr_decay=0.1, weight_decay=0.0,
               eps=1e-10, maximize=False, lr_tensor=lr_tensor)
        return ps, sums, steps

    base = run(DEV, None)
    for variant in (run("cpu", None), run(DEV, None, torch.float64),
                    run("cpu", None, torch.float64)):
        assert_all_equal(base[0], variant[0])
        assert_all_equal(base[1], variant[1])
        assert all(float(s) == 5 for s in variant[2])
    on_device, on_host = run(DEV, (0.03, DEV)), run("cpu", (0.03, "cpu"))
    assert_all_equal(on_device[0], on_host[0])
    # A float32 lr tensor's clr is rounded to float32 (torch divides the tensor), the float lr's
    # is a double: 1 ulp apart at some steps. Each step moves a param by about clr, so the two
    # runs may differ by a few float32 ulp of clr * steps, not of the (possibly tiny) param.
    torch.testing.assert_close(on_device[0], base[0], rtol=1e-6, atol=5 * 0.03 * 2**-23 * 4)


def test_checkpoint_from_torch_adagrad_continues():
    params = initial_params([(17,), (5, 6)], torch.float32)
    grads = grad_sequence(params, 10)
    theirs, opt_t = train(torch.optim.Adagrad, params, grads[:5], lr=0.1, foreach=False)
    assert opt_t.state[theirs[0]]["step"].device.type == "cpu"
    ours = [p.clone() for p in theirs]
    opt = FusedAdagrad(ours, lr=0.1)
    opt.load_state_dict(copy.deepcopy(opt_t.state_dict()))
    assert all(opt.state[p]["step"].device == p.device for p in ours)  # moved for capture
    for gs in grads[5:]:
        for p, q, g in zip(ours, theirs, gs):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        opt_t.step()
    assert_states_close(ours, theirs, opt, opt_t)


# ---------------------------------------------------------------------------------------------
# Grouping: dtypes and devices in one param group


def test_mixed_dtypes_in_one_group_match_separate_runs():
    params = (initial_params([(17,), (1023,)], torch.float32) +
              initial_params([(33,)], torch.bfloat16) + initial_params([(15,)], torch.float64) +
              initial_params([(7, 3)], torch.complex64) + initial_params([(9,)], torch.float16))
    grads = grad_sequence(params, 10)
    kw = dict(lr=0.05, weight_decay=0.01, lr_decay=0.01)
    together, opt = train(FusedAdagrad, params, grads, **kw)
    for i, p in enumerate(together):
        alone, opt_alone = train(FusedAdagrad, [params[i]], [[gs[i]] for gs in grads], **kw)
        assert torch.equal(p, alone[0])
        assert torch.equal(opt.state[p]["sum"], opt_alone.state[alone[0]]["sum"])


def test_cpu_and_cuda_params_in_one_group():
    cuda_params = initial_params([(17,), (65,)], torch.float32)
    params = [cuda_params[0], cuda_params[0].cpu() * 2, cuda_params[1], torch.randn(4)]
    grads = grad_sequence(cuda_params, 5)
    grads = [[gs[0], gs[0].cpu(), gs[1], gs[0][:4].cpu()] for gs in grads]
    together, opt = train(FusedAdagrad, params, grads, lr=0.05)
    for i, p in enumerate(together):
        alone, _ = train(FusedAdagrad, [params[i]], [[gs[i]] for gs in grads], lr=0.05)
        assert p.device == params[i].device
        assert torch.equal(p, alone[0])


def test_cpu_params_with_a_cuda_lr_tensor():
    params = [torch.randn(17)]
    grads = [[torch.randn(17)] for _ in range(3)]
    ours, _ = train(FusedAdagrad, params, grads, lr=torch.tensor(0.05, device=DEV))
    ref, _ = train(FusedAdagrad, params, grads, lr=torch.tensor(0.05))
    assert torch.equal(ours[0], ref[0])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_params_on_two_devices_in_one_group():
    a = initial_params([(17,), (1023,)], torch.float32)
    b = [p.to("cuda:1") for p in initial_params([(33,), (5,)], torch.bfloat16)]
    params = a + b
    grads = grad_sequence(params, 10)
    lr = torch.tensor(0.05, device="cuda:0")  # read on cuda:1 through a device-to-device copy
    together, opt = train(FusedAdagrad, params, grads, lr=lr, lr_decay=0.01)
    for i, p in enumerate(together):
        alone, _ = train(FusedAdagrad, [params[i]], [[gs[i]] for gs in grads],
                         lr=torch.tensor(0.05, device=params[i].device), lr_decay=0.01)
        assert p.device == params[i].device
        assert torch.equal(p, alone[0])
        assert opt.state[p]["step"].device == p.device


# ---------------------------------------------------------------------------------------------
# Failed steps, sparse grads, the op contract, the C++ optimizer


def test_failed_step_changes_nothing():
    g1 = initial_params([(17,), (1023,)], torch.float32)
    g2 = initial_params([(33,), (BIG,)], torch.float32) + initial_params([(8,)], torch.bfloat16)
    opt = FusedAdagrad([{"params": g1}, {"params": g2, "weight_decay": 0.1}], lr=0.1)
    for p in g1 + g2:
        p.grad = torch.randn_like(p)
    opt.step()
    for p in g1 + g2:
        p.grad = torch.randn_like(p)
    # A sparse grad with weight decay on the last param of the last group.
    g2[-1].grad = torch.sparse_coo_tensor(torch.tensor([[1, 3]], device=DEV),
                                          torch.ones(2, device=DEV, dtype=torch.bfloat16), (8,),
                                          check_invariants=True)
    everything = g1 + g2
    before = snapshot(everything + [opt.state[p]["sum"] for p in everything] +
                      [opt.state[p]["step"] for p in everything])
    with pytest.raises(RuntimeError, match="weight_decay option is not compatible"):
        opt.step()
    after = everything + [opt.state[p]["sum"] for p in everything] + \
        [opt.state[p]["step"] for p in everything]
    assert_all_equal(before, after)


def test_failed_op_call_changes_nothing():
    params = initial_params([(17,), (1023,), (5,)], torch.float32)
    grads = [torch.randn_like(p) for p in params]
    sums = [torch.zeros_like(p) for p in params]
    sums[-1] = torch.zeros(5, device=DEV, dtype=torch.float64)  # wrong dtype on the last one
    steps = [torch.zeros((), device=DEV) for _ in params]
    before = snapshot(params + sums + steps)
    with pytest.raises(RuntimeError, match="param 2"):
        op_step(params, grads, sums, steps)
    assert_all_equal(before, params + sums + steps)


@pytest.mark.parametrize("kw", [dict(), dict(maximize=True, lr_decay=0.1),
                                dict(eps_inside_sqrt=True)], ids=config_id)
def test_sparse_grads_match_torch(kw):
    emb = torch.nn.Embedding(100, 16, sparse=True).to(DEV)
    emb_t = copy.deepcopy(emb)
    opt = FusedAdagrad(emb.parameters(), lr=0.1, **kw)
    torch_kw = {k: v for k, v in kw.items() if k != "eps_inside_sqrt"}
    opt_t = torch.optim.Adagrad(emb_t.parameters(), lr=0.1, foreach=False, **torch_kw)
    gen = torch.Generator(device=DEV).manual_seed(11)
    for _ in range(10):
        idx = torch.randint(0, 100, (40,), generator=gen, device=DEV)  # with duplicates
        for m, o in ((emb, opt), (emb_t, opt_t)):
            o.zero_grad()
            m(idx).pow(2).sum().backward()
            o.step()
    if kw.get("eps_inside_sqrt"):
        assert not torch.allclose(emb.weight, emb_t.weight)  # the option changes the numbers
        return
    torch.testing.assert_close(emb.weight, emb_t.weight, rtol=1e-6, atol=1e-6)


@needs_compilable_op
@pytest.mark.parametrize("lr_on_device", [False, True])
def test_opcheck(lr_on_device):
    params = [torch.randn(17, device=DEV), torch.randn(3, 5, device=DEV, dtype=torch.bfloat16),
              torch.randn(4, device=DEV, dtype=torch.complex64)]
    grads = [torch.randn_like(p) for p in params]
    sums = [torch.zeros_like(p) for p in params]
    steps = [torch.zeros((), device=DEV) for _ in params]
    kwargs = dict(lr=0.1, lr_decay=0.01, weight_decay=0.01, eps=1e-10, maximize=False,
                  eps_inside_sqrt=False)
    if lr_on_device:
        kwargs["lr_tensor"] = torch.tensor(0.1, device=DEV)
    torch.library.opcheck(OP.default, (params, grads, sums, steps), kwargs)


def test_cpp_optimizer_on_cuda():
    params = initial_params([(17,), (33, 7)], torch.float32)
    grads = grad_sequence(params, 20)
    ours = [p.clone() for p in params]
    opt = fused_adagrad._C.CppFusedAdagrad(ours, lr=0.05, lr_decay=0.01, weight_decay=0.01)
    for gs in grads:
        for p, g in zip(ours, gs):
            p.grad = g.clone()
        opt.step()
    theirs, opt_t = train(torch.optim.Adagrad, params, grads, lr=0.05, lr_decay=0.01,
                          weight_decay=0.01, foreach=False)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
        state = opt.state(p)
        assert state["step"].device == p.device and float(state["step"]) == 20


# ---------------------------------------------------------------------------------------------
# torch.amp.GradScaler and torch.compile on the GPU

@pytest.mark.parametrize("opt_cls", [FusedAdagrad, fused_adagrad.RowWiseAdagrad],
                         ids=lambda c: c.__name__)
def test_scaled_step_equals_step_on_divided_grads_without_synchronizing(opt_cls):
    # The kernel divides each grad by the scale, rounded to the dtype, then steps: bitwise the
    # step on grads divided beforehand, and it reads the scale and found_inf on the device.
    params = [p for dtype in (torch.float32, torch.bfloat16, torch.float16)
              for p in initial_params([(17,), (33, 7), (BIG,)], dtype)]
    grads = grad_sequence(params, 4)
    scale = torch.tensor(1024.0, device=DEV)
    found_inf = torch.zeros((), device=DEV)
    ours = [p.clone() for p in params]
    opt = opt_cls(ours, lr=0.05, weight_decay=0.01)
    for t, step_grads in enumerate(grads):
        for p, g in zip(ours, step_grads):
            p.grad = g * scale.to(g.dtype)
        opt.grad_scale, opt.found_inf = scale, found_inf
        if t > 0:
            torch.cuda.set_sync_debug_mode("error")  # raises on any synchronizing CUDA call
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
            del opt.grad_scale, opt.found_inf
        for p, g in zip(ours, step_grads):  # the step leaves the unscaled grad, as fused=True
            assert_same(p.grad, (g * scale.to(g.dtype)) / scale)
    divided = [[g * scale.to(g.dtype) / scale for g in step_grads] for step_grads in grads]
    theirs, opt_theirs = train(opt_cls, params, divided, lr=0.05, weight_decay=0.01)
    for p, q in zip(ours, theirs):
        assert_same(p, q)
        assert_same(opt.state[p]["sum"], opt_theirs.state[q]["sum"])
    # A found_inf set on the device: nothing changes, the step count included.
    before = snapshot(ours + [opt.state[p][k] for p in ours for k in ("sum", "step")])
    for p in ours:
        p.grad = torch.full_like(p, float("inf"))
    opt.grad_scale, opt.found_inf = scale, torch.ones((), device=DEV)
    opt.step()
    assert_all_equal(before, snapshot(ours + [opt.state[p][k] for p in ours for k in ("sum", "step")]))


def test_grad_scaler_training_matches_torch_adagrad():
    # A real mixed-precision loop (autocast float16, GradScaler) with an inf injected at step 2:
    # ours steps like torch's Adagrad under its own scaler and skips the same step.
    def run(opt_cls, **kw):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(),
                                    torch.nn.Linear(64, 1)).to(DEV)
        opt = opt_cls(model.parameters(), lr=0.05, **kw)
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 12)
        gen = torch.Generator(device=DEV).manual_seed(1)
        for t in range(6):
            x = torch.randn(16, 32, device=DEV, generator=gen)
            opt.zero_grad()
            with torch.autocast("cuda", dtype=torch.float16):
                loss = model(x).float().square().mean()
            scaler.scale(loss).backward()
            if t == 2:
                next(model.parameters()).grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
        return model, opt, scaler

    ours, opt_ours, scaler_ours = run(FusedAdagrad)
    theirs, opt_theirs, scaler_theirs = run(torch.optim.Adagrad, foreach=False)
    assert scaler_ours.get_scale() == scaler_theirs.get_scale() == 2.0 ** 11  # one backoff
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(opt_ours.state[p]["sum"], opt_theirs.state[q]["sum"],
                                   rtol=1e-6, atol=1e-6)
        assert float(opt_ours.state[p]["step"]) == float(opt_theirs.state[q]["step"]) == 5


@needs_compilable_op
def test_compiled_reduce_overhead_step_matches_eager():
    # mode="reduce-overhead" (CUDA graphs where inductor can use them) with a tensor lr on the
    # device and a scheduler: the same params as eager steps, bitwise.
    import torch._dynamo
    torch._dynamo.reset()
    params = initial_params([(17,), (33, 7), (1023,)], torch.float32)
    grads = grad_sequence(params, 6)
    eager, compiled = [p.clone() for p in params], [p.clone() for p in params]
    eager_opt = FusedAdagrad(eager, lr=torch.tensor(0.1, device=DEV), lr_decay=0.01)
    opt = FusedAdagrad(compiled, lr=torch.tensor(0.1, device=DEV), lr_decay=0.01)
    eager_sched = torch.optim.lr_scheduler.ExponentialLR(eager_opt, gamma=0.9)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)

    @torch.compile(mode="reduce-overhead")
    def step():
        opt.step()
        sched.step()

    for t, step_grads in enumerate(grads):
        for e, c, g in zip(eager, compiled, step_grads):
            e.grad, c.grad = g.clone(), g.clone()
        eager_opt.step()
        eager_sched.step()
        step()
        for a, b in zip(eager, compiled):
            assert_same(a, b)

"""Property tests (hypothesis): random setups against oracles, and properties that need none.

A setup is one to three param groups, each with its own options (lr as a float or a 1-element
tensor, lr_decay, weight_decay, initial_accumulator_value, eps including 0, maximize,
eps_inside_sqrt), each holding one to three params of a random dtype (float32, float64, bfloat16,
float16, complex64), shape (0-d, empty, 1, 7, 17, 33, 1000, 1031, 2-, 3- and 4-d, and 40 003
elements, past the size at which the kernels split the work between threads) and layout
(contiguous, dims reversed, a slice with step 2 of a wider buffer, a view starting at element 1,
channels-last), and 1 to 12 steps in which each grad is random (at one of several magnitudes,
subnormal and overflowing squares included), zero, None, expanded (stride 0), or laid out unlike
the param. Values come from a torch.Generator seeded by the example, so a failing example
(printed by hypothesis, with a blob for @reproduce_failure) reproduces exactly.

With an oracle (test_matches_reference_and_torch), FusedAdagrad, at every step:
  * float32/float64/complex64: bitwise equal to `reference.reference_step` (torch's for-loop
    arithmetic with an IEEE sqrt) run as an independent trajectory from the start, every option
    included; and, from the same state, one step of torch.optim.Adagrad(foreach=False) on a param
    of the same layout gives the same `sum` and `step` bitwise, the param within 6 ulp, and the
    param bitwise wherever the for-loop and torch's fused=True (on contiguous copies) agree.
  * bfloat16/float16: from the same state, within test_parity's tolerance of torch's for-loop.
  * all: the user's grads are never written, a param without grad keeps its value, sum and step
    bitwise, and memory around a sliced view is never written.
Without an oracle (FusedAdagrad and RowWiseAdagrad):
  * a step that fails (one bad grad or state injected in a random param of a random group)
    raises, names that group, changes nothing, and the run then resumes as if it never happened;
  * splitting params into groups with identical options, in any order, changes no bit;
  * state_dict() mid-run, through torch.save/torch.load, into a new optimizer built with default
    options, resumes bit for bit.
"""
import io
import math
import os
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, note, settings
from hypothesis import strategies as st

from fused_adagrad import FusedAdagrad, RowWiseAdagrad
from reference import reference_step

# Fixed examples (derandomize) so that the suite is reproducible, no deadline (a step's time
# varies with the machine), no example database written next to the tests; a failure prints the
# example and a @reproduce_failure blob. No health check needs suppressing.
SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=True)
# FUSED_ADAGRAD_PROPERTY_SCALE=10 runs ten times the examples (a longer search, off the suite).
SCALE = float(os.environ.get("FUSED_ADAGRAD_PROPERTY_SCALE", "1"))


def examples(n):
    return max(1, round(n * SCALE))


LOW = (torch.bfloat16, torch.float16)
EXACT = (torch.float32, torch.float64, torch.complex64)
ALL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.complex64)
ROWWISE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)  # no complex
SHAPES = [(), (0,), (1,), (7,), (17,), (33,), (1000,), (1031,), (0, 5), (7, 1), (3, 17), (33, 7),
          (2, 3, 5), (1, 7, 3, 3), (3, 2, 5, 17), (40_003,)]
# Below ATen's GRAIN_SIZE (32768) torch's for-loop runs on one thread; see torch_for_loop_step.
LOW_MAX_NUMEL = 32_768 - 64
SENTINEL = 7.0
# Real param values come from randn; grads from randn times one of these. 1e-20 makes float32
# squares subnormal, 1e20 makes them overflow to inf (float64 gets both as ordinary values);
# float16 squares of 1e-3 grads are subnormal. Half/bfloat16 stay at 10 or below, so that `sum`
# stays finite (float16's max is 65504) and the tolerance comparison is not at an overflow edge.
SCALES_EXACT = [1.0, 1.0, 1e-3, 10.0, 1e-20, 1e20]
SCALES_LOW = [1.0, 1.0, 1e-3, 10.0]


# ----------------------------------------------------------------------------- the setups

@dataclass(frozen=True)
class ParamSpec:
    dtype: torch.dtype
    shape: tuple
    layout: str
    scale: float
    grads: tuple  # one grad kind per step


@dataclass(frozen=True)
class GroupSpec:
    options: tuple  # sorted (name, value) pairs; lr is (value, form)
    params: tuple


@dataclass(frozen=True)
class Setup:
    groups: tuple
    steps: int
    seed: int


def layouts_for(shape):
    out = ["contiguous", "offset"]
    if len(shape) >= 1:
        out.append("strided")
    if len(shape) >= 2:
        out.append("transposed")
    if len(shape) == 4:
        out.append("channels_last")
    return out


def grad_kinds_for(shape):
    out = ["randn", "randn", "randn", "none", "zeros", "like_param"]
    if len(shape) >= 1:
        out.append("expanded")
    if len(shape) >= 2:
        out.append("transposed")
    return out


@st.composite
def group_options(draw):
    return tuple(sorted(dict(
        lr=(draw(st.sampled_from([0.0, 1e-3, 0.01, 0.1, 1.0])),
            draw(st.sampled_from(["float", "float", "tensor", "tensor-1", "tensor-f64"]))),
        lr_decay=draw(st.sampled_from([0.0, 0.0, 0.01, 0.5])),
        weight_decay=draw(st.sampled_from([0.0, 0.0, 1e-4, 0.1])),
        initial_accumulator_value=draw(st.sampled_from([0.0, 0.0, 0.1, 1.0])),
        eps=draw(st.sampled_from([1e-10, 1e-10, 1e-6, 1e-3, 0.0])),
        maximize=draw(st.booleans()),
        eps_inside_sqrt=draw(st.sampled_from([False, False, False, True])),
        # torch's path switches: ours accepts and ignores them; torch gets its own (see below).
        path=draw(st.sampled_from([None, None, "fused", "foreach", "for-loop"])),
    ).items()))


@st.composite
def param_specs(draw, steps, dtypes):
    dtype = draw(st.sampled_from(dtypes))
    low = dtype in LOW
    shape = draw(st.sampled_from([s for s in SHAPES if not low or math.prod(s) <= LOW_MAX_NUMEL]))
    layout = draw(st.sampled_from(layouts_for(shape)))
    scale = draw(st.sampled_from(SCALES_LOW if low else SCALES_EXACT))
    kinds = draw(st.lists(st.sampled_from(grad_kinds_for(shape)), min_size=steps, max_size=steps))
    return ParamSpec(dtype, shape, layout, scale, tuple(kinds))


@st.composite
def setups(draw, dtypes=ALL_DTYPES, max_groups=3, max_params=3, max_steps=12):
    steps = draw(st.integers(1, max_steps))
    groups = []
    for _ in range(draw(st.integers(1, max_groups))):
        options = draw(group_options())
        n = draw(st.integers(1, max_params))
        groups.append(GroupSpec(options, tuple(draw(param_specs(steps, dtypes)) for _ in range(n))))
    groups = tuple(groups)
    return Setup(groups, steps, draw(st.integers(0, 2**31 - 1)))


def optimizer_kwargs(options):
    """The options as constructor arguments; a tensor lr is made anew for every optimizer."""
    kw = dict(options)
    kw.update({None: {}, "fused": dict(fused=True), "foreach": dict(foreach=True),
               "for-loop": dict(foreach=False)}[kw.pop("path")])
    value, form = kw.pop("lr")
    kw["lr"] = {"float": lambda: value,
                "tensor": lambda: torch.tensor(value),
                "tensor-1": lambda: torch.tensor([value]),
                "tensor-f64": lambda: torch.tensor(value, dtype=torch.float64)}[form]()
    return kw


def for_loop_clr(options, step):
    """clr as torch's for-loop computes it: `lr / (1 + (step - 1) * lr_decay)` with lr a 0-d
    tensor when it is a tensor (`_to_scalar`), so in the tensor's dtype: a float32 lr tensor
    gives a float32 clr, where torch's fused=True (and reference.reference_step, which takes
    lr.item()) compute it in double. We follow the for-loop."""
    kw = optimizer_kwargs(options)
    lr = kw["lr"].reshape(()) if torch.is_tensor(kw["lr"]) else kw["lr"]
    clr = lr / (1 + (float(step) - 1) * kw["lr_decay"])
    return clr.item() if torch.is_tensor(clr) else clr


def torch_kwargs(options):
    """For torch.optim.Adagrad, whose path the caller picks."""
    kw = optimizer_kwargs(options)
    for k in ("eps_inside_sqrt", "fused", "foreach"):
        kw.pop(k, None)
    return kw


# ----------------------------------------------------------------------------- tensors

def random_tensor(gen, shape, dtype, scale=1.0):
    draw_dtype = torch.complex128 if dtype.is_complex else torch.float64
    t = torch.randn(shape, generator=gen, dtype=draw_dtype)
    return (t * scale).to(dtype)


def build(values, layout):
    """(param, base, gaps): a copy of `values` laid out as `layout` (never `values` itself). For a
    view into a wider buffer, `base` is the buffer and `gaps` marks its elements outside the view
    (filled with SENTINEL)."""
    shape = tuple(values.shape)
    if layout == "contiguous":
        return values.clone(), None, None
    if layout == "transposed":  # every dim reversed: a transpose for 2-d
        rev = tuple(reversed(range(values.dim())))
        buffer = values.permute(rev).clone(memory_format=torch.contiguous_format)
        return buffer.permute(rev), None, None
    if layout == "channels_last":
        return values.clone(memory_format=torch.channels_last), None, None
    if layout == "strided":
        base = torch.full(shape[:-1] + (2 * shape[-1] + 1,), SENTINEL, dtype=values.dtype)
        gaps = torch.ones(base.shape, dtype=torch.bool)
        view = base[..., 1::2]
        gaps[..., 1::2] = False
    else:
        assert layout == "offset"
        base = torch.full((values.numel() + 1,), SENTINEL, dtype=values.dtype)
        gaps = torch.ones(base.shape, dtype=torch.bool)
        view = base[1:].view(shape)
        gaps[1:] = False
    view.copy_(values)
    return view, base, gaps


def make_grad(gen, spec, kind):
    if kind == "none":
        return None
    if kind == "zeros":
        return torch.zeros(spec.shape, dtype=spec.dtype)
    g = random_tensor(gen, spec.shape, spec.dtype, spec.scale)
    if kind == "randn":
        return g
    if kind == "like_param":
        return build(g, spec.layout)[0]
    if kind == "expanded":  # stride 0 along dim 0
        return g[:1].expand(spec.shape)
    assert kind == "transposed"
    return build(g, "transposed")[0]


@dataclass
class Data:
    specs: list       # [(group index, index in group, ParamSpec)]
    values: list      # initial param values, contiguous
    grads: list       # grads[step][param]

    @classmethod
    def of(cls, setup):
        gen = torch.Generator().manual_seed(setup.seed)
        specs = [(gi, pi, spec) for gi, group in enumerate(setup.groups)
                 for pi, spec in enumerate(group.params)]
        values = [random_tensor(gen, spec.shape, spec.dtype) for _, _, spec in specs]
        grads = [[make_grad(gen, spec, spec.grads[t]) for _, _, spec in specs]
                 for t in range(setup.steps)]
        return cls(specs, values, grads)


class Run:
    """One optimizer over freshly built params (in their layouts) of a setup."""

    def __init__(self, cls, setup, data, values=None, options_as_defaults=False):
        values = data.values if values is None else values
        built = [build(v, spec.layout) for v, (_, _, spec) in zip(values, data.specs)]
        self.params = [b[0] for b in built]
        self.bases = [(b[1], b[2]) for b in built if b[1] is not None]
        self.data = data
        groups = [[] for _ in setup.groups]
        for (gi, _, _), p in zip(data.specs, self.params):
            groups[gi].append(p)
        if options_as_defaults:  # the options only in the state_dict to be loaded
            self.opt = cls([{"params": ps} for ps in groups])
        else:
            self.opt = cls([dict(params=ps, **optimizer_kwargs(g.options))
                            for ps, g in zip(groups, setup.groups)])

    def set_grads(self, t):
        for p, g in zip(self.params, self.data.grads[t]):
            p.grad = g

    def step(self, t):
        self.set_grads(t)
        self.opt.step()


# ----------------------------------------------------------------------------- comparisons

INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def real_flat(t):
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.reshape(-1)


def int_view(t):
    """The bits of each element, flat."""
    t = real_flat(t).contiguous()
    return t.view(INT_OF_SIZE[t.element_size()])


def bits_equal(a, b):
    """Elementwise: the same bits, or both NaN (whatever the payload)."""
    eq = int_view(a) == int_view(b)
    if not eq.all():
        eq |= real_flat(a).isnan() & real_flat(b).isnan()
    return eq


def assert_same_bits(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape, (
        f"{what}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}")
    if torch.equal(int_view(a), int_view(b)):
        return
    diff = ~bits_equal(a, b)
    if diff.any():
        i = int(diff.nonzero()[0])
        raise AssertionError(f"{what}: {int(diff.sum())} of {diff.numel()} elements differ, the "
                             f"first at flat index {i}: {real_flat(a)[i].item()!r} vs "
                             f"{real_flat(b)[i].item()!r}")


def split_special(a, b, what):
    """Asserts NaN and +-inf where b has them; returns a, b at b's finite elements (real, flat).
    Where only `a` is not finite, the caller's distance is NaN or inf, and fails."""
    a, b = real_flat(a), real_flat(b)
    finite = torch.isfinite(b)
    if finite.all():
        return a, b, finite
    nan, inf = b.isnan(), b.isinf()
    assert torch.equal(a.isnan(), nan), f"{what}: NaN elsewhere than the oracle"
    assert torch.equal(a[inf], b[inf]), f"{what}: inf differs"
    return a[finite], b[finite], finite


def assert_within_ulps(ours, loop, before, n, what):
    """|ours - loop| <= n ulp of the step's largest term (the param before or after, or the
    update): an ulp of the update can be two of a result that cancels (as in test_parity)."""
    if torch.equal(int_view(ours), int_view(loop)):
        return
    o, l, finite = split_special(ours, loop, what)
    b = real_flat(before)[finite]
    scale = torch.maximum(torch.maximum(l.abs(), b.abs()), (l - b).abs())
    ulp = torch.nextafter(scale, torch.full_like(scale, math.inf)) - scale
    worst = ((o - l).abs() / ulp).max().item() if o.numel() else 0.0
    assert worst <= n, f"{what}: {worst} ulp from torch's for-loop, allowed {n}"


def dtype_ulp(x, dtype):
    """The spacing of `dtype`'s values at x (float16/bfloat16), as float32 (test_parity's)."""
    mant_bits = {torch.float16: 10, torch.bfloat16: 7}[dtype]
    exp = torch.floor(torch.log2(x.abs().clamp_min(torch.finfo(dtype).tiny)))
    return torch.exp2(exp - mant_bits)


def assert_close_low(ours, oracle, dtype, what):
    """test_parity's tolerance for one half/bfloat16 step from the same state: atol = rtol = 5e-3
    (torch's own between its fused and for-loop paths), or 1 ulp of the dtype where that is
    coarser (bfloat16 in the lower half of each binade): we compute each fused chain in float32
    and round where torch's for-loop rounds, but not always to the same neighbour."""
    if torch.equal(int_view(ours), int_view(oracle)):
        return
    o, r, _ = split_special(ours.float(), oracle.float(), what)
    allowed = torch.maximum(5e-3 + 5e-3 * r.abs(), dtype_ulp(r, dtype))
    bad = (o - r).abs() > allowed
    assert not bad.any(), (f"{what}: {int(bad.sum())} elements off, e.g. {o[bad][0].item()} vs "
                           f"{r[bad][0].item()}")


# ----------------------------------------------------------------------------- torch, one step

def torch_for_loop_step(setup, data, params, befores):
    """From our state before the step, one step of torch.optim.Adagrad(foreach=False), one
    optimizer per group (groups are independent in torch). Returns {param index: (param, sum,
    step)} for the params of groups without eps_inside_sqrt (torch has no such option).

    float32/float64/complex64 params keep their layout. bfloat16/float16 ones are stepped flat and
    contiguous, padded to a multiple of 64 elements: torch's CPU for-loop gives an element other
    numbers in its vectorized body (g + wd * p in float, rounded once) than in its scalar tail or
    on a non-contiguous layout (rounded after each op), a few ulp of the dtype apart in `sum`;
    ours (the same numbers at every position, test_parity's simd_body test) follows the body. The
    padded length keeps every element in the body, and fewer than GRAIN_SIZE elements keep
    torch on one thread, so no chunk boundary makes a tail in the middle."""
    out = {}
    for gi, group in enumerate(setup.groups):
        if dict(group.options)["eps_inside_sqrt"]:
            continue
        members = [i for i, (g, _, _) in enumerate(data.specs) if g == gi]
        rps, pads = [], []
        for i in members:
            before, spec = befores[i][0], data.specs[i][2]
            if spec.dtype in LOW:
                pad = (-before.numel()) % 64
                rps.append(torch.cat([before.reshape(-1), torch.ones(pad, dtype=spec.dtype)]))
            else:
                pad = None
                rps.append(build(before, spec.layout)[0])
            pads.append(pad)
        ropt = torch.optim.Adagrad(rps, foreach=False, **torch_kwargs(group.options))
        for i, rp, pad in zip(members, rps, pads):
            _, sum_before, step_before = befores[i]
            state, g = ropt.state[rp], params[i].grad
            state["step"].copy_(step_before)
            if pad is None:
                state["sum"].copy_(sum_before)
                rp.grad = g
            else:
                state["sum"][:sum_before.numel()].copy_(sum_before.reshape(-1))
                rp.grad = None if g is None else torch.cat(
                    [g.reshape(-1), torch.ones(pad, dtype=g.dtype)])
        ropt.step()
        for i, rp, pad in zip(members, rps, pads):
            n = befores[i][0].numel()
            state = ropt.state[rp]
            if pad is None:
                out[i] = (rp, state["sum"], state["step"])
            else:
                out[i] = (rp[:n], state["sum"][:n], state["step"])
    return out


def torch_fused_step(setup, data, params, befores):
    """One step of torch.optim.Adagrad(fused=True) for the float32/float64/complex64 params of
    groups without eps_inside_sqrt, on contiguous real copies: torch's fused CPU kernel reads raw
    pointers and mishandles non-contiguous tensors, and refuses complex ones, while Adagrad is
    element-wise on the real view (but for the weight decay: see the caller).
    Returns {param index: param after, real, contiguous}."""
    out = {}
    for gi, group in enumerate(setup.groups):
        if dict(group.options)["eps_inside_sqrt"]:
            continue
        members = [i for i, (g, _, spec) in enumerate(data.specs)
                   if g == gi and spec.dtype in EXACT]
        if not members:
            continue
        real = lambda t: (torch.view_as_real(t) if t.is_complex() else t).contiguous().clone()
        fps = [real(befores[i][0]) for i in members]
        fopt = torch.optim.Adagrad(fps, fused=True, **torch_kwargs(group.options))
        for i, fp in zip(members, fps):
            _, sum_before, step_before = befores[i]
            fopt.state[fp]["sum"].copy_(real(sum_before))
            fopt.state[fp]["step"].copy_(step_before)
            g = params[i].grad
            fp.grad = None if g is None else real(g)
        fopt.step()
        out.update(zip(members, fps))
    return out


def emulated_eps_inside_sqrt_step(before, sum_before, step_after, grad, options):
    """Half/bfloat16 with eps_inside_sqrt, which torch has not: float32 math, rounded to the dtype
    where torch's CPU for-loop rounds for the default eps (g + wd * p, with wd in the dtype, the
    sum, the denominator and its parts, the param; eps is rounded to the dtype). Not bitwise
    (ours fuses g + wd * p and sum + g * g into FMAs as torch's vectorized loop does), hence
    the tolerance."""
    kw = optimizer_kwargs(options)
    clr = for_loop_clr(options, step_after)
    dtype = before.dtype
    g = -grad.float() if kw["maximize"] else grad.float()
    if kw["weight_decay"] != 0:  # torch's vectorized add casts alpha to the dtype first
        wd = torch.tensor(kw["weight_decay"], dtype=dtype).float()
        g = (g + wd * before.float()).to(dtype).float()
    s = (sum_before.float() + g * g).to(dtype)
    eps = torch.tensor(kw["eps"], dtype=dtype).float()  # float16 rounds 1e-10 to 0, as torch's
    # sum + eps and its sqrt rounded to the dtype, as torch rounds sqrt(sum) and sqrt(sum) + eps.
    denom = torch.sqrt((s.float() + eps).to(dtype).float()).to(dtype).float()
    p = (before.float() + (-clr) * g / denom).to(dtype)
    return p, s


# ----------------------------------------------------------------------------- with an oracle

@settings(max_examples=examples(1000), **SETTINGS)
@given(setup=setups())
def test_matches_reference_and_torch(setup):
    data = Data.of(setup)
    run = Run(FusedAdagrad, setup, data)
    opt, params = run.opt, run.params
    options = [dict(setup.groups[gi].options) for gi, _, _ in data.specs]
    # The independent reference trajectory (IEEE sqrt), for float32/float64/complex64 params.
    ref = {}
    for i, (v, (_, _, spec)) in enumerate(zip(data.values, data.specs)):
        if spec.dtype in EXACT:
            init = options[i]["initial_accumulator_value"]
            init = complex(init, init) if v.is_complex() else init
            ref[i] = [v.clone(), torch.full_like(v, init), 0]

    for t in range(setup.steps):
        run.set_grads(t)
        befores = [(p.detach().clone(), opt.state[p]["sum"].clone(), opt.state[p]["step"].clone())
                   for p in params]
        grads_before = [None if p.grad is None else p.grad.clone() for p in params]
        loop = torch_for_loop_step(setup, data, params, befores)
        fused = torch_fused_step(setup, data, params, befores)
        opt.step()

        for i, (p, (before, sum_before, step_before)) in enumerate(zip(params, befores)):
            gi, pi, spec = data.specs[i]
            what = (f"step {t + 1}, group {gi}, param {pi} "
                    f"({spec.dtype}, {spec.shape}, {spec.layout})")
            s, step = opt.state[p]["sum"], opt.state[p]["step"]
            g = p.grad
            if g is None:
                assert_same_bits(p, before, what + ", no grad: param")
                assert_same_bits(s, sum_before, what + ", no grad: sum")
                assert_same_bits(step, step_before, what + ", no grad: step")
            else:
                assert_same_bits(g, grads_before[i], what + ": the grad was written")
                assert step.item() == step_before.item() + 1, what
            if i in ref:
                r = ref[i]
                if g is not None:
                    r[2] += 1
                    kw = torch_kwargs(options[i])
                    del kw["initial_accumulator_value"]
                    kw.update(eps_inside_sqrt=options[i]["eps_inside_sqrt"])
                    reference_step(r[0], g, r[1], r[2], **kw)
                assert_same_bits(p, r[0], what + ": param vs reference")
                assert_same_bits(s, r[1], what + ": sum vs reference")
                assert step.item() == r[2], what
            if i in loop:
                lp, ls, lstep = loop[i]
                assert_same_bits(step, lstep, what + ": step vs torch")
                if spec.dtype in LOW:
                    assert_close_low(p, lp, spec.dtype, what + ": param vs torch's for-loop")
                    assert_close_low(s, ls, spec.dtype, what + ": sum vs torch's for-loop")
                else:
                    # No sqrt in the sum: bitwise. The param: torch's for-loop takes its sqrt from
                    # MKL (not correctly rounded on every CPU; we and fused=True are IEEE). The
                    # README's bound is 6 ulp per step: 1 ulp of sqrt error can be 2 ulp of
                    # std = sqrt + eps when eps is near sqrt(sum) and cancels nothing, 2 ulp of
                    # std up to 4 of the quotient (std low in its binade, the update high in
                    # its), plus the roundings of the quotient and the param (eps = 1e-3 with
                    # grads of 1e-3 gives 3-5 ulp; the default eps, at most 2).
                    assert_same_bits(s, ls, what + ": sum vs torch's for-loop")
                    assert_within_ulps(p, lp, before, 6, what + ": param")
                    # Where torch's two paths agree, we agree bitwise with them. Only where
                    # they differ in the sqrt alone: they may agree at an element by a
                    # coincidence of two differences, of which we share one. They differ in
                    # more with a float32 lr tensor and lr_decay (clr, see for_loop_clr), and
                    # with complex params and weight decay (the for-loop's complex g + wd * p
                    # is not always the real view's, which fused=True, on the real view, does).
                    fp = fused[i]
                    lr = optimizer_kwargs(options[i])["lr"]
                    comparable = not (torch.is_tensor(lr) and lr.dtype == torch.float32
                                      and options[i]["lr_decay"] != 0)
                    comparable &= not (spec.dtype.is_complex and options[i]["weight_decay"] != 0)
                    agree = bits_equal(lp, fp) & comparable
                    mismatch = agree & ~bits_equal(p, lp)
                    assert not mismatch.any(), (
                        f"{what}: {int(mismatch.sum())} elements where torch's for-loop and "
                        f"fused=True agree and we differ")
            elif spec.dtype in LOW and g is not None:
                ep, es = emulated_eps_inside_sqrt_step(before, sum_before, step.item(), g,
                                                       options[i])
                assert_close_low(p, ep, spec.dtype, what + ": param vs emulation")
                assert_close_low(s, es, spec.dtype, what + ": sum vs emulation")
        for base, gaps in run.bases:
            assert (base[gaps] == SENTINEL).all(), "wrote outside a view"


# ----------------------------------------------------------------------------- no oracle

def snapshot(run):
    return ([int_view(p).clone() for p in run.params],
            [{k: (v.dtype, v.shape, int_view(v).clone()) for k, v in run.opt.state[p].items()}
             for p in run.params],
            [int_view(base).clone() for base, _ in run.bases])


def assert_snapshot_equal(before, after):
    for i, (a, b) in enumerate(zip(before[0], after[0])):
        assert torch.equal(a, b), f"param {i} changed"
    for i, (a, b) in enumerate(zip(before[1], after[1])):
        assert list(a) == list(b), f"param {i}: state keys changed"
        for k in a:
            assert a[k][:2] == b[k][:2] and torch.equal(a[k][2], b[k][2]), (
                f"param {i}: state {k!r} changed")
    for a, b in zip(before[2], after[2]):
        assert torch.equal(a, b), "a buffer around a view changed"


def assert_runs_equal(a, b, what):
    for i, (pa, pb) in enumerate(zip(a.params, b.params)):
        assert_same_bits(pa, pb, f"{what}: param {i}")
        sa, sb = a.opt.state[pa], b.opt.state[pb]
        assert list(sa) == list(sb), what
        for k in sa:
            assert_same_bits(sa[k], sb[k], f"{what}: param {i}, state {k!r}")


BAD = ["grad dtype", "grad shape", "sparse grad with weight decay", "sparse index out of range",
       "sum dtype", "sum shape", "shared step"]


def other_dtype(dtype):
    others = {torch.float64: torch.float32, torch.complex64: torch.complex128}
    return others.get(dtype, torch.float64)


def inject(bad, run, setup, target):
    """Spoils the target param's grad or state for this step; returns how to undo it, what the
    step ended up spoiling (some spoils need something the param lacks: then another) and the
    groups whose index the error may name."""
    p, (gi, _, spec) = run.params[target], run.data.specs[target]
    state, grad = run.opt.state[p], p.grad
    wd = dict(setup.groups[gi].options)["weight_decay"]
    # RowWiseAdagrad takes weight decay with sparse grads (FBGEMM's L2 mode, touched rows only).
    if bad == "sparse grad with weight decay" and (
            wd == 0 or p.dim() == 0 or isinstance(run.opt, RowWiseAdagrad)):
        bad = "grad dtype"
    if bad == "sparse index out of range" and p.dim() == 0:
        bad = "grad shape"
    # Another param (of any group) that steps, to share its step tensor with.
    peers = [i for i in range(len(run.params)) if i != target and run.params[i].grad is not None]
    if bad == "shared step" and not peers:
        bad = "sum shape"
    if grad is None:
        p.grad = torch.zeros_like(p)  # a param without grad is skipped, its state unread
    saved = dict(state)

    def undo():
        p.grad = grad
        state.update(saved)

    if bad == "grad dtype":
        p.grad = torch.zeros_like(p)
        p.grad.data = torch.zeros(p.shape, dtype=other_dtype(p.dtype))  # .grad = refuses it
    elif bad == "grad shape":
        p.grad = torch.zeros_like(p)
        p.grad.data = torch.zeros(p.numel() + 1, dtype=p.dtype)
    elif bad == "sparse grad with weight decay":
        p.grad = torch.zeros(p.shape, dtype=p.dtype).to_sparse(1)
    elif bad == "sparse index out of range":
        p.grad = torch.sparse_coo_tensor(torch.tensor([[p.shape[0]]]),
                                         torch.ones((1,) + tuple(p.shape[1:]), dtype=p.dtype),
                                         p.shape, check_invariants=False)
    elif bad == "sum dtype":
        state["sum"] = state["sum"].to(other_dtype(state["sum"].dtype))
    elif bad == "sum shape":
        state["sum"] = torch.zeros(state["sum"].numel() + 1, dtype=state["sum"].dtype)
    else:
        assert bad == "shared step"
        state["step"] = run.opt.state[run.params[peers[0]]]["step"]
        return undo, bad, {gi, run.data.specs[peers[0]][0]}
    return undo, bad, {gi}


@pytest.mark.parametrize("cls", [FusedAdagrad, RowWiseAdagrad], ids=lambda c: c.__name__)
@settings(max_examples=examples(400), **SETTINGS)
@given(data=st.data())
def test_failed_step_changes_nothing(cls, data):
    """Two identical runs; in one, at a random step, one param of a random group gets a bad grad
    or state. That step must raise naming the group and change nothing; with the spoil undone the
    run goes on as the other one, bit for bit."""
    setup = data.draw(setups(ALL_DTYPES if cls is FusedAdagrad else ROWWISE_DTYPES, max_steps=6))
    at = data.draw(st.integers(0, setup.steps - 1), label="failing step")
    bad = data.draw(st.sampled_from(BAD), label="spoil")
    grads = Data.of(setup)
    target = data.draw(st.integers(0, len(grads.specs) - 1), label="spoiled param")
    spoiled, clean = Run(cls, setup, grads), Run(cls, setup, grads)
    for t in range(setup.steps):
        if t == at:
            spoiled.set_grads(t)
            undo, done, named = inject(bad, spoiled, setup, target)
            note(f"spoiled: {done}")
            before = snapshot(spoiled)
            with pytest.raises(RuntimeError) as e:
                spoiled.opt.step()
            assert any(f"param group {gi}, param " in str(e.value) for gi in named), str(e.value)
            assert_snapshot_equal(before, snapshot(spoiled))
            undo()
        spoiled.step(t)
        clean.step(t)
    assert_runs_equal(spoiled, clean, "after the failed step")


@pytest.mark.parametrize("cls", [FusedAdagrad, RowWiseAdagrad], ids=lambda c: c.__name__)
@settings(max_examples=examples(400), **SETTINGS)
@given(data=st.data())
def test_group_split_does_not_matter(cls, data):
    """The same params and options, in one group, or split into up to four groups in any order
    (options given per group, or once as the defaults): the same bits."""
    dtypes = ALL_DTYPES if cls is FusedAdagrad else ROWWISE_DTYPES
    options = data.draw(group_options(), label="options")
    steps = data.draw(st.integers(1, 8), label="steps")
    specs = data.draw(st.lists(param_specs(steps, dtypes), min_size=1, max_size=6), label="params")
    n = len(specs)
    where = data.draw(st.lists(st.integers(0, 3), min_size=n, max_size=n), label="group of each")
    order = data.draw(st.permutations(range(n)), label="order")
    as_defaults = data.draw(st.booleans(), label="options as defaults")
    setup = Setup((GroupSpec(options, tuple(specs)),), steps, data.draw(st.integers(0, 2**31 - 1)))
    grads = Data.of(setup)
    one = Run(cls, setup, grads)
    split = [build(v, s.layout)[0] for v, s in zip(grads.values, specs)]
    groups = [[split[i] for i in order if where[i] == k] for k in range(4)]
    groups = [ps for ps in groups if ps]
    kw = optimizer_kwargs(options)
    opt = (cls([{"params": ps} for ps in groups], **kw) if as_defaults
           else cls([dict(params=ps, **optimizer_kwargs(options)) for ps in groups]))
    for t in range(steps):
        one.step(t)
        for p, g in zip(split, grads.grads[t]):
            p.grad = g
        opt.step()
    for i, (a, b) in enumerate(zip(one.params, split)):
        assert_same_bits(b, a, f"param {i}")
        for k in one.opt.state[a]:
            assert_same_bits(opt.state[b][k], one.opt.state[a][k], f"param {i}, state {k!r}")


def assert_state_dicts_equal(a, b, what):
    if torch.is_tensor(a) or torch.is_tensor(b):
        assert torch.is_tensor(a) and torch.is_tensor(b), f"{what}: {a!r} vs {b!r}"
        assert_same_bits(a, b, what)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"{what}: keys {list(a)} vs {list(b)}"
        for k in a:
            assert_state_dicts_equal(a[k], b[k], f"{what}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            assert_state_dicts_equal(x, y, f"{what}[{i}]")
    else:
        assert a == b and type(a) is type(b), f"{what}: {a!r} vs {b!r}"


@pytest.mark.parametrize("cls", [FusedAdagrad, RowWiseAdagrad], ids=lambda c: c.__name__)
@settings(max_examples=examples(400), **SETTINGS)
@given(data=st.data())
def test_state_dict_round_trip_resumes_identically(cls, data):
    """state_dict() after k steps, through torch.save/torch.load(weights_only=True), loaded into a
    new optimizer over new params (same values and layouts) built with the default options: the
    loaded state_dict is the saved one, and the rest of the run gives the same bits."""
    setup = data.draw(setups(ALL_DTYPES if cls is FusedAdagrad else ROWWISE_DTYPES, max_steps=8))
    k = data.draw(st.integers(0, setup.steps), label="steps before saving")
    grads = Data.of(setup)
    run = Run(cls, setup, grads)
    for t in range(k):
        run.step(t)
    buffer = io.BytesIO()
    torch.save(run.opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    resumed = Run(cls, setup, grads, values=[p.detach().contiguous() for p in run.params],
                  options_as_defaults=True)
    resumed.opt.load_state_dict(loaded)
    assert_state_dicts_equal(resumed.opt.state_dict(), run.opt.state_dict(), "state_dict")
    for t in range(k, setup.steps):
        run.step(t)
        resumed.step(t)
    assert_runs_equal(resumed, run, "resumed")

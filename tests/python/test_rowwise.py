"""RowWiseAdagrad (FBGEMM's EXACT_ROWWISE_ADAGRAD plus torch's options) against a plain PyTorch
reference of the formula written here, in the kernel's order of operations, so the comparison is
bitwise for every dtype, option, row length and grad layout."""
import io
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from fused_adagrad import FusedAdagrad, RowWiseAdagrad
from torch_support import needs_compilable_op

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
LANES = 8


def ieee_sqrt(t):
    # torch's CPU sqrt may go through MKL, which is not correctly rounded on every CPU.
    return torch.from_numpy(np.sqrt(t.numpy()))


def row_mean_of_squares(g):
    """mean(g * g) over each row of g (R, D): squares summed in 8 interleaved lanes (element e
    into lane e % 8, a rounded square then a rounded add), then the lanes pairwise."""
    rows, d = g.shape
    sq = torch.nn.functional.pad(g * g, (0, (-d) % LANES))
    lanes = torch.zeros(rows, LANES, dtype=g.dtype)
    for c in range(sq.shape[1] // LANES):
        lanes = lanes + sq[:, c * LANES:(c + 1) * LANES]
    l = lanes.unbind(1)
    return (((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]))) / d


def reference_rows(p, g, m, rows, neg_clr, wd, eps, maximize, eps_inside_sqrt):
    """Updates rows `rows` of p (R, D) and m (R,) in place from g (len(rows), D) in math type."""
    mt = m.dtype
    g = -g if maximize else g
    pr = p[rows].to(mt)
    if wd != 0:
        g = g + wd * pr
    acc = m[rows] + row_mean_of_squares(g)
    m[rows] = acc
    denom = ieee_sqrt(acc + eps) if eps_inside_sqrt else ieee_sqrt(acc) + eps
    scale = torch.tensor(neg_clr, dtype=mt) / denom
    p[rows] = (pr + scale[:, None] * g).to(p.dtype)


def math_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def neg_clr(lr, step, lr_decay):
    return -(lr / (1 + (step - 1) * lr_decay))


class Reference:
    """The formula on a param seen as (R, D) rows, dense or COO grads (duplicates summed in
    grad order, in the math type)."""

    def __init__(self, p, init=0.0, lr=0.01, lr_decay=0.0, weight_decay=0.0, eps=1e-10,
                 maximize=False, eps_inside_sqrt=False):
        self.shape = p.shape
        self.p = p.detach().clone().reshape(p.shape[0] if p.dim() else 1, -1)
        self.m = torch.full(self.p.shape[:1], init, dtype=math_dtype(p.dtype))
        self.kw = dict(wd=weight_decay, eps=eps, maximize=maximize, eps_inside_sqrt=eps_inside_sqrt)
        self.lr, self.lr_decay, self.step = lr, lr_decay, 0

    def update(self, grad):
        self.step += 1
        clr = neg_clr(self.lr, self.step, self.lr_decay)
        mt = self.m.dtype
        if grad.is_sparse:
            idx, values = grad._indices()[0].tolist(), grad._values().reshape(len(grad._indices()[0]), -1)
            rows = sorted(set(idx))
            summed = []
            for r in rows:
                ks = [k for k, i in enumerate(idx) if i == r]
                acc = values[ks[0]].to(mt)
                for k in ks[1:]:
                    acc = acc + values[k].to(mt)
                summed.append(acc)
            rows_t = torch.tensor(rows, dtype=torch.long)
            reference_rows(self.p, torch.stack(summed), self.m, rows_t, clr, **self.kw)
        else:
            g = grad.reshape(self.p.shape).to(mt)
            reference_rows(self.p, g, self.m, torch.arange(self.p.shape[0]), clr, **self.kw)

    def param(self):
        return self.p.reshape(self.shape)

    def sum(self):
        return self.m.reshape(self.shape[:1])


OPTIONS = [
    dict(),
    dict(lr_decay=0.05, weight_decay=0.1),
    dict(maximize=True, eps=1e-6),
    dict(eps_inside_sqrt=True, eps=1e-3, weight_decay=0.01, lr_decay=0.1),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(37, 1), (20, 7), (16, 8), (9, 13), (5, 3, 5), (4, 133), (300,), ()])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
def test_dense_bitwise_equal_to_reference(dtype, shape, options):
    gen = torch.Generator().manual_seed(len(shape) * 100 + sum(shape))
    w = torch.randn(shape, generator=gen).to(dtype)
    param = w.clone().requires_grad_()
    kw = dict(lr=0.05, initial_accumulator_value=0.1, **options)
    opt = RowWiseAdagrad([param], **kw)
    ref = Reference(w, init=0.1, **{k: v for k, v in kw.items() if k != "initial_accumulator_value"})
    for step in range(1, 9):
        g = torch.randn(shape, generator=gen).to(dtype)
        param.grad = g
        opt.step()
        ref.update(g)
        assert torch.equal(opt.state[param]["sum"], ref.sum()), f"sum differs at step {step}"
        assert torch.equal(param.detach(), ref.param()), f"param differs at step {step}"
    assert opt.state[param]["step"].item() == 8


def sparse_grad(rows, row_len, ids, dtype, gen):
    values = torch.randn(len(ids), row_len, generator=gen).to(dtype)
    return torch.sparse_coo_tensor(torch.as_tensor(ids)[None], values, (rows, row_len))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("row_len", [1, 13, 64])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
def test_sparse_bitwise_equal_to_reference(dtype, row_len, options):
    """Duplicates in every grad, any order; weight decay applies to the touched rows only."""
    rows, gen = 50, torch.Generator().manual_seed(row_len)
    w = torch.randn(rows, row_len, generator=gen).to(dtype)
    param = w.clone().requires_grad_()
    kw = dict(lr=0.05, initial_accumulator_value=0.1, **options)
    opt = RowWiseAdagrad([param], **kw)
    ref = Reference(w, init=0.1, **{k: v for k, v in kw.items() if k != "initial_accumulator_value"})
    for step in range(1, 7):
        ids = torch.randint(0, rows, (30,), generator=gen).tolist() + [rows - 1, 0, rows - 1]
        g = sparse_grad(rows, row_len, ids, dtype, gen)
        param.grad = g
        opt.step()
        ref.update(g)
        assert torch.equal(opt.state[param]["sum"], ref.sum()), f"sum differs at step {step}"
        assert torch.equal(param.detach(), ref.param()), f"param differs at step {step}"


def test_sparse_touches_only_its_rows_and_dense_params_share_the_group():
    emb = torch.nn.Embedding(1000, 16, sparse=True)
    lin = torch.nn.Linear(16, 1)
    opt = RowWiseAdagrad([emb.weight, *lin.parameters()], lr=0.1, weight_decay=0.01)
    before = emb.weight.detach().clone()
    ids = torch.tensor([[3, 5, 3], [7, 999, 3]])
    lin(emb(ids)).sum().backward()
    assert emb.weight.grad.is_sparse and not lin.weight.grad.is_sparse
    opt.step()
    touched = [3, 5, 7, 999]
    changed = (emb.weight.detach() != before).any(1).nonzero().flatten().tolist()
    assert changed == touched
    s = opt.state[emb.weight]["sum"]
    assert (s[touched] > 0).all() and (s.count_nonzero() == len(touched))
    assert opt.state[lin.weight]["sum"].shape == (1,) and opt.state[lin.bias]["sum"].shape == (1,)


@pytest.mark.parametrize("dtype,sum_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                             (torch.float16, torch.float32), (torch.float64, torch.float64)])
def test_state_is_one_value_per_row(dtype, sum_dtype):
    table, scalar = torch.zeros(100, 8, 2, dtype=dtype), torch.zeros((), dtype=dtype)
    opt = RowWiseAdagrad([table, scalar], initial_accumulator_value=0.25)
    assert opt.state[table]["sum"].shape == (100,) and opt.state[table]["sum"].dtype == sum_dtype
    assert opt.state[scalar]["sum"].shape == () and opt.state[scalar]["sum"].dtype == sum_dtype
    assert torch.equal(opt.state[table]["sum"], torch.full((100,), 0.25, dtype=sum_dtype))
    assert opt.state[table]["step"].dtype == torch.float32


def test_non_contiguous_param_and_grad():
    param = torch.nn.Parameter(torch.randn(20, 13).t())  # shape (13, 20), not contiguous
    w = param.detach().clone()
    opt = RowWiseAdagrad([param], lr=0.1, weight_decay=0.1)
    ref = Reference(w, lr=0.1, weight_decay=0.1)
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        g = torch.randn(20, 13, generator=gen).t()
        param.grad = g
        opt.step()
        ref.update(g.contiguous())
    assert not param.is_contiguous()
    assert torch.equal(param.detach(), ref.param())
    assert torch.equal(opt.state[param]["sum"], ref.sum())


def test_tensor_lr_matches_float_lr_rounded_as_torch_rounds_it():
    w = torch.randn(30, 10)
    a, b = w.clone().requires_grad_(), w.clone().requires_grad_()
    opt_a = RowWiseAdagrad([a], lr=torch.tensor(0.03, dtype=torch.float64), lr_decay=0.2)
    opt_b = RowWiseAdagrad([b], lr=0.03, lr_decay=0.2)
    for _ in range(4):
        g = torch.randn(30, 10)
        a.grad, b.grad = g, g.clone()
        opt_a.step()
        opt_b.step()
    assert torch.equal(a, b)  # a float64 lr tensor divides in float64, as the float does


def test_result_does_not_depend_on_thread_count():
    def train(threads):
        torch.set_num_threads(threads)
        gen = torch.Generator().manual_seed(0)
        table = torch.randn(20_000, 32, generator=gen).requires_grad_()
        dense = torch.randn(4096, 64, generator=gen).requires_grad_()
        opt = RowWiseAdagrad([table, dense], lr=0.1)
        for _ in range(3):
            ids = torch.randint(0, 20_000, (8000,), generator=gen).tolist()
            table.grad = sparse_grad(20_000, 32, ids, torch.float32, gen)
            dense.grad = torch.randn(4096, 64, generator=gen)
            opt.step()
        return table.detach(), dense.detach()
    threads = torch.get_num_threads()
    try:
        one, many = train(1), train(max(2, threads))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


def test_every_compiled_kernel_gives_the_same_bits():
    """The lanes fix the order of the row sums, so base, AVX2 and AVX-512 agree bitwise."""
    import fused_adagrad
    script = textwrap.dedent("""
        import torch, fused_adagrad
        gen = torch.Generator().manual_seed(0)
        out = []
        for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            p = torch.randn(64, 45, generator=gen).to(dtype).requires_grad_()
            e = torch.randn(100, 19, generator=gen).to(dtype).requires_grad_()
            opt = fused_adagrad.RowWiseAdagrad([p, e], lr=0.1, weight_decay=0.05)
            for _ in range(3):
                p.grad = torch.randn(64, 45, generator=gen).to(dtype)
                ids = torch.randint(0, 100, (60,), generator=gen)
                e.grad = torch.sparse_coo_tensor(ids[None], torch.randn(60, 19, generator=gen).to(dtype), (100, 19))
                opt.step()
            out += [p.detach().float(), e.detach().float(), opt.state[p]["sum"], opt.state[e]["sum"]]
        torch.save(out, __import__("sys").argv[1])
    """)
    runnable = fused_adagrad.build_info()["cpu_kernels_runnable"]
    if len(runnable) < 2:
        pytest.skip(f"this CPU runs only the {runnable[0]} kernel: nothing to compare it with")
    results = {}
    for kernel in runnable:
        path = f"{os.environ.get('TMPDIR', '/tmp')}/rowwise-{kernel}-{os.getpid()}.pt"
        run = subprocess.run([sys.executable, "-c", script, path],
                             env={**os.environ, "FUSED_ADAGRAD_CPU_KERNEL": kernel},
                             capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        results[kernel] = torch.load(path)
        os.remove(path)
    assert "base" in results
    base = results.pop("base")
    for kernel, out in results.items():
        assert all(torch.equal(a, b) for a, b in zip(base, out)), f"{kernel} differs from base"


def test_state_dict_round_trip_resumes_identically():
    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Embedding(50, 8, sparse=True), torch.nn.Linear(8, 2))
    def batch(i):
        g = torch.Generator().manual_seed(i)
        return torch.randint(0, 50, (16,), generator=g)
    straight, resumed = make(), make()
    opt = RowWiseAdagrad(straight.parameters(), lr=0.1, lr_decay=0.01)
    for i in range(6):
        opt.zero_grad()
        straight(batch(i)).sum().backward()
        opt.step()
    first = RowWiseAdagrad(resumed.parameters(), lr=0.1, lr_decay=0.01)
    for i in range(3):
        first.zero_grad()
        resumed(batch(i)).sum().backward()
        first.step()
    saved = first.state_dict()
    second = RowWiseAdagrad(resumed.parameters(), lr=0.1, lr_decay=0.01)
    second.load_state_dict(saved)
    for i in range(3, 6):
        second.zero_grad()
        resumed(batch(i)).sum().backward()
        second.step()
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_checkpoint_keeps_float32_sums(dtype):
    # torch's load_state_dict casts state tensors to the param's dtype; the row sums must not be.
    table = torch.nn.Parameter(torch.randn(20, 8).to(dtype))
    opt = RowWiseAdagrad([table], lr=0.1)
    for i in range(3):
        table.grad = torch.randn(20, 8, generator=torch.Generator().manual_seed(i)).to(dtype)
        opt.step()
    saved = io.BytesIO()
    torch.save(opt.state_dict(), saved)
    saved.seek(0)
    copy = torch.nn.Parameter(table.detach().clone())
    resumed = RowWiseAdagrad([copy], lr=0.1)
    resumed.load_state_dict(torch.load(saved))
    loaded = resumed.state[copy]["sum"]
    assert loaded.dtype == torch.float32
    assert torch.equal(loaded, opt.state[table]["sum"])
    g = torch.randn(20, 8).to(dtype)
    table.grad, copy.grad = g, g.clone()
    opt.step()
    resumed.step()
    assert torch.equal(table, copy)


def test_bad_inputs_raise_and_change_nothing():
    table = torch.nn.Parameter(torch.randn(10, 4))
    other = torch.nn.Parameter(torch.randn(6, 3))
    opt = RowWiseAdagrad([{"params": [table]}, {"params": [other]}], lr=0.1)
    table.grad = torch.randn(10, 4)
    snapshot = [table.detach().clone(), opt.state[table]["sum"].clone(), opt.state[table]["step"].clone()]
    for grad, match in [
        (torch.sparse_coo_tensor(torch.tensor([[1, 7]]), torch.randn(2, 3), (6, 3), check_invariants=False),
         r"sparse grad index 7 \(entry 1\) is out of range"),
        (torch.randn(6, 3).to_sparse(2), "row-wise Adagrad takes sparse grads over rows of dim 0.*got sparse_dim 2"),
        ("wrong state", r"row-wise state 'sum' has shape \[5\]"),
    ]:
        if isinstance(grad, str):
            opt.state[other]["sum"], grad = torch.zeros(5), torch.randn(6, 3)
        other.grad = grad
        with pytest.raises(RuntimeError, match=f"RowWiseAdagrad: param group 1, param 0: {match}"):
            opt.step()
        after = [table.detach(), opt.state[table]["sum"], opt.state[table]["step"]]
        assert all(torch.equal(a, b) for a, b in zip(snapshot, after))


def test_state_of_the_other_optimizer_is_refused_by_name():
    p = torch.nn.Parameter(torch.randn(5, 4))
    elementwise = FusedAdagrad([p])
    opt = RowWiseAdagrad([p])
    opt.load_state_dict(elementwise.state_dict())
    p.grad = torch.randn(5, 4)
    with pytest.raises(RuntimeError, match=r"row-wise state 'sum' has shape \[5, 4\] but a parameter "
                                           r"of shape \[5, 4\] needs \[5\]"):
        opt.step()


def test_argument_errors_mirror_torch():
    p = torch.nn.Parameter(torch.randn(3, 2))
    with pytest.raises(ValueError, match="Invalid learning rate"):
        RowWiseAdagrad([p], lr=-1)
    with pytest.raises(ValueError, match="Invalid epsilon value"):
        RowWiseAdagrad([p], eps=-1)
    with pytest.raises(ValueError, match="complex"):
        RowWiseAdagrad([torch.nn.Parameter(torch.randn(3, 2, dtype=torch.complex64))])


@needs_compilable_op
def test_op_checks_pass_opcheck():
    p = [torch.randn(4, 3), torch.randn(())]
    args = (p, [torch.randn(4, 3), torch.randn(())], [torch.zeros(4), torch.zeros(())],
            [torch.tensor(0.0), torch.tensor(0.0)])
    torch.library.opcheck(torch.ops.fused_adagrad.rowwise_adagrad_step_, args,
                          dict(lr=0.1, lr_decay=0.0, weight_decay=0.0, eps=1e-10, maximize=False))

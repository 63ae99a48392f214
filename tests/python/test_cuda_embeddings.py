"""Embedding tables on CUDA: the fused sparse step and RowWiseAdagrad (dense and sparse grads).

The CUDA kernels use the CPU kernels' arithmetic (correctly rounded operations, FMAs at the same
places, row-wise sums in the same 8 lanes and pairwise order, duplicates summed in grad order),
so every result is compared bitwise with the CPU's, which tests/python/test_sparse.py and
test_rowwise.py compare with torch and with a reference of the formula.

Skipped as a whole without a GPU or when the extension was built without CUDA (failed
instead with FUSED_ADAGRAD_REQUIRE_CUDA=1).
"""
import pytest
import torch

import fused_adagrad
from fused_adagrad import FusedAdagrad, RowWiseAdagrad

from cuda_available import skip_or_fail_without_cuda
from reference import assert_same

skip_or_fail_without_cuda()

DEV = torch.device("cuda")
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
OPTIONS = [dict(), dict(lr_decay=0.05, maximize=True), dict(eps_inside_sqrt=True, eps=1e-3),
           dict(lr="tensor", initial_accumulator_value=0.2)]


def resolve(kw, device):
    kw = dict(kw)
    if kw.get("lr") == "tensor":
        kw["lr"] = torch.tensor(0.03, device=device)
    return kw


def sparse_grads(rows, row_len, dtype, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, rows, (3 * rows // 4,), generator=gen)  # many repeats, any order
        values = torch.randn(len(ids), row_len, generator=gen).to(dtype)
        out.append(torch.sparse_coo_tensor(ids[None], values, (rows, row_len)))
    return out


def train_both(opt_cls, w, grads, dense_grads=None, **kw):
    """The same steps on CPU and CUDA; returns (cpu param, cpu state, cuda param, cuda state)."""
    results = []
    for device in ("cpu", DEV):
        p = w.clone().to(device).requires_grad_()
        opt = opt_cls([p], **resolve(kw, device))
        for g in grads:
            p.grad = g.to(device)
            opt.step()
        results += [p.detach().cpu(), {k: v.cpu() for k, v in opt.state[p].items()}]
    return results


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("row_len", [1, 13, 64, 300])
@pytest.mark.parametrize("kw", OPTIONS, ids=str)
def test_fused_sparse_step_bitwise_equal_to_cpu(dtype, row_len, kw):
    rows = 200
    w = torch.randn(rows, row_len).to(dtype)
    p_cpu, s_cpu, p_cuda, s_cuda = train_both(FusedAdagrad, w, sparse_grads(rows, row_len, dtype, 6),
                                              **{"lr": 0.05, **kw})
    assert_same(p_cpu, p_cuda)
    assert_same(s_cpu["sum"], s_cuda["sum"])
    assert torch.equal(s_cpu["step"], s_cuda["step"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (300,), (64, 1), (40, 13), (16, 8), (7, 3, 5), (5, 1000)])
@pytest.mark.parametrize("kw", OPTIONS + [dict(weight_decay=0.1)], ids=str)
def test_rowwise_dense_bitwise_equal_to_cpu(dtype, shape, kw):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(shape, generator=gen).to(dtype)
    grads = [torch.randn(shape, generator=gen).to(dtype) for _ in range(6)]
    p_cpu, s_cpu, p_cuda, s_cuda = train_both(RowWiseAdagrad, w, grads, **{"lr": 0.05, **kw})
    assert_same(p_cpu, p_cuda)
    assert_same(s_cpu["sum"], s_cuda["sum"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("row_len", [1, 13, 128])
@pytest.mark.parametrize("kw", OPTIONS + [dict(weight_decay=0.1)], ids=str)
def test_rowwise_sparse_bitwise_equal_to_cpu(dtype, row_len, kw):
    rows = 300
    w = torch.randn(rows, row_len).to(dtype)
    p_cpu, s_cpu, p_cuda, s_cuda = train_both(RowWiseAdagrad, w, sparse_grads(rows, row_len, dtype, 6, 2),
                                              **{"lr": 0.05, **kw})
    assert_same(p_cpu, p_cuda)
    assert_same(s_cpu["sum"], s_cuda["sum"])


def hot_row_grads(rows, row_len, dtype, steps):
    """Runs of every length the kernels treat apart: the first and the last table row hit
    hundreds of times (the last one's run ends the sorted ids), others 9, 8, 33 and once: runs
    longer than a warp's 32-wide search and than the kernels' 8 loads in flight, and not a
    multiple of either."""
    gen = torch.Generator().manual_seed(3)
    counts = {0: 301, rows - 1: 257, 5: 9, 7: 8, 11: 33, 13: 1}
    out = []
    for _ in range(steps):
        ids = torch.tensor([r for r, c in counts.items() for _ in range(c)])
        ids = ids[torch.randperm(len(ids), generator=gen)]
        values = torch.randn(len(ids), row_len, generator=gen).to(dtype)
        out.append(torch.sparse_coo_tensor(ids[None], values, (rows, row_len)))
    return out


@pytest.mark.parametrize("opt_cls", [FusedAdagrad, RowWiseAdagrad])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("row_len", [1, 13, 128])
def test_hot_rows_bitwise_equal_to_cpu(opt_cls, dtype, row_len):
    w = torch.randn(40, row_len).to(dtype)
    p_cpu, s_cpu, p_cuda, s_cuda = train_both(opt_cls, w, hot_row_grads(40, row_len, dtype, 4),
                                              lr=0.05, initial_accumulator_value=0.1)
    assert_same(p_cpu, p_cuda)
    assert_same(s_cpu["sum"], s_cuda["sum"])


@pytest.mark.parametrize("opt_cls", [FusedAdagrad, RowWiseAdagrad])
def test_bad_index_on_the_device_raises_and_changes_nothing(opt_cls):
    table = torch.nn.Parameter(torch.randn(50, 8, device=DEV))
    dense = torch.nn.Parameter(torch.randn(10, device=DEV))
    opt = opt_cls([{"params": [dense]}, {"params": [table]}], lr=0.1)
    dense.grad = torch.randn(10, device=DEV)
    bad = torch.sparse_coo_tensor(torch.tensor([[3, 50, 7]], device=DEV), torch.randn(3, 8, device=DEV),
                                  (50, 8), check_invariants=False)
    table.grad = bad
    before = [dense.detach().clone(), table.detach().clone(), opt.state[dense]["step"].clone()]
    with pytest.raises(RuntimeError, match=r"param group 1, param 0: sparse grad index 50 \(entry 1\)"):
        opt.step()
    after = [dense.detach(), table.detach(), opt.state[dense]["step"]]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_embedding_training_on_cuda_matches_cpu():
    def run(device):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.EmbeddingBag(1000, 32, mode="sum", sparse=True),
                                    torch.nn.Linear(32, 1)).to(device)
        opts = [RowWiseAdagrad(model[0].parameters(), lr=0.05),
                FusedAdagrad(model[1].parameters(), lr=0.05)]
        gen = torch.Generator().manual_seed(1)
        for _ in range(10):
            ids = torch.randint(0, 1000, (64, 6), generator=gen).to(device)
            for o in opts:
                o.zero_grad()
            model(ids).square().mean().backward()
            for o in opts:
                o.step()
        return [p.detach().cpu() for p in model.parameters()]
    # The forward and backward differ between devices in the last bits; the optimizers must not
    # add more than that.
    for a, b in zip(run("cpu"), run(DEV)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

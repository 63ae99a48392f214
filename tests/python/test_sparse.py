"""The fused sparse step (COO grads as nn.Embedding/EmbeddingBag(sparse=True) make them) against
torch.optim.Adagrad's sparse path: no coalesce, indices checked before anything changes, and the
same numbers independent of the thread count."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from fused_adagrad import FusedAdagrad, RowWiseAdagrad

LOW = (torch.bfloat16, torch.float16)


def sparse_grad(rows, row_len, ids, dtype, gen=None):
    values = torch.randn(len(ids), row_len, generator=gen).to(dtype)
    return torch.sparse_coo_tensor(torch.as_tensor(ids)[None], values, (rows, row_len))


def replica_step(p, grad, s, clr, eps, maximize=False, eps_inside_sqrt=False):
    """torch's sparse arithmetic for float32 on unique rows, in place, with an IEEE sqrt (torch's
    MKL sqrt is not correctly rounded on every CPU) and torch's BLAS axpy (one FMA, emulated in
    float64: the product of two floats is exact there)."""
    g = grad.coalesce()
    idx, v = g._indices()[0], g._values()
    v = -v if maximize else v
    s[idx] = s[idx] + v * v
    sv = s[idx]
    sqrt = lambda t: torch.from_numpy(np.sqrt(t.numpy()))
    std = sqrt(sv + eps) if eps_inside_sqrt else sqrt(sv) + eps
    q = v / std
    p[idx] = (p[idx].double() + np.float32(-clr).item() * q.double()).float()


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("eps_inside_sqrt", [False, True])
@pytest.mark.parametrize("row_len", [1, 7, 64, 133])
def test_unique_rows_bitwise_equal_to_replica(row_len, maximize, eps_inside_sqrt):
    rows, gen = 300, torch.Generator().manual_seed(row_len)
    p = torch.randn(rows, row_len, generator=gen)
    ref_p, ref_s = p.clone(), torch.full_like(p, 0.1)
    param = p.clone().requires_grad_()
    opt = FusedAdagrad([param], lr=0.05, lr_decay=0.01, initial_accumulator_value=0.1, eps=1e-6,
                       maximize=maximize, eps_inside_sqrt=eps_inside_sqrt)
    for step in range(1, 8):
        ids = torch.randperm(rows, generator=gen)[:120]  # any order, no repeats
        if step == 3:
            ids = torch.cat([ids[:-2], torch.tensor([0, rows - 1])])  # the first and last rows
        g = sparse_grad(rows, row_len, ids, torch.float32, gen)
        param.grad = g
        opt.step()
        clr = 0.05 / (1 + (step - 1) * 0.01)
        replica_step(ref_p, g, ref_s, clr, 1e-6, maximize, eps_inside_sqrt)
        assert torch.equal(opt.state[param]["sum"], ref_s), f"sum differs at step {step}"
        assert torch.equal(param.detach(), ref_p), f"param differs at step {step}"


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("maximize", [False, True])
def test_low_precision_bitwise_equal_to_torch(dtype, maximize):
    rows, row_len, gen = 500, 40, torch.Generator().manual_seed(1)
    w = torch.randn(rows, row_len, generator=gen).to(dtype)
    ours, ref = w.clone().requires_grad_(), w.clone().requires_grad_()
    kw = dict(lr=0.1, initial_accumulator_value=0.2, maximize=maximize)
    opt, ref_opt = FusedAdagrad([ours], **kw), torch.optim.Adagrad([ref], **kw)
    for _ in range(10):
        g = sparse_grad(rows, row_len, torch.randperm(rows, generator=gen)[:200], dtype, gen)
        ours.grad, ref.grad = g, g.clone()
        opt.step()
        ref_opt.step()
        assert torch.equal(opt.state[ours]["sum"], ref_opt.state[ref]["sum"])
        assert torch.equal(ours.detach(), ref.detach())


def train_pair(module_fn, dtype, steps=20, **kw):
    torch.manual_seed(0)
    ref_model = module_fn().to(dtype)
    our_model = module_fn().to(dtype)
    our_model.load_state_dict(ref_model.state_dict())
    ref_opt = torch.optim.Adagrad(ref_model.parameters(), **kw)
    our_opt = FusedAdagrad(our_model.parameters(), **kw)
    gen = torch.Generator().manual_seed(2)
    for _ in range(steps):
        ids = torch.randint(0, 1000, (64, 5), generator=gen)  # many repeated rows
        for model, opt in ((ref_model, ref_opt), (our_model, our_opt)):
            opt.zero_grad()
            model(ids).float().square().mean().backward()
            assert model[0].weight.grad.is_sparse
            opt.step()
    return ref_model, our_model, ref_opt, our_opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["Embedding", "EmbeddingBag"])
def test_embedding_training_matches_torch(kind, dtype):
    """Real modules, duplicates in every batch, a dense Linear in the same group. The sums of a
    row's duplicates may differ from torch's coalesce order in the last bit, and torch's MKL sqrt
    by an ulp, so: close after 20 steps, within a bound that an off-by-one-step clr fails."""
    def module_fn():
        emb = (torch.nn.Embedding(1000, 16, sparse=True) if kind == "Embedding"
               else torch.nn.EmbeddingBag(1000, 16, mode="sum", sparse=True))
        return torch.nn.Sequential(emb, torch.nn.Linear(16, 3))
    ref_model, our_model, *_ = train_pair(module_fn, dtype, lr=0.05, lr_decay=0.01,
                                          initial_accumulator_value=0.1)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for a, b in zip(our_model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_duplicates_seen_once_twice_many_times():
    rows, row_len = 10, 33
    ids = [4, 7, 4, 9, 4, 4, 2, 7, 4]  # row 4 five times, row 7 twice, rows 9 and 2 once
    g = sparse_grad(rows, row_len, ids, torch.float64, torch.Generator().manual_seed(3))
    w = torch.randn(rows, row_len, dtype=torch.float64)
    ours, ref = w.clone().requires_grad_(), w.clone().requires_grad_()
    opt, ref_opt = FusedAdagrad([ours], lr=0.1), torch.optim.Adagrad([ref], lr=0.1)
    ours.grad, ref.grad = g, g.clone()
    opt.step()
    ref_opt.step()
    torch.testing.assert_close(opt.state[ours]["sum"], ref_opt.state[ref]["sum"], rtol=1e-15, atol=0)
    torch.testing.assert_close(ours, ref, rtol=1e-15, atol=1e-15)
    untouched = [r for r in range(rows) if r not in ids]
    assert torch.equal(ours.detach()[untouched], w[untouched])


@pytest.mark.parametrize("rows", [3, 2048, 4 << 20, (4 << 20) + 1])
def test_duplicates_grouped_whatever_the_number_of_sort_digits(rows):
    """A row's duplicates are found by a radix sort on digits of up to 11 bits: a table of 2 048
    rows takes one pass, 4M rows two, one row more three. Ids that differ from one another in a
    single bit, for every bit of a row id, and ids that tie in their low digits, each repeated far
    apart: the step equals the step on a grad with the duplicates summed first, in entry order
    (the order torch's coalesce sums them)."""
    gen = torch.Generator().manual_seed(rows % 1000)
    base = rows // 3
    pool = sorted({base ^ (1 << b) for b in range(rows.bit_length()) if base ^ (1 << b) < rows}
                  | {(k << 11 | 5) % rows for k in range(8)} | {base, 0, rows - 1})
    ids = torch.tensor(pool)[torch.randint(len(pool), (160,), generator=gen)]
    values = torch.randn(len(ids), 3, generator=gen)
    summed = {}
    for r, v in zip(ids.tolist(), values):
        summed[r] = summed[r] + v if r in summed else v.clone()  # float32 adds, in entry order
    once = torch.sparse_coo_tensor(torch.tensor(list(summed))[None], torch.stack(list(summed.values())),
                                   (rows, 3))
    ours, ref = torch.zeros(rows, 3, requires_grad=True), torch.zeros(rows, 3, requires_grad=True)
    opt, ref_opt = FusedAdagrad([ours], lr=0.1), FusedAdagrad([ref], lr=0.1)
    ours.grad = torch.sparse_coo_tensor(ids[None], values, (rows, 3))
    ref.grad = once
    opt.step()
    ref_opt.step()
    assert torch.equal(opt.state[ours]["sum"], ref_opt.state[ref]["sum"])
    assert torch.equal(ours.detach(), ref.detach())
    assert int((opt.state[ours]["sum"].sum(1) > 0).sum()) == len(summed)


def _transparent_huge_pages():
    """The system's THP mode ("always", "madvise", "never"), None where there is none."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")]


def _huge_page_bytes(t):
    """AnonHugePages of the mapping that holds t's first whole 2 MiB page (/proc/self/smaps)."""
    page = 2 << 20
    addr = (t.data_ptr() + page - 1) // page * page
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            field = line.split()[0]
            if "-" in field and not field.endswith(":"):
                low, high = (int(x, 16) for x in field.split("-"))
                inside = low <= addr < high
            elif inside and field == "AnonHugePages:":
                return int(line.split()[1]) * 1024
    return 0


needs_thp = pytest.mark.skipif(_transparent_huge_pages() in (None, "never"),
                               reason="this system has no transparent huge pages")


@needs_thp
@pytest.mark.parametrize("opt_cls", [FusedAdagrad, RowWiseAdagrad])
def test_state_of_a_large_table_lies_on_huge_pages(opt_cls):
    """A sparse step touches rows all over the table: its state is asked onto 2 MiB pages
    (madvise before the first write), and holds the same values as ever. Sums of 64 MiB and
    more: glibc serves smaller blocks (up to 32 MiB) from memory it may have written before,
    whose pages stay small until khugepaged collapses them."""
    p = torch.zeros(1 << 24, 2)
    opt = opt_cls([p], initial_accumulator_value=0.25)
    s = opt.state[p]["sum"]
    assert _huge_page_bytes(s) > 0
    assert torch.equal(s, torch.full_like(s, 0.25))


@needs_thp
@pytest.mark.parametrize("opt_cls", [FusedAdagrad, RowWiseAdagrad])
def test_state_loaded_from_a_checkpoint_moves_onto_huge_pages(opt_cls, tmp_path):
    """torch.load allocates the sums without the advice; load_state_dict copies them over."""
    p = torch.zeros(1 << 24, 2)
    opt = opt_cls([p], initial_accumulator_value=0.25)
    p.grad = torch.sparse_coo_tensor(torch.tensor([[3, 7, 3]]), torch.ones(3, 2), p.shape)
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    resumed = opt_cls([p])
    resumed.load_state_dict(torch.load(tmp_path / "opt.pt"))
    s = resumed.state[p]["sum"]
    assert _huge_page_bytes(s) > 0
    assert torch.equal(s, opt.state[p]["sum"])


@needs_thp
def test_huge_page_advice_only_for_whole_pages_of_fresh_cpu_tensors():
    from fused_adagrad import _C
    assert _C.advise_huge_pages(torch.empty(8 << 20, dtype=torch.uint8))
    assert not _C.advise_huge_pages(torch.empty(1 << 20, dtype=torch.uint8))  # no whole 2 MiB page
    assert not _C.advise_huge_pages(torch.empty(8 << 20, dtype=torch.uint8, device="meta"))
    code = ("import torch, fused_adagrad\n"
            "print(fused_adagrad._C.advise_huge_pages(torch.empty(8 << 20, dtype=torch.uint8)))")
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "FUSED_ADAGRAD_HUGE_PAGES": "0"}, check=True)
    assert off.stdout.strip() == "False"


def test_tensor_lr_and_lr_decay_match_torch():
    rows, row_len = 200, 24
    w = torch.randn(rows, row_len)
    ours, ref = w.clone().requires_grad_(), w.clone().requires_grad_()
    kw = dict(lr_decay=0.1, initial_accumulator_value=0.5)
    opt = FusedAdagrad([ours], lr=torch.tensor(0.02), **kw)
    ref_opt = torch.optim.Adagrad([ref], lr=torch.tensor(0.02), **kw)
    gen = torch.Generator().manual_seed(4)
    for _ in range(6):
        g = sparse_grad(rows, row_len, torch.randperm(rows, generator=gen)[:50], torch.float32, gen)
        ours.grad, ref.grad = g, g.clone()
        opt.step()
        ref_opt.step()
    assert torch.equal(opt.state[ours]["sum"], ref_opt.state[ref]["sum"])
    torch.testing.assert_close(ours, ref, rtol=2e-7, atol=1e-7)
    assert opt.state[ours]["step"].item() == 6


def test_empty_grad_counts_a_step_and_changes_nothing_else():
    w = torch.randn(50, 8)
    p = w.clone().requires_grad_()
    opt = FusedAdagrad([p], lr=0.1)
    p.grad = torch.sparse_coo_tensor(torch.empty(1, 0, dtype=torch.long), torch.empty(0, 8), (50, 8))
    opt.step()
    assert torch.equal(p.detach(), w)
    assert torch.equal(opt.state[p]["sum"], torch.zeros_like(w))
    assert opt.state[p]["step"].item() == 1  # as torch.optim.Adagrad counts it


def test_same_numbers_for_any_thread_count():
    rows, row_len = 4000, 128  # enough work for several chunks per thread
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 400, (6000,), generator=gen)  # heavy duplication
    g = sparse_grad(rows, row_len, ids, torch.float32, gen)
    w = torch.randn(rows, row_len, generator=gen)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            p = w.clone().requires_grad_()
            opt = FusedAdagrad([p], lr=0.1)
            p.grad = g
            opt.step()
            results.append((p.detach().clone(), opt.state[p]["sum"].clone()))
    finally:
        torch.set_num_threads(threads)
    for p, s in results[1:]:
        assert torch.equal(p, results[0][0]) and torch.equal(s, results[0][1])


def bad_index_grad(index):
    # check_invariants=False: build the tensor a buggy data pipeline would hand over.
    return torch.sparse_coo_tensor(torch.tensor([[1, index]]), torch.ones(2, 4), (10, 4),
                                   check_invariants=False)


@pytest.mark.parametrize("index", [10, 11, 10**9])
def test_out_of_range_index_refused_with_nothing_changed(index):
    params = [torch.randn(10, 4, requires_grad=True) for _ in range(2)]
    opt = FusedAdagrad([{"params": [params[0]]}, {"params": [params[1]]}], lr=0.1)
    params[0].grad = torch.randn(10, 4)  # a dense param in an earlier group must not step either
    params[1].grad = bad_index_grad(index)
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match=f"param group 1, param 0: sparse grad index {index} "
                                           r"\(entry 1\) is out of range for dimension 0 of size 10"):
        opt.step()
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)
        assert opt.state[p]["step"].item() == 0
        assert torch.equal(opt.state[p]["sum"], torch.zeros_like(b))


@pytest.mark.parametrize("opt_cls", [FusedAdagrad, RowWiseAdagrad], ids=lambda c: c.__name__)
def test_index_into_an_empty_table_refused(opt_cls):
    # No row exists, so any index is out of range, though the step would touch no memory.
    table = torch.zeros(0, 4, requires_grad=True)
    opt = opt_cls([table], lr=0.1)
    table.grad = torch.sparse_coo_tensor(torch.tensor([[3]]), torch.ones(1, 4), (0, 4),
                                         check_invariants=False)
    with pytest.raises(RuntimeError, match=r"param 0: sparse grad index 3 \(entry 0\) is out of "
                                           "range for dimension 0 of size 0"):
        opt.step()
    assert opt.state[table]["step"].item() == 0


def test_negative_index_refused_in_a_child_process():
    """torch's own Adagrad corrupts memory on a negative index; run it where a crash fails the
    test instead of killing the suite."""
    code = textwrap.dedent("""
        import torch
        from fused_adagrad import FusedAdagrad
        p = torch.randn(10, 4, requires_grad=True)
        before = p.detach().clone()
        opt = FusedAdagrad([p], lr=0.1)
        p.grad = torch.sparse_coo_tensor(torch.tensor([[3, -1]]), torch.ones(2, 4), (10, 4),
                                         check_invariants=False)
        try:
            opt.step()
        except RuntimeError as e:
            assert "sparse grad index -1 (entry 1) is out of range" in str(e), e
            assert torch.equal(p.detach(), before)
            assert opt.state[p]["step"].item() == 0 and not opt.state[p]["sum"].any()
            print("REFUSED")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "REFUSED" in out.stdout


def test_weight_decay_and_complex_refused():
    p = torch.randn(10, 4, requires_grad=True)
    opt = FusedAdagrad([p], lr=0.1, weight_decay=0.1)
    p.grad = bad_index_grad(2)
    with pytest.raises(RuntimeError, match="weight_decay option is not compatible with sparse"):
        opt.step()
    c = torch.randn(10, 4, dtype=torch.complex64, requires_grad=True)
    opt = FusedAdagrad([c], lr=0.1)
    c.grad = torch.sparse_coo_tensor(torch.tensor([[1]]), torch.ones(1, 4, dtype=torch.complex64),
                                     (10, 4))
    with pytest.raises(RuntimeError, match="sparse gradients of complex parameters"):
        opt.step()
    assert opt.state[c]["step"].item() == 0


def test_two_sparse_dims_and_non_contiguous_table():
    """A COO grad over both dims of a matrix (rows of one element), and a table stored
    transposed (updated through a contiguous copy, written back)."""
    w = torch.randn(6, 5, dtype=torch.float64)
    idx = torch.tensor([[0, 5, 2, 2], [4, 0, 3, 1]])
    g = torch.sparse_coo_tensor(idx, torch.randn(4, dtype=torch.float64), (6, 5))
    for table in (w.clone(), w.t().contiguous().t()):
        ours, ref = table.clone().requires_grad_(), w.clone().requires_grad_()
        if not table.is_contiguous():
            ours = table.detach().requires_grad_()
        opt, ref_opt = FusedAdagrad([ours], lr=0.1), torch.optim.Adagrad([ref], lr=0.1)
        ours.grad, ref.grad = g, g.clone()
        opt.step()
        ref_opt.step()
        torch.testing.assert_close(ours, ref, rtol=1e-15, atol=1e-15)
        torch.testing.assert_close(opt.state[ours]["sum"], ref_opt.state[ref]["sum"], rtol=0, atol=0)

"""embedding_bags_adagrad_step_ on CUDA: every result compared bitwise with the same op on CPU
copies of the tables, state and batch.

The CUDA kernel sums each table row's entries in entry order (in the param's dtype element-wise,
in the math type row-wise, each scaled entry rounded first) and updates the row with the CPU
kernels' correctly rounded arithmetic, so its numbers are the CPU's, which
test_embedding_bags.py compares with nn.EmbeddingBag(sparse=True) stepped by FusedAdagrad and
RowWiseAdagrad.

Skipped as a whole without a GPU or when the extension was built without CUDA (failed
instead with FUSED_ADAGRAD_REQUIRE_CUDA=1).
"""
import pytest
import torch

from fused_adagrad import FusedEmbeddingBags

from cuda_available import skip_or_fail_without_cuda

skip_or_fail_without_cuda()

DEV = torch.device("cuda")
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Rows of one element, shorter than the eight row-wise lanes, shorter and longer than a warp.
TABLES = [(50, 8), (7, 3), (1000, 17), (30, 40), (5, 1)]
BATCH = 8

step_op = torch.ops.fused_adagrad.embedding_bags_adagrad_step_


def random_batch(gen, padding_idx, include_last_offset=False, untouched=None, max_bag=6,
                 hot_rows=3):
    """Bags of 0..max_bag-1 ids per table (empty bags among them). Tables of few rows draw from
    `hot_rows` rows, so rows repeat within and across bags, in no order; a table with a
    padding_idx gets it for about a quarter of its ids; table `untouched` gets only empty bags."""
    ids, offsets, end = [], [], 0
    for t, (rows, _) in enumerate(TABLES):
        for _ in range(BATCH):
            n = 0 if t == untouched else int(torch.randint(0, max_bag, (1,), generator=gen))
            offsets.append(end)
            end += n
            bag = torch.randint(0, rows if rows > 10 else min(rows, hot_rows), (n,), generator=gen)
            if padding_idx[t] >= 0:
                bag[torch.rand(n, generator=gen) < 0.25] = padding_idx[t]
            ids.append(bag)
    if include_last_offset:
        offsets.append(end)
    return torch.cat(ids), torch.tensor(offsets)


def output_grad(gen, dtype, layout):
    """The output grad as a function of the device: `layout` "broadcast" (row stride 0, as
    out.sum() gives) and "transposed" (column stride != 1) are made on the device, since moving
    such a tensor makes it contiguous."""
    width = sum(dim for _, dim in TABLES)
    if layout == "broadcast":
        row = torch.randn(1, width, generator=gen).to(dtype)
        return lambda device: row.to(device).expand(BATCH, width)
    if layout == "transposed":
        cols = torch.randn(width, BATCH, generator=gen).to(dtype)
        return lambda device: cols.to(device).t()
    grad = torch.randn(BATCH, width, generator=gen).to(dtype)
    return lambda device: grad.to(device)


def initial_state(dtype, rowwise, init=0.0, seed=0):
    """Tables and Adagrad state as FusedAdagrad (RowWiseAdagrad) keeps them, on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(rows, dim, generator=gen).to(dtype) for rows, dim in TABLES]
    if rowwise:
        sum_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        sums = [torch.full((rows,), init, dtype=sum_dtype) for rows, _ in TABLES]
    else:
        sums = [torch.full_like(w, init) for w in weights]
    steps = [torch.zeros((), dtype=torch.float32) for _ in TABLES]
    return weights, sums, steps


def batches(dtype, count=4, seed=1, psw=False, layout="dense", padding=False, **batch_kw):
    gen = torch.Generator().manual_seed(seed)
    padding_idx = [1, -1, 5, 0, -1] if padding else [-1] * len(TABLES)
    out = []
    for _ in range(count):
        indices, offsets = random_batch(gen, padding_idx, **batch_kw)
        weights = torch.rand(len(indices), generator=gen).to(dtype) if psw else None
        out.append((output_grad(gen, dtype, layout), indices, offsets, weights))
    return padding_idx, out


def run(device, state, padding_idx, batch_list, pooling=0, include_last_offset=False, rowwise=False,
        host_steps=False, lr="float", **options):
    """The batches' steps on copies of `state` on `device`; returns the results on the CPU."""
    weights, sums, steps = ([t.clone().to(device) for t in ts] for ts in state)
    if host_steps:
        steps = [s.cpu() for s in steps]
    kw = dict(lr=0.05, lr_decay=0.0, weight_decay=0.0, eps=1e-10, maximize=False,
              eps_inside_sqrt=False)
    kw.update(options)
    if lr != "float":
        kw["lr_tensor"] = torch.tensor(0.03, dtype=torch.float64 if lr == "tensor64" else
                                       torch.float32, device=device)
    for grad, indices, offsets, psw in batch_list:
        step_op(weights, sums, steps, grad(device), indices.to(device), offsets.to(device),
                None if psw is None else psw.to(device), pooling=pooling, padding_idx=padding_idx,
                include_last_offset=include_last_offset, rowwise=rowwise, **kw)
    return [[t.cpu() for t in ts] for ts in (weights, sums, steps)]


def assert_bitwise(a, b, what):
    """Equal bits (so +0 and -0 differ), NaNs at the same places (their payloads may differ)."""
    assert a.dtype == b.dtype and a.shape == b.shape, what
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    nan = a.isnan()
    assert torch.equal(nan, b.isnan()), f"{what}: NaNs differ"
    same = torch.equal(a[~nan].view(bits), b[~nan].view(bits))
    assert same, f"{what}: max diff {(a.double() - b.double()).abs().nan_to_num().max()}"


def assert_cuda_equals_cpu(state, padding_idx, batch_list, **kw):
    cpu = run("cpu", state, padding_idx, batch_list, **kw)
    cuda = run(DEV, state, padding_idx, batch_list, **kw)
    for name, a_list, b_list in zip(["weight", "sum", "step"], cpu, cuda):
        for t, (a, b) in enumerate(zip(a_list, b_list)):
            assert_bitwise(a, b.to(a.dtype), f"table {t} {name}")
    assert all(float(s) == len(batch_list) for s in cuda[2]), "every table steps once per call"


CONFIGS = {
    "sum": dict(),
    "mean": dict(pooling=1),
    "sum+padding": dict(padding=True),
    "mean+padding": dict(pooling=1, padding=True),
    "per_sample_weights": dict(psw=True),
    "per_sample_weights+padding+last_offset": dict(psw=True, padding=True, include_last_offset=True),
    "untouched_table+last_offset": dict(include_last_offset=True, untouched=2),
    "mean+host_steps": dict(pooling=1, host_steps=True),
    "broadcast_grad": dict(layout="broadcast", pooling=1, padding=True),
    "transposed_grad": dict(layout="transposed", psw=True),
}
BATCH_KEYS = {"psw", "layout", "padding", "include_last_offset", "untouched"}


def split_config(config):
    c = dict(CONFIGS[config])
    batch_kw = {k: c.pop(k) for k in list(c) if k in BATCH_KEYS}
    if "include_last_offset" in batch_kw:
        c["include_last_offset"] = batch_kw["include_last_offset"]
    return batch_kw, c


@pytest.mark.parametrize("rowwise", [False, True], ids=["elementwise", "rowwise"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_bitwise_equal_to_cpu(rowwise, dtype, config):
    batch_kw, kw = split_config(config)
    padding_idx, batch_list = batches(dtype, **batch_kw)
    assert_cuda_equals_cpu(initial_state(dtype, rowwise), padding_idx, batch_list, rowwise=rowwise,
                           **kw)


OPTIONS = {
    "lr_decay+maximize": dict(lr_decay=0.05, maximize=True),
    "eps_inside_sqrt": dict(eps_inside_sqrt=True, eps=1e-3),
    "eps": dict(eps=1e-6),
    "lr_tensor": dict(lr="tensor"),
    "lr_tensor64+lr_decay": dict(lr="tensor64", lr_decay=0.1),
    "lr_tensor+host_steps": dict(lr="tensor", host_steps=True),
}


@pytest.mark.parametrize("rowwise", [False, True], ids=["elementwise", "rowwise"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", OPTIONS, ids=str)
@pytest.mark.parametrize("config", ["mean+padding", "per_sample_weights"])
def test_options_bitwise_equal_to_cpu(rowwise, dtype, options, config):
    batch_kw, kw = split_config(config)
    padding_idx, batch_list = batches(dtype, seed=2, **batch_kw)
    assert_cuda_equals_cpu(initial_state(dtype, rowwise, init=0.1), padding_idx, batch_list,
                           rowwise=rowwise, **kw, **OPTIONS[options])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", ["sum", "mean+padding", "per_sample_weights"])
@pytest.mark.parametrize("options", [dict(), dict(maximize=True, lr="tensor")], ids=str)
def test_rowwise_weight_decay_bitwise_equal_to_cpu(dtype, config, options):
    batch_kw, kw = split_config(config)
    padding_idx, batch_list = batches(dtype, seed=3, **batch_kw)
    assert_cuda_equals_cpu(initial_state(dtype, True), padding_idx, batch_list, rowwise=True,
                           weight_decay=0.1, **kw, **options)


@pytest.mark.parametrize("rowwise", [False, True], ids=["elementwise", "rowwise"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pooling", [0, 1], ids=["sum", "mean"])
def test_a_row_hit_thousands_of_times(rowwise, dtype, pooling):
    """Thousands of entries of a few rows, in bags of hundreds: long sums in entry order."""
    gen = torch.Generator().manual_seed(4)
    state = initial_state(dtype, rowwise)
    padding_idx = [-1, 2, -1, -1, -1]
    batch_list = []
    for _ in range(2):
        indices, offsets = random_batch(gen, padding_idx, max_bag=600, hot_rows=2)
        psw = torch.rand(len(indices), generator=gen).to(dtype) if pooling == 0 else None
        batch_list.append((output_grad(gen, dtype, "dense"), indices, offsets, psw))
    assert_cuda_equals_cpu(state, padding_idx, batch_list, pooling=pooling, rowwise=rowwise)


@pytest.mark.parametrize("rowwise", [False, True], ids=["elementwise", "rowwise"])
def test_no_ids_at_all_still_steps_every_table(rowwise):
    empty = (output_grad(torch.Generator().manual_seed(5), torch.float32, "dense"),
             torch.zeros(0, dtype=torch.long), torch.zeros(len(TABLES) * BATCH, dtype=torch.long),
             None)
    state = initial_state(torch.float32, rowwise)
    weights, sums, steps = run(DEV, state, [-1] * len(TABLES), [empty, empty], rowwise=rowwise)
    assert all(torch.equal(a, b) for a, b in zip(weights + sums, state[0] + state[1]))
    assert [float(s) for s in steps] == [2.0] * len(TABLES)


def test_int32_ids_and_a_float64_step_on_the_device():
    """int32 ids and offsets, and a float64 step on the device (a torch.optim.Adagrad checkpoint
    may bring one), which the kernels count in a float32 copy written back."""
    padding_idx, batch_list = batches(torch.float32, count=3, psw=True, padding=True)
    results = []
    for device in ("cpu", DEV):
        weights, sums, steps = ([t.clone().to(device) for t in ts]
                                for ts in initial_state(torch.float32, False))
        steps = [s.double() for s in steps]
        for grad, indices, offsets, psw in batch_list:
            step_op(weights, sums, steps, grad(device), indices.int().to(device),
                    offsets.int().to(device), psw.to(device), pooling=0, padding_idx=padding_idx,
                    include_last_offset=False, rowwise=False, lr=0.05, lr_decay=0.01,
                    weight_decay=0.0, eps=1e-10, maximize=False, eps_inside_sqrt=False)
        results.append([t.cpu() for t in weights + sums + steps])
    for a, b in zip(*results):
        assert_bitwise(a, b, "int32 batch")
    assert [float(s) for s in results[1][-len(TABLES):]] == [3.0] * len(TABLES)


def test_cpu_tables_with_a_cuda_lr_tensor_take_the_cpu_kernel():
    """The lr tensor alone on the device sends the call to the CUDA backend, which hands CPU
    tables to the CPU kernel: the same numbers as with a CPU lr tensor."""
    padding_idx, batch_list = batches(torch.float32, count=2, padding=True)
    results = []
    for lr_device in ("cpu", DEV):
        weights, sums, steps = initial_state(torch.float32, True)
        for grad, indices, offsets, _ in batch_list:
            step_op(weights, sums, steps, grad("cpu"), indices, offsets, None, pooling=1,
                    padding_idx=padding_idx, include_last_offset=False, rowwise=True, lr=0.0,
                    lr_decay=0.0, weight_decay=0.0, eps=1e-10, maximize=False,
                    eps_inside_sqrt=False, lr_tensor=torch.tensor(0.05, device=lr_device))
        results.append(weights + sums + steps)
    for a, b in zip(*results):
        assert_bitwise(a, b, "CPU tables")


@pytest.mark.parametrize("rowwise", [False, True], ids=["elementwise", "rowwise"])
def test_bad_id_on_the_device_raises_and_changes_nothing(rowwise):
    weights, sums, steps = ([t.to(DEV) for t in ts] for ts in initial_state(torch.float32, rowwise))
    before = [t.clone() for t in weights + sums + steps]
    # Table 0: four bags of one id; table 1 (7 rows): id 99 in its bag 0; the others: no ids.
    indices = torch.tensor([1, 2, 3, 4, 99, 0], device=DEV)
    offsets = torch.tensor([0, 1, 2, 3, 4, 4, 4, 4] + [4] + [6] * (len(TABLES) * BATCH - BATCH - 1),
                           device=DEV)
    grad = torch.randn(BATCH, sum(dim for _, dim in TABLES), device=DEV)
    with pytest.raises(RuntimeError, match=r"table 1, bag 0: id 99 \(position 4 of indices\)"):
        step_op(weights, sums, steps, grad, indices, offsets, None, pooling=0,
                padding_idx=[-1] * len(TABLES), include_last_offset=False, rowwise=rowwise,
                lr=0.05, lr_decay=0.0, weight_decay=0.0, eps=1e-10, maximize=False,
                eps_inside_sqrt=False)
    assert all(torch.equal(a, b) for a, b in zip(weights + sums + steps, before))


@pytest.mark.parametrize("optimizer", ["adagrad", "rowwise"])
def test_fused_embedding_bags_module_on_cuda_matches_cpu(optimizer):
    """The module on the device: its backward, given the CPU's output grads, steps the tables to
    the CPU's bits (the forwards may differ in the last bits; the step does not read them)."""
    options = dict(mode="mean", optimizer=optimizer, padding_idx=[1, None, 5, 0, None], lr=0.05,
                   lr_decay=0.01, initial_accumulator_value=0.1)
    if optimizer == "rowwise":
        options["weight_decay"] = 0.01
    cpu = FusedEmbeddingBags(TABLES, **options)
    cuda = FusedEmbeddingBags(TABLES, device=DEV, **options)
    with torch.no_grad():
        for a, b in zip(cuda.weights, cpu.weights):
            a.copy_(b)
    padding_idx, batch_list = batches(torch.float32, count=3, padding=True)
    for grad, indices, offsets, _ in batch_list:
        for module, device in ((cpu, "cpu"), (cuda, DEV)):
            module(indices.to(device), offsets.to(device)).backward(grad(device))
            module.optimizer.step()
    for t, (a, b) in enumerate(zip(cpu.weights, cuda.weights)):
        assert_bitwise(a.detach(), b.detach().cpu(), f"table {t} weight")
        sa, sb = cpu.optimizer.state[a], cuda.optimizer.state[b]
        assert_bitwise(sa["sum"], sb["sum"].cpu(), f"table {t} sum")
        assert sb["step"].device.type == "cuda" and float(sb["step"]) == 3.0

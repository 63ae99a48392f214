"""FusedEmbeddingBags: tables stepped by Adagrad inside backward.

The claim is bitwise: after every batch, the tables and their Adagrad state equal those of
nn.EmbeddingBag(sparse=True) tables stepped by FusedAdagrad / RowWiseAdagrad (whose sparse steps
test_sparse.py and test_rowwise.py compare with torch), and the forward equals nn.EmbeddingBag's.
"""
import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

from fused_adagrad import FusedAdagrad, FusedEmbeddingBags, RowWiseAdagrad
from torch_support import needs_compilable_op

TABLES = [(50, 8), (7, 3), (1000, 17)]  # dims that are not a multiple of any SIMD width
BATCH = 6
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def random_batch(gen, tables=TABLES, batch=BATCH, max_bag=5, hot_rows=3, include_last_offset=False,
                 skip_table=None):
    """Bags of 0..max_bag-1 ids per table, in the module's layout. Small tables draw from
    `hot_rows` rows only, so rows repeat within and across bags; `skip_table` gets empty bags."""
    ids, offsets, end = [], [], 0
    for t, (rows, _) in enumerate(tables):
        for _ in range(batch):
            n = 0 if t == skip_table else int(torch.randint(0, max_bag, (1,), generator=gen))
            offsets.append(end)
            end += n
            high = rows if rows > 10 else min(rows, hot_rows)
            ids.append(torch.randint(0, high, (n,), generator=gen))
    if include_last_offset:
        offsets.append(end)
    return torch.cat(ids), torch.tensor(offsets)


def per_table(indices, offsets, t, tables=TABLES, batch=BATCH, include_last_offset=False):
    """Table t's part of a batch, as its own nn.EmbeddingBag takes it."""
    start = int(offsets[t * batch])
    last = t == len(tables) - 1 and not include_last_offset
    end = len(indices) if last else int(offsets[(t + 1) * batch])
    local = offsets[t * batch:(t + 1) * batch] - start
    if include_last_offset:
        local = torch.cat([local, torch.tensor([end - start])])
    return slice(start, end), local


class Unfused:
    """The reference: nn.EmbeddingBag(sparse=True) tables and FusedAdagrad / RowWiseAdagrad."""

    def __init__(self, module, **options):
        self.bags, state = module.to_embedding_bags()
        cls = RowWiseAdagrad if module.optimizer_name == "rowwise" else FusedAdagrad
        self.opt = cls([b.weight for b in self.bags], **options)
        self.opt.load_state_dict(state)
        self.include_last_offset = module.include_last_offset
        self.tables = module.tables

    def forward(self, indices, offsets, per_sample_weights=None):
        out = []
        batch = (len(offsets) - self.include_last_offset) // len(self.tables)
        for t, bag in enumerate(self.bags):
            part, local = per_table(indices, offsets, t, self.tables, batch, self.include_last_offset)
            psw = None if per_sample_weights is None else per_sample_weights[part]
            out.append(bag(indices[part], local, psw))
        return torch.cat(out, 1)

    def step(self):
        self.opt.step()
        self.opt.zero_grad()


def assert_same_tables(module, ref):
    for t, (w, bag) in enumerate(zip(module.weights, ref.bags)):
        assert w.grad is None
        assert torch.equal(w, bag.weight), f"table {t}: max diff {(w - bag.weight).abs().max()}"
        ours, theirs = module.optimizer.state[w], ref.opt.state[bag.weight]
        assert torch.equal(ours["sum"], theirs["sum"]), f"table {t}: sums differ"
        assert torch.equal(ours["step"], theirs["step"]), f"table {t}: steps differ"


def train_both(module, ref, steps=5, psw=False, seed=1, skip_table=None):
    gen = torch.Generator().manual_seed(seed)
    dtype = module.weights[0].dtype
    for _ in range(steps):
        indices, offsets = random_batch(gen, include_last_offset=module.include_last_offset,
                                        skip_table=skip_table)
        weights = torch.rand(len(indices), generator=gen).to(dtype) if psw else None
        out = module(indices, offsets, weights)
        expected = ref.forward(indices, offsets, weights)
        assert torch.equal(out, expected)
        target = torch.randn(out.shape, generator=gen).to(dtype)
        (out * target).sum().backward()
        module.optimizer.step()
        (expected * target).sum().backward()
        ref.step()


CONFIGS = {
    "sum": dict(mode="sum"),
    "mean+padding": dict(mode="mean", padding_idx=[1, 2, None]),
    "per_sample_weights+options": dict(
        mode="sum", psw=True, include_last_offset=True,
        options=dict(lr=0.05, lr_decay=0.1, maximize=True, eps_inside_sqrt=True,
                     initial_accumulator_value=0.1, eps=1e-6)),
}


@pytest.mark.parametrize("optimizer", ["adagrad", "rowwise"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_bitwise_equal_to_embedding_bags_stepped_by_our_optimizers(optimizer, dtype, config):
    c = CONFIGS[config]
    options = c.get("options", {})
    torch.manual_seed(0)
    module = FusedEmbeddingBags(TABLES, mode=c["mode"], optimizer=optimizer, dtype=dtype,
                                padding_idx=c.get("padding_idx"),
                                include_last_offset=c.get("include_last_offset", False), **options)
    ref = Unfused(module, **options)
    train_both(module, ref, psw=c.get("psw", False))
    assert_same_tables(module, ref)


def test_rowwise_weight_decay_and_tensor_lr():
    options = dict(lr=torch.tensor(0.05), weight_decay=0.1)
    module = FusedEmbeddingBags(TABLES, optimizer="rowwise", **options)
    ref = Unfused(module, **options)
    train_both(module, ref)
    assert_same_tables(module, ref)


def test_a_table_no_batch_touches_still_steps_its_count():
    module = FusedEmbeddingBags(TABLES)
    ref = Unfused(module)
    before = module.weights[1].detach().clone()
    train_both(module, ref, steps=3, skip_table=1)
    assert_same_tables(module, ref)
    assert torch.equal(module.weights[1], before)
    assert module.optimizer.state[module.weights[1]]["step"].item() == 3


@pytest.mark.parametrize("hits", [1, 2, 300])
def test_a_row_hit_many_times(hits):
    """One bag holding row 5 `hits` times (and row 6 once): duplicates summed in id order."""
    module = FusedEmbeddingBags([(10, 33)], optimizer="adagrad")
    ref = Unfused(module)
    indices = torch.tensor([5] * hits + [6])
    offsets = torch.tensor([0])
    for _ in range(3):
        out = module(indices, offsets)
        expected = ref.forward(indices, offsets)
        (out * torch.arange(33.0)).sum().backward()
        module.optimizer.step()
        (expected * torch.arange(33.0)).sum().backward()
        ref.step()
    assert_same_tables(module, ref)


def test_independent_of_thread_count():
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            torch.manual_seed(0)
            module = FusedEmbeddingBags([(100, 64), (30000, 16)], mode="mean")
            gen = torch.Generator().manual_seed(3)
            for _ in range(3):
                indices, offsets = random_batch(gen, tables=module.tables, batch=512, max_bag=40)
                module(indices, offsets).square().sum().backward()
                module.optimizer.step()
            results.append([w.detach().clone() for w in module.weights])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_empty_batch_of_ids():
    module = FusedEmbeddingBags(TABLES)
    before = [w.detach().clone() for w in module.weights]
    out = module(torch.tensor([], dtype=torch.long), torch.zeros(3 * BATCH, dtype=torch.long))
    assert out.shape == (BATCH, 8 + 3 + 17) and not out.any()
    out.sum().backward()
    assert all(torch.equal(w, b) for w, b in zip(module.weights, before))


def test_int32_ids_and_split():
    module = FusedEmbeddingBags([(10, 2), (10, 3)])
    out = module(torch.tensor([1, 2, 3], dtype=torch.int32), torch.tensor([0, 2], dtype=torch.int32))
    first, second = module.split(out)
    assert torch.equal(first[0], module.weights[0][1] + module.weights[0][2])
    assert torch.equal(second[0], module.weights[1][3])


def snapshot(module):
    state = [module.optimizer.state[w] for w in module.weights]
    return [t.detach().clone() for t in module.weights] + \
           [s["sum"].clone() for s in state] + [s["step"].clone() for s in state]


def assert_unchanged(module, before):
    assert all(torch.equal(a, b) for a, b in zip(snapshot(module), before))


@pytest.mark.parametrize("indices, offsets, message", [
    ([1, 50, 2], [0, 1, 2], r"table 1, bag 0: id 50 \(position 1 of indices\) is out of range for a table of 7 rows"),
    ([1, 2, 7], [0, 1, 2], r"table 2, bag 0: id 7 \(position 2 of indices\) is out of range for a table of 3 rows"),
    ([1, 2, 0], [0, 2, 1], r"offsets\[2\] = 1 is smaller than offsets\[1\] = 2"),
    ([1, 2, 0], [1, 2, 2], r"offsets\[0\] is 1; it must be 0"),
    ([1, 2, 0], [0, 1, 5], r"offsets\[2\] = 5 is past the 3 indices"),
    ([1, 2, 0], [0, 1], r"2 offsets for 3 tables: expected tables \* batch"),
])
def test_bad_ids_and_offsets_are_refused_naming_them(indices, offsets, message):
    module = FusedEmbeddingBags([(50, 4), (7, 4), (3, 4)])
    before = snapshot(module)
    with pytest.raises(RuntimeError, match=message):
        module(torch.tensor(indices), torch.tensor(offsets))
    assert_unchanged(module, before)


def test_ids_changed_after_forward_are_caught():
    """Autograd sees ids changed in place after forward; the step op checks them again anyway."""
    module = FusedEmbeddingBags([(50, 4), (7, 4)])
    indices, offsets = torch.tensor([1, 2, 3, 4]), torch.tensor([0, 2, 3, 4])
    out = module(indices, offsets)
    indices[3] = 99
    before = snapshot(module)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
    assert_unchanged(module, before)
    state = [module.optimizer.state[w] for w in module.weights]
    with pytest.raises(RuntimeError, match="table 1, bag 0: id 99"), torch.no_grad():
        torch.ops.fused_adagrad.embedding_bags_adagrad_step_(
            list(module.weights), [s["sum"] for s in state], [s["step"] for s in state],
            torch.ones(2, 8), indices, offsets, None, pooling=0, padding_idx=[-1, -1],
            include_last_offset=False, rowwise=False, lr=0.1, lr_decay=0.0, weight_decay=0.0,
            eps=1e-10, maximize=False, eps_inside_sqrt=False)
    assert_unchanged(module, before)


def test_a_negative_id_is_refused_in_a_child_process():
    """In a child: were the check missing, a negative id would read or write outside the table."""
    code = """
import torch
from fused_adagrad import FusedEmbeddingBags
m = FusedEmbeddingBags([(10, 4), (10, 4)])
w = [x.detach().clone() for x in m.weights]
try:
    m(torch.tensor([1, -3, 2]), torch.tensor([0, 2]))
except RuntimeError as e:
    assert "table 0, bag 0: id -3 (position 1 of indices)" in str(e), e
    assert all(torch.equal(a, b) for a, b in zip(m.weights, w))
    print("refused")
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "refused" in run.stdout, run.stderr


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode 'max'"):
        FusedEmbeddingBags(TABLES, mode="max")
    with pytest.raises(ValueError, match="weight_decay needs optimizer='rowwise'"):
        FusedEmbeddingBags(TABLES, weight_decay=0.1)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        FusedEmbeddingBags(TABLES, lr=-1.0)
    with pytest.raises(ValueError, match="table 1: padding_idx 7"):
        FusedEmbeddingBags(TABLES, padding_idx=[None, 7, None])
    module = FusedEmbeddingBags([(10, 4)], mode="mean")
    with pytest.raises(RuntimeError, match="per_sample_weights are only supported with mode sum"):
        module(torch.tensor([1]), torch.tensor([0]), torch.ones(1))
    with pytest.raises(RuntimeError, match="per_sample_weights that require grad"):
        FusedEmbeddingBags([(10, 4)])(torch.tensor([1]), torch.tensor([0]),
                                       torch.ones(1, requires_grad=True))


def test_second_backward_through_one_forward_is_refused():
    module = FusedEmbeddingBags([(10, 4)])
    out = module(torch.tensor([1, 2]), torch.tensor([0]))
    out.sum().backward(retain_graph=True)
    module.optimizer.step()
    before = snapshot(module)
    with pytest.raises(RuntimeError, match="second backward through the same forward"):
        out.sum().backward()
    assert_unchanged(module, before)


def test_grad_accumulation_over_several_backwards_is_refused():
    module = FusedEmbeddingBags([(10, 4)])
    indices, offsets = torch.tensor([1, 2]), torch.tensor([0])
    first, second = module(indices, offsets), module(indices, offsets)
    first.sum().backward()
    before = snapshot(module)
    with pytest.raises(RuntimeError, match="updated by another backward after this backward's forward"):
        second.sum().backward()
    assert_unchanged(module, before)
    # Interleaved micro-batches (forward, backward, forward, backward, then one step).
    module.optimizer.step()
    module(indices, offsets).sum().backward()
    before = snapshot(module)
    with pytest.raises(RuntimeError, match="second backward without optimizer.step"):
        module(indices, offsets).sum().backward()
    assert_unchanged(module, before)


def test_lr_scheduler_changes_the_lr():
    module = FusedEmbeddingBags(TABLES, lr=0.1)
    ref = Unfused(module, lr=0.1)
    ours = torch.optim.lr_scheduler.StepLR(module.optimizer, step_size=1, gamma=0.5)
    theirs = torch.optim.lr_scheduler.StepLR(ref.opt, step_size=1, gamma=0.5)
    for seed in range(4):
        train_both(module, ref, steps=1, seed=seed)
        ours.step()
        theirs.step()
    assert module.optimizer.param_groups[0]["lr"] == 0.1 * 0.5 ** 4
    assert_same_tables(module, ref)


def test_state_dict_round_trip():
    module = FusedEmbeddingBags(TABLES, optimizer="rowwise", dtype=torch.bfloat16, lr=0.3)
    train_both(module, Unfused(module, lr=0.3), steps=2)
    saved = copy.deepcopy(module.state_dict())
    restored = FusedEmbeddingBags(TABLES, optimizer="rowwise", dtype=torch.bfloat16)
    restored.load_state_dict(saved)
    assert restored.optimizer.param_groups[0]["lr"] == 0.3
    for module_ in (module, restored):
        train_both(module_, Unfused(module_, lr=0.3), steps=2, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(snapshot(module), snapshot(restored)))
    assert restored.optimizer.state[restored.weights[0]]["sum"].dtype == torch.float32


@pytest.mark.parametrize("optimizer", ["adagrad", "rowwise"])
def test_conversion_both_ways_with_embedding_bags(optimizer):
    """Unfused for two batches, fused for two, unfused again: as if one path had run."""
    torch.manual_seed(0)
    bags = [nn.EmbeddingBag(rows, dim, mode="mean", sparse=True, padding_idx=0) for rows, dim in TABLES]
    cls = RowWiseAdagrad if optimizer == "rowwise" else FusedAdagrad
    opt = cls([b.weight for b in bags], lr=0.2, lr_decay=0.01)
    twin = FusedEmbeddingBags.from_embedding_bags(bags, optimizer=optimizer, lr=0.2, lr_decay=0.01)
    ref = Unfused(twin, lr=0.2, lr_decay=0.01)  # runs unfused all along
    gen = torch.Generator().manual_seed(5)
    batches = [random_batch(gen) for _ in range(6)]

    def unfused_steps(bags, opt, batches):
        for indices, offsets in batches:
            out = torch.cat([b(indices[p], o) for t, b in enumerate(bags)
                             for p, o in [per_table(indices, offsets, t)]], 1)
            out.square().sum().backward()
            opt.step()
            opt.zero_grad()

    unfused_steps(bags, opt, batches[:2])
    unfused_steps(ref.bags, ref.opt, batches[:2])
    module = FusedEmbeddingBags.from_embedding_bags(bags, opt.state_dict(), optimizer=optimizer)
    assert module.optimizer.param_groups[0]["lr_decay"] == 0.01
    for indices, offsets in batches[2:4]:
        module(indices, offsets).square().sum().backward()
        module.optimizer.step()
    unfused_steps(ref.bags, ref.opt, batches[2:4])
    assert_same_tables(module, ref)
    back, state = module.to_embedding_bags()
    back_opt = cls([b.weight for b in back])
    back_opt.load_state_dict(state)
    unfused_steps(back, back_opt, batches[4:])
    unfused_steps(ref.bags, ref.opt, batches[4:])
    for a, b in zip(back, ref.bags):
        assert torch.equal(a.weight, b.weight)
        assert torch.equal(back_opt.state[a.weight]["sum"], ref.opt.state[b.weight]["sum"])


def test_checkpoint_from_torch_optim_adagrad_loads():
    bags = [nn.EmbeddingBag(rows, dim, sparse=True) for rows, dim in TABLES]
    opt = torch.optim.Adagrad([b.weight for b in bags], lr=0.3)
    module = FusedEmbeddingBags.from_embedding_bags(bags, opt.state_dict())
    assert module.optimizer.param_groups[0]["lr"] == 0.3
    assert module.optimizer.state[module.weights[0]]["sum"].shape == (50, 8)


@needs_compilable_op
def test_opcheck():
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(rows, dim) for rows, dim in TABLES]
    indices, offsets = random_batch(gen)
    psw = torch.rand(len(indices))
    kw = dict(pooling=0, padding_idx=[-1, 1, -1], include_last_offset=False)
    torch.library.opcheck(torch.ops.fused_adagrad.embedding_bags_forward,
                          (weights, indices, offsets, psw), kw)
    grad = torch.randn(BATCH, sum(d for _, d in TABLES))
    for rowwise in (False, True):
        sums = [torch.zeros(w.shape[:1] if rowwise else w.shape) for w in weights]
        steps = [torch.tensor(0.0) for _ in weights]
        torch.library.opcheck(
            torch.ops.fused_adagrad.embedding_bags_adagrad_step_,
            (weights, sums, steps, grad, indices, offsets, psw),
            dict(kw, rowwise=rowwise, lr=0.1, lr_decay=0.0, weight_decay=0.0, eps=1e-10,
                 maximize=False, eps_inside_sqrt=False))

"""The training loops users run around an optimizer: stepping in backward (step_in_backward=True)
with schedulers and checkpoints, and Hogwild training with share_memory()."""
import gc
import io

import pytest
import torch
import torch.multiprocessing as mp

from fused_adagrad import FusedAdagrad, RowWiseAdagrad
from fused_adagrad import _compat
from torch_support import needs_compilable_op

OPTIMIZERS = [FusedAdagrad, RowWiseAdagrad]


def make_model():
    torch.manual_seed(0)
    return torch.nn.ModuleDict({
        "emb": torch.nn.Embedding(40, 6, sparse=True),
        "mlp": torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1)),
    })


def loss_of(model, t):
    g = torch.Generator().manual_seed(t)
    ids = torch.randint(0, 40, (12,), generator=g)
    y = torch.randn(12, 1, generator=g)
    return torch.nn.functional.mse_loss(model["mlp"](model["emb"](ids)), y)


def groups(model):
    return [{"params": model["emb"].parameters()},
            {"params": model["mlp"].parameters(), "weight_decay": 0.01, "lr": torch.tensor(0.05)}]


def train(model, opt, sched, steps, first=0):
    for t in range(first, first + steps):
        opt.zero_grad()
        loss_of(model, t).backward()
        opt.step()
        sched.step()


@pytest.mark.parametrize("opt_cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_step_in_backward_matches_the_plain_step(opt_cls):
    plain, hooked = make_model(), make_model()
    opt = opt_cls(groups(plain), lr=0.1, lr_decay=0.01)
    hopt = opt_cls(groups(hooked), lr=0.1, lr_decay=0.01, step_in_backward=True)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    hsched = torch.optim.lr_scheduler.StepLR(hopt, step_size=2, gamma=0.5)
    for t in range(6):
        opt.zero_grad()
        loss_of(plain, t).backward()
        opt.step()
        sched.step()
        hopt.zero_grad()
        loss_of(hooked, t).backward()
        # Each param stepped during backward, and its grad is gone.
        assert all(p.grad is None for p in hooked.parameters())
        before = [p.detach().clone() for p in hooked.parameters()]
        hopt.step()  # nothing left to do
        assert all(torch.equal(a, b) for a, b in zip(before, hooked.parameters()))
        hsched.step()
        for a, b in zip(plain.parameters(), hooked.parameters()):
            assert torch.equal(a, b), f"step {t}"
            assert torch.equal(opt.state[a]["sum"], hopt.state[b]["sum"])
            assert torch.equal(opt.state[a]["step"], hopt.state[b]["step"])


@pytest.mark.parametrize("opt_cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_step_in_backward_checkpoints_load_both_ways(opt_cls):
    straight = make_model()
    opt = opt_cls(groups(straight), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    train(straight, opt, sched, 6)

    resumed = make_model()
    first = opt_cls(groups(resumed), lr=0.1, step_in_backward=True)
    first_sched = torch.optim.lr_scheduler.StepLR(first, step_size=2, gamma=0.5)
    train(resumed, first, first_sched, 3)
    saved = io.BytesIO()
    torch.save({"opt": first.state_dict(), "sched": first_sched.state_dict()}, saved)
    saved.seek(0)
    blob = torch.load(saved)
    # Dropping an optimizer disarms its hooks (they hold it weakly): the params are free for the
    # next one.
    del first, first_sched
    gc.collect()
    # Into a plain optimizer for one step, then back into a step-in-backward one.
    second = opt_cls(groups(resumed), lr=0.1)
    second.load_state_dict(blob["opt"])
    second_sched = torch.optim.lr_scheduler.StepLR(second, step_size=2, gamma=0.5)
    second_sched.load_state_dict(blob["sched"])
    train(resumed, second, second_sched, 1, first=3)
    third = opt_cls(groups(resumed), lr=0.1, step_in_backward=True)
    third.load_state_dict(second.state_dict())
    third_sched = torch.optim.lr_scheduler.StepLR(third, step_size=2, gamma=0.5)
    third_sched.load_state_dict(second_sched.state_dict())
    train(resumed, third, third_sched, 2, first=4)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_step_in_backward_error_names_the_group_and_param():
    p = torch.nn.Parameter(torch.randn(3))
    q = torch.nn.Parameter(torch.randn(3))
    opt = FusedAdagrad([{"params": [p]}, {"params": [q]}], step_in_backward=True)
    opt.state[q]["sum"] = torch.zeros(4)  # a state from another model
    with pytest.raises(RuntimeError, match=r"FusedAdagrad: param group 1, param 0: state 'sum' "
                                           r"has shape \[4\]"):
        (p.sum() + q.sum()).backward()
    assert torch.equal(opt.state[q]["step"], torch.tensor(0.0))


# ----------------------------------------------------------------------------- Hogwild

def hogwild_worker(model, opt, name, steps):
    """Trains one part of the model (`emb` or `mlp`) on a loss of that part alone, so that two
    workers on the two parts update one model at once and still get deterministic numbers."""
    for t in range(steps):
        g = torch.Generator().manual_seed(t)
        opt.zero_grad()
        if name == "emb":
            loss = model["emb"](torch.randint(0, 40, (12,), generator=g)).pow(2).mean()
        else:
            x, y = torch.randn(12, 6, generator=g), torch.randn(12, 1, generator=g)
            loss = torch.nn.functional.mse_loss(model["mlp"](x), y)
        loss.backward()
        opt.step()  # the other part has no grad: it does not step


def test_share_memory_lets_two_processes_update_one_model():
    shared, local = make_model(), make_model()
    shared.share_memory()
    opt = FusedAdagrad(shared.parameters(), lr=0.1)
    opt.share_memory()
    assert all(opt.state[p]["sum"].is_shared() for p in shared.parameters())
    ctx = mp.get_context("spawn")  # fork after OpenMP has started can hang the child
    # Two processes at once, on disjoint params (so the result is deterministic).
    workers = [ctx.Process(target=hogwild_worker, args=(shared, opt, name, 4))
               for name in ("emb", "mlp")]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
        assert w.exitcode == 0
    local_opt = FusedAdagrad(local.parameters(), lr=0.1)
    for name in ("emb", "mlp"):
        hogwild_worker(local, local_opt, name, 4)
    for (n, a), b in zip(shared.named_parameters(), local.parameters()):
        assert torch.equal(a, b), n
        assert torch.equal(opt.state[a]["sum"], local_opt.state[b]["sum"]), n


# ----------------------------------------------------------------------------- torch.compile

@needs_compilable_op
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("opt_cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_compiled_step_and_scheduler_match_eager_without_recompiling(opt_cls, backend):
    # PyTorch's recipe for compiling an optimizer with an LR scheduler: a tensor lr, which the
    # scheduler updates in place, so the compiled function stays valid as the lr changes.
    import torch._dynamo
    torch._dynamo.reset()
    eager, compiled = make_model(), make_model()
    eager_opt = opt_cls(groups(eager), lr=torch.tensor(0.1))
    opt = opt_cls(groups(compiled), lr=torch.tensor(0.1))
    eager_sched = torch.optim.lr_scheduler.ExponentialLR(eager_opt, gamma=0.9)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)

    @torch.compile(backend=backend)
    def step():
        opt.step()
        sched.step()

    with torch._dynamo.config.patch(error_on_recompile=True):
        for t in range(4):
            for model, o in ((eager, eager_opt), (compiled, opt)):
                o.zero_grad()
                loss_of(model, t).backward()
            eager_opt.step()
            eager_sched.step()
            step()
            for a, b in zip(eager.parameters(), compiled.parameters()):
                assert torch.equal(a, b), f"step {t}"
    assert opt.param_groups[0]["lr"].item() == pytest.approx(0.1 * 0.9 ** 4)


@pytest.mark.skipif(_compat.CAN_COMPILE_STEP, reason="this torch compiles the step into the graph")
@pytest.mark.parametrize("opt_cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_on_an_older_torch_a_compiled_function_steps_eagerly_with_the_same_numbers(opt_cls):
    # torch 2.4 cannot put our op into a graph: dynamo breaks the graph and the step runs eagerly.
    import torch._dynamo
    torch._dynamo.reset()
    eager, compiled = make_model(), make_model()
    eager_opt = opt_cls(groups(eager), lr=torch.tensor(0.1))
    opt = opt_cls(groups(compiled), lr=torch.tensor(0.1))
    step = torch.compile(opt.step, backend="aot_eager")
    for t in range(3):
        for model, o in ((eager, eager_opt), (compiled, opt)):
            o.zero_grad()
            loss_of(model, t).backward()
        eager_opt.step()
        step()
        for a, b in zip(eager.parameters(), compiled.parameters()):
            assert torch.equal(a, b), f"step {t}"

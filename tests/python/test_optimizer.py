"""FusedAdagrad as a torch.optim.Optimizer: state layout, checkpoints, the Optimizer API, errors."""
import copy
import pickle

import pytest
import torch
from torch.testing._internal.common_optimizers import (
    OptimizerErrorEnum,
    optim_error_inputs_func_adagrad,
)

from fused_adagrad import FusedAdagrad


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def train(m, opt, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(4, 7, generator=gen)
        opt.zero_grad()
        m(x).pow(2).sum().backward()
        opt.step()


def assert_models_close(a, b, rtol=1e-5, atol=1e-6):
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=rtol, atol=atol)


def test_state_layout_matches_torch():
    m1, m2 = model(), model()
    ours = FusedAdagrad(m1.parameters(), lr=0.1, initial_accumulator_value=0.2)
    ref = torch.optim.Adagrad(m2.parameters(), lr=0.1, initial_accumulator_value=0.2)
    s_ours, s_ref = ours.state_dict(), ref.state_dict()
    assert s_ours["state"].keys() == s_ref["state"].keys()
    for k in s_ref["state"]:
        assert list(s_ours["state"][k]) == list(s_ref["state"][k]) == ["step", "sum"]
        for key in ("step", "sum"):
            a, b = s_ours["state"][k][key], s_ref["state"][k][key]
            assert (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device)
            assert torch.equal(a, b)
    assert set(s_ours["param_groups"][0]) == set(s_ref["param_groups"][0]) | {"eps_inside_sqrt"}


@pytest.mark.parametrize("direction", ["torch->ours", "ours->torch"])
def test_state_dict_interchange(direction):
    """Train 5 steps with one optimizer, load its state into the other, train 5 more."""
    first, second = (torch.optim.Adagrad, FusedAdagrad) if direction == "torch->ours" else (
        FusedAdagrad, torch.optim.Adagrad)
    kw = dict(lr=0.1, lr_decay=0.01, weight_decay=0.01, initial_accumulator_value=0.1)
    m_a, m_ref = model(), model()
    opt_a = first(m_a.parameters(), **kw)
    opt_ref = torch.optim.Adagrad(m_ref.parameters(), foreach=False, **kw)
    train(m_a, opt_a, 5)
    train(m_ref, opt_ref, 5)
    m_b = copy.deepcopy(m_a)
    opt_b = second(m_b.parameters(), **kw)
    opt_b.load_state_dict(pickle.loads(pickle.dumps(opt_a.state_dict())))
    assert all(torch.equal(opt_b.state[p]["step"], torch.tensor(5.0)) for p in m_b.parameters())
    train(m_b, opt_b, 5, seed=2)
    train(m_ref, opt_ref, 5, seed=2)
    assert_models_close(m_b, m_ref)


def test_save_load_continues_bitwise():
    m1 = model()
    opt1 = FusedAdagrad(m1.parameters(), lr=0.1, weight_decay=0.1)
    train(m1, opt1, 3)
    m2 = copy.deepcopy(m1)
    opt2 = FusedAdagrad(m2.parameters(), lr=0.5)
    opt2.load_state_dict(pickle.loads(pickle.dumps(opt1.state_dict())))
    assert opt2.param_groups[0]["lr"] == 0.1
    train(m1, opt1, 4, seed=3)
    train(m2, opt2, 4, seed=3)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_deepcopy_optimizer_continues_identically():
    m1 = model()
    opt1 = FusedAdagrad(m1.parameters(), lr=0.1)
    train(m1, opt1, 2)
    m2 = copy.deepcopy(m1)
    opt2 = FusedAdagrad(m2.parameters(), lr=0.1)
    opt2.load_state_dict(copy.deepcopy(opt1.state_dict()))
    opt_copy = copy.deepcopy(opt1)
    assert opt_copy.state_dict()["state"][0]["sum"] is not opt1.state_dict()["state"][0]["sum"]
    train(m1, opt1, 3, seed=5)
    train(m2, opt2, 3, seed=5)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_params_without_grad_are_skipped_like_torch():
    m1, m2 = model(), model()
    ours, ref = FusedAdagrad(m1.parameters(), lr=0.1), torch.optim.Adagrad(m2.parameters(), lr=0.1)
    for step in range(6):
        for m, opt in ((m1, ours), (m2, ref)):
            opt.zero_grad()
            m(torch.ones(2, 7)).sum().backward()
            if step % 2:
                m[0].weight.grad = None  # this param takes no step
            opt.step()
    assert ours.state[m1[0].weight]["step"].item() == ref.state[m2[0].weight]["step"].item() == 3
    assert ours.state[m1[2].bias]["step"].item() == 6
    assert_models_close(m1, m2)


def test_param_groups_with_different_options():
    def groups(m):
        return [{"params": m[0].parameters(), "lr": 0.05, "weight_decay": 0.1},
                {"params": m[2].parameters(), "lr_decay": 0.1, "maximize": True, "eps": 1e-3}]
    m1, m2 = model(), model()
    ours = FusedAdagrad(groups(m1), lr=0.1)
    ref = torch.optim.Adagrad(groups(m2), lr=0.1, foreach=False)
    train(m1, ours, 10)
    train(m2, ref, 10)
    assert_models_close(m1, m2)


def test_add_param_group_mid_training_uses_its_own_initial_accumulator_value():
    m1, m2 = model(), model()
    ours = FusedAdagrad(m1[0].parameters(), lr=0.1)
    train(m1, ours, 3)
    ours.add_param_group({"params": m1[2].parameters(), "initial_accumulator_value": 0.5})
    assert torch.equal(ours.state[m1[2].weight]["sum"], torch.full_like(m1[2].weight, 0.5))
    assert ours.state[m1[2].weight]["step"].item() == 0
    train(m1, ours, 3, seed=2)

    # torch.optim.Adagrad creates that state lazily from the *default* value; give it by hand
    # the state ours creates, then both must train identically.
    ref = torch.optim.Adagrad(m2[0].parameters(), lr=0.1, foreach=False)
    train(m2, ref, 3)
    ref.add_param_group({"params": m2[2].parameters(), "initial_accumulator_value": 0.5})
    for p in m2[2].parameters():
        ref.state[p] = {"step": torch.tensor(0.0), "sum": torch.full_like(p, 0.5)}
    train(m2, ref, 3, seed=2)
    assert_models_close(m1, m2)


def test_emptied_state_is_made_again_from_the_group():
    """A param whose state is gone (cleared by hand, or a checkpoint that never saw it) starts over
    from its group's initial_accumulator_value, as in a fresh optimizer."""
    m1, m2 = model(), model()
    ours = FusedAdagrad(m1.parameters(), lr=0.1, initial_accumulator_value=0.3)
    ref = FusedAdagrad(m2.parameters(), lr=0.1, initial_accumulator_value=0.3)
    train(m1, ours, 2)
    ours.state.clear()
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        p2.data.copy_(p1)
    train(m1, ours, 3, seed=2)
    train(m2, ref, 3, seed=2)
    assert_models_close(m1, m2, rtol=0, atol=0)
    assert all(ours.state[p]["step"].item() == 3 for p in m1.parameters())


def test_lr_scheduler_and_tensor_lr():
    for lr in (0.1, torch.tensor(0.1)):
        m1, m2 = model(), model()
        ours = FusedAdagrad(m1.parameters(), lr=lr.clone() if torch.is_tensor(lr) else lr)
        ref = torch.optim.Adagrad(m2.parameters(), lr=lr.clone() if torch.is_tensor(lr) else lr,
                                  foreach=False)
        s1 = torch.optim.lr_scheduler.StepLR(ours, step_size=2, gamma=0.5)
        s2 = torch.optim.lr_scheduler.StepLR(ref, step_size=2, gamma=0.5)
        for i in range(8):
            train(m1, ours, 1, seed=i)
            train(m2, ref, 1, seed=i)
            s1.step()
            s2.step()
        assert float(ours.param_groups[0]["lr"]) == float(ref.param_groups[0]["lr"])
        assert float(ours.param_groups[0]["lr"]) == pytest.approx(0.1 / 16)
        assert_models_close(m1, m2)


def test_closure_hooks_and_zero_grad():
    m = model()
    opt = FusedAdagrad(m.parameters())
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    x = torch.randn(3, 7)

    def closure():
        opt.zero_grad()
        loss = m(x).sum()
        loss.backward()
        return loss

    before = [p.clone() for p in m.parameters()]
    loss = opt.step(closure)
    assert torch.is_tensor(loss) and loss.requires_grad
    assert calls == ["pre", "post"]
    assert all(not torch.equal(a, b) for a, b in zip(before, m.parameters()))
    opt.zero_grad()
    assert all(p.grad is None for p in m.parameters())


def test_eps_inside_sqrt():
    p = torch.randn(100)
    ref = p.clone()
    opt = FusedAdagrad([p], lr=0.1, eps=1e-2, eps_inside_sqrt=True)
    s = torch.zeros_like(ref)
    for i in range(5):
        g = torch.randn(100)
        p.grad = g
        opt.step()
        s += g * g
        ref -= 0.1 * g / (s + 1e-2).sqrt()
    torch.testing.assert_close(p, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw", [dict(), dict(maximize=True), dict(lr_decay=0.1, eps=1e-3),
                                dict(initial_accumulator_value=0.3)])
def test_sparse_gradients_match_torch(kw):
    torch.manual_seed(0)
    e1 = torch.nn.Embedding(50, 4, sparse=True)
    e2 = copy.deepcopy(e1)
    ours = FusedAdagrad(e1.parameters(), lr=0.1, **kw)
    ref = torch.optim.Adagrad(e2.parameters(), lr=0.1, **kw)
    for step in range(5):
        idx = torch.randint(0, 50, (12,))  # with repeated rows
        for e, opt in ((e1, ours), (e2, ref)):
            opt.zero_grad()
            e(idx).pow(2).sum().backward()
            assert e.weight.grad.is_sparse
            opt.step()
    # Duplicate rows are summed in grad order, torch's sqrt comes from MKL: ulps, not bits
    # (test_sparse.py has the bitwise checks on unique rows).
    torch.testing.assert_close(e1.weight, e2.weight, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours.state[e1.weight]["sum"], ref.state[e2.weight]["sum"],
                               rtol=1e-6, atol=0)


# ---- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error_input", optim_error_inputs_func_adagrad("cpu", torch.float32),
    ids=lambda e: e.optimizer_error_input.desc)
def test_torch_error_inputs(error_input):
    oi = error_input.optimizer_error_input
    params = oi.params if oi.params is not None else [torch.nn.Parameter(torch.randn(2, 2))]
    if issubclass(error_input.error_type, Warning):  # UserWarning; FutureWarning from torch 2.15
        with pytest.warns(error_input.error_type, match=error_input.error_regex):
            FusedAdagrad(params, **oi.kwargs)
        return
    with pytest.raises(error_input.error_type, match=error_input.error_regex):
        opt = FusedAdagrad(params, **oi.kwargs)
        if error_input.error_on == OptimizerErrorEnum.STEP_ERROR:
            opt.step()


@pytest.mark.parametrize("kw", [dict(lr=-1.0), dict(lr_decay=-0.5), dict(weight_decay=-1.0),
                                dict(initial_accumulator_value=-1.0), dict(eps=-1e-3),
                                dict(lr=torch.tensor([0.1, 0.2]))])
def test_hyperparameter_errors_match_torch(kw):
    p = torch.randn(2)
    with pytest.raises(ValueError) as our_error:
        FusedAdagrad([p], **kw)
    try:
        torch.optim.Adagrad([p], **kw)
    except ValueError as ref_error:
        assert str(our_error.value) == str(ref_error)
    except RuntimeError:
        # torch 2.4 had no check for a tensor lr of several elements: its `0.0 <= lr` fails
        # ("Boolean value of Tensor ... is ambiguous"). Ours gives later torch's message.
        assert "lr" in kw and str(our_error.value) == "Tensor lr must be 1-element"
    else:
        pytest.fail(f"torch.optim.Adagrad accepted {kw}")


def test_differentiable_and_fused_with_foreach_are_refused():
    p = torch.randn(2)
    with pytest.raises(ValueError, match="differentiable"):
        FusedAdagrad([p], differentiable=True)
    with pytest.raises(RuntimeError, match="`fused` and `foreach` cannot be `True` together"):
        FusedAdagrad([p], fused=True, foreach=True)
    FusedAdagrad([p], fused=True)  # accepted for drop-in compatibility
    FusedAdagrad([p], foreach=True)


def snapshot(opt):
    return [(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
            for g in opt.param_groups for p in g["params"]]


def assert_unchanged(opt, snap):
    for (p_before, state_before), p in zip(snap, [p for g in opt.param_groups for p in g["params"]]):
        assert torch.equal(p, p_before)
        for k, v in state_before.items():
            assert torch.equal(opt.state[p][k], v)


BAD_STEPS = {
    "sum shape": (lambda p, opt: opt.state[p].__setitem__("sum", torch.zeros(7)),
                  "state 'sum' has shape"),
    "sum dtype": (lambda p, opt: opt.state[p].__setitem__("sum", torch.zeros_like(p).double()),
                  "state 'sum' has dtype"),
    "step shape": (lambda p, opt: opt.state[p].__setitem__("step", torch.zeros(2)),
                   "state 'step'"),
    "sparse grad with weight decay": (
        lambda p, opt: setattr(p, "grad", torch.zeros_like(p).to_sparse()),
        "weight_decay option is not compatible with sparse gradients"),
}


@pytest.mark.parametrize("case", BAD_STEPS, ids=str)
def test_failed_step_changes_nothing(case):
    """The last param of the last group is bad; every earlier one is fine and must stay as it is."""
    m = model()
    opt = FusedAdagrad([{"params": m[0].parameters()},
                        {"params": m[2].parameters(), "weight_decay": 0.1}], lr=0.1)
    train(m, opt, 2)
    m(torch.randn(2, 7)).sum().backward()
    spoil, message = BAD_STEPS[case]
    spoil(m[2].bias, opt)
    snap = snapshot(opt)
    with pytest.raises(RuntimeError, match=rf"param group 1, param 1: .*{message}"):
        opt.step()
    assert_unchanged(opt, snap)


def test_load_state_dict_from_another_model_fails_the_step_cleanly():
    m_small, m_big = model(), torch.nn.Sequential(torch.nn.Linear(7, 6), torch.nn.Tanh(),
                                                  torch.nn.Linear(6, 3))
    other = FusedAdagrad(m_big.parameters())
    opt = FusedAdagrad(m_small.parameters())
    opt.load_state_dict(other.state_dict())
    m_small(torch.randn(2, 7)).sum().backward()
    snap = snapshot(opt)
    with pytest.raises(RuntimeError, match=r"param group 0, param 0: state 'sum' has shape"):
        opt.step()
    assert_unchanged(opt, snap)


def test_step_bumps_version_counters():
    p = torch.nn.Parameter(torch.randn(3))
    y = (p * p).sum()
    opt = FusedAdagrad([p])
    p.grad = torch.ones(3)
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


@pytest.mark.parametrize("bad", ["shape", "dtype", "layout"])
def test_op_with_bad_grad_changes_nothing(bad):
    """torch refuses to assign such grads to .grad, so this goes through the op directly."""
    params = [torch.randn(5), torch.randn(4, 3)]
    sums, steps = [torch.rand_like(p) for p in params], [torch.tensor(2.0), torch.tensor(2.0)]
    bad_grad = {"shape": torch.randn(3, 4), "dtype": torch.randn(4, 3, dtype=torch.float64),
                "layout": torch.randn(4, 3).to_sparse_csr()}[bad]
    grads = [torch.randn(5), bad_grad]
    before = [t.clone() for t in params + sums + steps]
    with pytest.raises(RuntimeError, match="param 1: "):
        torch.ops.fused_adagrad.adagrad_step_(params, grads, sums, steps, lr=0.1, lr_decay=0.0,
                                              weight_decay=0.0, eps=1e-10, maximize=False)
    assert all(torch.equal(a, b) for a, b in zip(before, params + sums + steps))

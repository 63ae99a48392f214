"""torch.amp.GradScaler: the step unscales grads in its own pass (grad_scale) and changes nothing
when the scaler found an inf (found_inf), with torch's fused=True numbers."""
import pytest
import torch

from fused_adagrad import FusedAdagrad, RowWiseAdagrad
from torch_support import needs_compilable_op

GROUPS_OP = torch.ops.fused_adagrad.adagrad_step_groups_
HYPER = dict(lr=0.1, lr_decay=0.01, weight_decay=0.0, eps=1e-10, maximize=False)


def groups_kwargs(rowwise=False, n=1, **overrides):
    kw = {k: [v] * n for k, v in HYPER.items()}
    kw.update(eps_inside_sqrt=[False] * n, lr_tensor=[None] * n, rowwise=rowwise)
    kw.update(overrides)
    return kw


def train(make_opt, dtype, steps=8, inject_at=(3,), init_scale=2.0 ** 12):
    """A small model under autocast and a GradScaler; an inf injected into one grad at the
    given steps. Returns the params, the optimizer, the grads after each step and the scales."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(37, 64), torch.nn.ReLU(), torch.nn.Linear(64, 5))
    opt = make_opt(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=2)
    x, y = torch.randn(16, 37), torch.randn(16, 5)
    grads, scales = [], []
    for i in range(steps):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=dtype):
            loss = torch.nn.functional.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        if i in inject_at:
            model[0].weight.grad[1, 2] = float("inf")
        scaler.step(opt)
        scaler.update()
        grads.append([p.grad.clone() for p in model.parameters()])
        scales.append(scaler.get_scale())
    return list(model.parameters()), opt, grads, scales


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_grad_scaler_with_autocast_matches_torch_fused_bitwise(dtype):
    kw = dict(lr=0.1, lr_decay=0.01, weight_decay=0.01)
    ref_params, ref_opt, ref_grads, ref_scales = train(
        lambda p: torch.optim.Adagrad(p, fused=True, **kw), dtype)
    params, opt, grads, scales = train(lambda p: FusedAdagrad(p, **kw), dtype)
    assert scales == ref_scales and scales[3] < scales[2]  # the injected inf halved the scale
    for p, q in zip(params, ref_params):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["sum"], ref_opt.state[q]["sum"])
        assert opt.state[p]["step"].item() == ref_opt.state[q]["step"].item() == 7  # one skipped
    # What each step leaves in .grad: unscaled, or still scaled after the skipped step.
    for step_grads, ref_step_grads in zip(grads, ref_grads):
        assert all(torch.equal(g, r) for g, r in zip(step_grads, ref_step_grads))


def test_the_scaler_does_not_unscale_for_us():
    """The unscaling pass GradScaler would run is saved: it hands the scale to the step."""
    model = torch.nn.Linear(4, 3)
    opt = FusedAdagrad(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(model(torch.randn(2, 4)).sum()).backward()
    seen = {}
    original = opt.step

    def spy(*args, **kwargs):
        seen["grad_scale"] = getattr(opt, "grad_scale", None)
        seen["grad"] = model.weight.grad.clone()
        return original(*args, **kwargs)

    opt.step = spy
    scaled = model.weight.grad.clone()
    scaler.step(opt)
    assert seen["grad_scale"] is not None and seen["grad_scale"].item() == 1024.0
    assert torch.equal(seen["grad"], scaled)  # still scaled when the step began
    assert torch.equal(model.weight.grad, scaled / 1024)


def scaled_case(dtype, shape=(5, 7)):
    p = torch.randn(shape).to(dtype)
    g = (torch.randn(shape) * 512).to(dtype)
    s = torch.rand(shape).to(dtype)
    return p, g, s


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16,
                                   torch.complex64])
@pytest.mark.parametrize("scale", [2.0 ** 9, 3.0], ids=["power-of-two", "other"])
@pytest.mark.parametrize("rowwise", [False, True], ids=["elementwise", "rowwise"])
def test_grad_scale_equals_dividing_the_grad_first(dtype, scale, rowwise):
    """The step with a grad_scale is the step on grad / scale (rounded to the grad's dtype),
    and leaves that quotient in the grad; a power-of-two scale takes the multiplication path."""
    if rowwise and dtype.is_complex:
        pytest.skip("row-wise Adagrad refuses complex params")
    torch.manual_seed(1)
    p, g, s = scaled_case(dtype, (33, 9))
    if rowwise:
        s = torch.rand(33, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    # Complex grads: each component divided (as GradScaler's own unscaling multiplies them).
    g2 = torch.view_as_complex(torch.view_as_real(g) / scale) if dtype.is_complex else g / torch.tensor(scale)
    p2, s2 = p.clone(), s.clone()
    st, st2 = torch.tensor(2.0), torch.tensor(2.0)
    GROUPS_OP([p], [g], [s], [st], group_sizes=[1], **groups_kwargs(rowwise),
              grad_scale=torch.tensor(scale), found_inf=torch.tensor(0.0))
    GROUPS_OP([p2], [g2], [s2], [st2], group_sizes=[1], **groups_kwargs(rowwise))
    assert torch.equal(g, g2) and torch.equal(p, p2) and torch.equal(s, s2) and st.item() == 3.0


def test_float32_matches_torch_fused_for_any_scale():
    torch.manual_seed(2)
    for scale in (2.0 ** 16, 3.0, 0.7):
        p, g, s = scaled_case(torch.float32, (1000,))
        p2, g2, s2 = p.clone(), g.clone(), s.clone()
        st, st2 = torch.tensor(4.0), torch.tensor(4.0)
        GROUPS_OP([p], [g], [s], [st], group_sizes=[1], **groups_kwargs(),
                  grad_scale=torch.tensor(scale))
        torch._foreach_add_([st2], 1)
        torch._fused_adagrad_([p2], [g2], [s2], [st2], lr=0.1, lr_decay=0.01, weight_decay=0.0,
                              eps=1e-10, maximize=False, grad_scale=torch.tensor(scale))
        assert torch.equal(g, g2) and torch.equal(s, s2) and torch.equal(p, p2)


def inputs_of_every_kind():
    """Dense, non-contiguous (staged), complex, sparse (uncoalesced) and row-wise params."""
    torch.manual_seed(3)
    dense = torch.randn(70)
    strided_p = torch.randn(9, 8)[:, ::2]
    strided_g = torch.randn(8, 9).t()[:, :4]  # another layout than its param's: copied
    cplx = torch.randn(6, dtype=torch.complex64)
    table = torch.randn(10, 3)
    sparse = torch.sparse_coo_tensor(torch.tensor([[1, 7, 1, 4]]), torch.randn(4, 3) * 64, (10, 3))
    params = [dense, strided_p, cplx, table]
    grads = [torch.randn(70) * 64, strided_g * 64, torch.randn(6, dtype=torch.complex64) * 64, sparse]
    sums = [torch.rand_like(p) for p in params]
    return params, grads, sums


def grads_as_dense(grads):
    return [g.to_dense() if g.is_sparse else g.clone() for g in grads]


@pytest.mark.parametrize("rowwise", [False, True], ids=["elementwise", "rowwise"])
def test_found_inf_changes_nothing_and_otherwise_grads_are_unscaled(rowwise):
    params, grads, sums = inputs_of_every_kind()
    if rowwise:
        params, grads = params[:2] + params[3:], grads[:2] + grads[3:]
        sums = [torch.rand(p.shape[0]) for p in params]
    steps = [torch.tensor(1.0) for _ in params]
    before = [t.clone() for t in (*params, *sums, *steps)]
    grads_before = grads_as_dense(grads)
    kw = groups_kwargs(rowwise, group_sizes=[len(params)])
    scale = torch.tensor(64.0)
    GROUPS_OP(params, grads, sums, steps, **kw, grad_scale=scale, found_inf=torch.tensor(1.0))
    assert all(torch.equal(a, b) for a, b in zip(before, (*params, *sums, *steps)))
    assert all(torch.equal(a, b) for a, b in zip(grads_as_dense(grads), grads_before))
    # A nonzero found_inf skips (GradScaler sums the flags of several devices).
    GROUPS_OP(params, grads, sums, steps, **kw, grad_scale=scale, found_inf=torch.tensor(2.0))
    assert all(torch.equal(a, b) for a, b in zip(before, (*params, *sums, *steps)))

    GROUPS_OP(params, grads, sums, steps, **kw, grad_scale=scale, found_inf=torch.tensor(0.0))
    assert all(torch.equal(a, b / 64) for a, b in zip(grads_as_dense(grads), grads_before))
    assert all(st.item() == 2.0 for st in steps)
    # The same as a step on the unscaled grads.
    params2 = [b.clone() for b in before[:len(params)]]
    sums2 = [b.clone() for b in before[len(params):2 * len(params)]]
    steps2 = [torch.tensor(1.0) for _ in params]
    GROUPS_OP(params2, grads, sums2, steps2, **kw)
    assert all(torch.equal(a, b) for a, b in zip(params, params2))
    assert all(torch.equal(a, b) for a, b in zip(sums, sums2))


def test_found_inf_alone_skips_without_unscaling():
    """GradScaler passes grad_scale=None after the user called scaler.unscale_(opt)."""
    p, g, s = scaled_case(torch.float32)
    before = [p.clone(), s.clone(), g.clone()]
    st = torch.tensor(0.0)
    GROUPS_OP([p], [g], [s], [st], group_sizes=[1], **groups_kwargs(), found_inf=torch.tensor(1.0))
    assert torch.equal(p, before[0]) and torch.equal(s, before[1]) and st.item() == 0.0
    GROUPS_OP([p], [g], [s], [st], group_sizes=[1], **groups_kwargs(), found_inf=torch.tensor(0.0))
    assert torch.equal(g, before[2]) and not torch.equal(p, before[0]) and st.item() == 1.0


def test_unscale_after_explicit_unscale_call_matches_torch_fused():
    """scaler.unscale_(opt) (e.g. for clipping), then scaler.step(opt): no second unscaling."""
    def run(make_opt):
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 4)
        opt = make_opt(model.parameters())
        scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
        for _ in range(3):
            opt.zero_grad()
            scaler.scale(model(torch.randn(5, 8)).pow(2).sum()).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
        return list(model.parameters())
    ours = run(lambda p: FusedAdagrad(p, lr=0.1))
    ref = run(lambda p: torch.optim.Adagrad(p, lr=0.1, fused=True))
    assert all(torch.equal(a, b) for a, b in zip(ours, ref))


def test_rowwise_under_grad_scaler_equals_stepping_unscaled_grads():
    def run(scaled):
        torch.manual_seed(0)
        emb = torch.nn.Embedding(50, 8, sparse=True)
        lin = torch.nn.Linear(8, 1)
        opt = RowWiseAdagrad(list(emb.parameters()) + list(lin.parameters()), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=512.0, enabled=scaled)
        for i in range(4):
            opt.zero_grad()
            loss = lin(emb(torch.randint(0, 50, (12,)))).pow(2).mean()
            scaler.scale(loss).backward()
            if i == 2:
                lin.weight.grad[0, 0] = float("inf") if scaled else lin.weight.grad[0, 0]
                if not scaled:
                    continue  # the step the scaler skips
            scaler.step(opt)
            scaler.update()
        return [p.detach().clone() for p in (*emb.parameters(), *lin.parameters())]
    assert all(torch.equal(a, b) for a, b in zip(run(True), run(False)))


def test_shared_grads_are_refused_when_unscaling():
    g = torch.randn(6)
    params = [torch.randn(6), torch.randn(6)]
    args = (params, [g, g], [torch.zeros(6), torch.zeros(6)], [torch.tensor(0.0), torch.tensor(0.0)])
    before = [params[0].clone(), g.clone()]
    with pytest.raises(RuntimeError, match="param group 0, param 0: grad shares memory with param "
                                           "group 0, param 1's grad"):
        GROUPS_OP(*args, **groups_kwargs(group_sizes=[2]), grad_scale=torch.tensor(2.0))
    assert torch.equal(params[0], before[0]) and torch.equal(g, before[1])
    GROUPS_OP(*args, **groups_kwargs(group_sizes=[2]))  # without a scale they are only read


@pytest.mark.parametrize("bad, match", [
    (dict(grad_scale=torch.tensor([2.0, 2.0])), "grad_scale must be a one-element float32 tensor"),
    (dict(grad_scale=torch.tensor(2.0, dtype=torch.float64)), "grad_scale must be a one-element float32"),
    (dict(found_inf=torch.tensor(0)), "found_inf must be a one-element float32 tensor"),
])
def test_bad_scaling_tensors_are_refused_and_nothing_changes(bad, match):
    p, g, s = scaled_case(torch.float32)
    before = [p.clone(), g.clone(), s.clone()]
    with pytest.raises(RuntimeError, match=match):
        GROUPS_OP([p], [g], [s], [torch.tensor(0.0)], group_sizes=[1], **groups_kwargs(), **bad)
    assert all(torch.equal(a, b) for a, b in zip(before, (p, g, s)))


@needs_compilable_op
@pytest.mark.parametrize("rowwise", [False, True], ids=["elementwise", "rowwise"])
def test_opcheck_with_scaling(rowwise):
    params = [torch.randn(4, 3), torch.randn(5)]
    sums = [torch.zeros(4), torch.zeros(5)] if rowwise else [torch.zeros_like(p) for p in params]
    for found in (0.0, 1.0):
        args = (params, [torch.randn(4, 3) * 8, torch.randn(5) * 8], sums,
                [torch.tensor(0.0) for _ in params])
        torch.library.opcheck(GROUPS_OP, args, dict(
            groups_kwargs(rowwise, group_sizes=[2]), grad_scale=torch.tensor(8.0),
            found_inf=torch.tensor(found)))


def test_grad_scale_bumps_the_grads_version():
    p, g, s = scaled_case(torch.float32)
    version = g._version
    GROUPS_OP([p], [g], [s], [torch.tensor(0.0)], group_sizes=[1], **groups_kwargs())
    assert g._version == version
    GROUPS_OP([p], [g], [s], [torch.tensor(0.0)], group_sizes=[1], **groups_kwargs(),
              grad_scale=torch.tensor(2.0))
    assert g._version > version


def test_step_in_backward_cannot_run_under_a_grad_scaler():
    model = torch.nn.Linear(3, 2)
    opt = FusedAdagrad(model.parameters(), step_in_backward=True)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(model(torch.randn(2, 3)).sum()).backward()
    with pytest.raises(RuntimeError, match="step_in_backward=True cannot be used with torch.amp.GradScaler"):
        scaler.step(opt)

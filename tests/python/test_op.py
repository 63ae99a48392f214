"""The dispatcher op itself, the pybind11 module and the C++ optimizer seen from Python."""
import os
import re
import subprocess
import sys

import pytest
import torch

import fused_adagrad
from fused_adagrad import FusedAdagrad, _C
from torch_support import needs_compilable_op

OP = torch.ops.fused_adagrad.adagrad_step_
HYPER = dict(lr=0.1, lr_decay=0.01, weight_decay=0.1, eps=1e-10, maximize=False)


def sample_inputs():
    def make(shapes, dtype=torch.float32):
        params = [torch.randn(s, dtype=dtype) for s in shapes]
        return (params, [torch.randn_like(p) for p in params], [torch.rand_like(p) for p in params],
                [torch.tensor(3.0) for _ in params])
    yield make([(), (0,), (17,), (4, 5)]), HYPER
    params, grads, sums, steps = make([(3,), (8,)], torch.float64)
    yield (params, [grads[0], None], sums, steps), dict(HYPER, maximize=True)
    yield make([(33,)], torch.bfloat16), dict(HYPER, eps_inside_sqrt=True)
    yield make([(5,)]), dict(HYPER, lr_tensor=torch.tensor(0.05))


@needs_compilable_op
@pytest.mark.parametrize("case", list(sample_inputs()), ids=["mixed-shapes", "none-grad", "bf16", "lr-tensor"])
def test_opcheck(case):
    args, kwargs = case
    torch.library.opcheck(OP, args, kwargs)


GROUPS_OP = torch.ops.fused_adagrad.adagrad_step_groups_


def groups_kwargs(n, rowwise=False, **overrides):
    """The per-group option lists of adagrad_step_groups_ for n groups of HYPER's options."""
    kw = {k: [v] * n for k, v in HYPER.items()}
    kw.update(eps_inside_sqrt=[False] * n, lr_tensor=[None] * n, rowwise=rowwise)
    kw.update(overrides)
    return kw


@needs_compilable_op
@pytest.mark.parametrize("rowwise", [False, True], ids=["elementwise", "rowwise"])
def test_groups_op_opcheck(rowwise):
    params = [torch.randn(4, 3), torch.randn(5), torch.randn(2, 2)]
    sums = ([torch.zeros(4), torch.zeros(5), torch.zeros(2)] if rowwise
            else [torch.zeros_like(p) for p in params])
    # No None grad: the grads are mutable (a grad_scale writes them), and torch 2.13's
    # auto_functionalize fails on None in a mutable Tensor?[] (the optimizers pass only params
    # with grads; test_groups_op_takes_none_grads_in_eager covers None).
    args = (params, [torch.randn(4, 3), torch.randn(5), torch.randn(2, 2)], sums,
            [torch.tensor(0.0) for _ in params])
    kw = groups_kwargs(2, rowwise, group_sizes=[2, 1], lr=[0.1, 0.01],
                       lr_tensor=[None, torch.tensor(0.05)])
    torch.library.opcheck(GROUPS_OP, args, kw)


def test_groups_op_takes_none_grads_in_eager():
    params = [torch.randn(3), torch.randn(4)]
    before = params[1].clone()
    steps = [torch.tensor(0.0), torch.tensor(0.0)]
    GROUPS_OP(params, [torch.randn(3), None], [torch.zeros(3), torch.zeros(4)], steps,
              **groups_kwargs(1, group_sizes=[2]))
    assert torch.equal(params[1], before) and steps[0].item() == 1 and steps[1].item() == 0


def test_optimizer_errors_name_the_params_index_in_its_group_when_some_have_no_grad():
    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(3)]
    opt = FusedAdagrad([{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.1}])
    params[0].grad = torch.randn(3)
    params[2].grad = torch.randn(3).to_sparse()  # the op sees it as the group's param 0
    with pytest.raises(RuntimeError, match="FusedAdagrad: param group 1, param 1: weight_decay"):
        opt.step()


def test_groups_op_equals_one_op_call_per_group():
    torch.manual_seed(0)
    params = [torch.randn(7), torch.randn(3, 5), torch.randn(4)]
    grads = [torch.randn_like(p) for p in params]
    copies = [p.clone() for p in params]
    sums, copy_sums = ([torch.full_like(p, 0.1) for p in params] for _ in range(2))
    steps, copy_steps = ([torch.tensor(2.0) for _ in params] for _ in range(2))
    options = [dict(lr=0.1, lr_decay=0.01, weight_decay=0.1, eps=1e-10, maximize=True,
                    eps_inside_sqrt=False),
               dict(lr=0.5, lr_decay=0.0, weight_decay=0.0, eps=1e-3, maximize=False,
                    eps_inside_sqrt=True)]
    GROUPS_OP(params, grads, sums, steps, group_sizes=[1, 2],
              lr_tensor=[None, None], **{k: [o[k] for o in options] for k in options[0]})
    OP(copies[:1], grads[:1], copy_sums[:1], copy_steps[:1], **options[0])
    OP(copies[1:], grads[1:], copy_sums[1:], copy_steps[1:], **options[1])
    for a, b in zip(params + sums + steps, copies + copy_sums + copy_steps):
        assert torch.equal(a, b)


def test_groups_op_names_the_group_and_refuses_sharing_across_groups():
    p, q = torch.randn(3), torch.randn(3)
    step = torch.tensor(0.0)
    args = ([p, q], [torch.randn(3), torch.randn(3)], [torch.zeros(3), torch.zeros(3)], [step, step])
    with pytest.raises(RuntimeError, match="param group 0, param 0: state 'step' shares memory "
                                           "with param group 1, param 0's state 'step'"):
        GROUPS_OP(*args, **groups_kwargs(2, group_sizes=[1, 1]))
    assert step.item() == 0
    with pytest.raises(RuntimeError, match="param group 1, param 0: grad has shape"):
        GROUPS_OP([p, q], [torch.randn(3), torch.randn(4)], [torch.zeros(3), torch.zeros(3)],
                  [torch.tensor(0.0), torch.tensor(0.0)], **groups_kwargs(2, group_sizes=[1, 1]))
    with pytest.raises(RuntimeError, match="group sizes add up to 1 but the lists hold 2"):
        GROUPS_OP(*args, **groups_kwargs(1, group_sizes=[1]))
    with pytest.raises(RuntimeError, match="one entry per param group"):
        GROUPS_OP(*args, **groups_kwargs(2, group_sizes=[1, 1], lr=[0.1]))


def test_op_increments_steps_only_for_params_with_grad():
    params = [torch.randn(3), torch.randn(3)]
    steps = [torch.tensor(0.0), torch.tensor(0.0)]
    OP(params, [torch.randn(3), None], [torch.zeros(3), torch.zeros(3)], steps, **HYPER)
    assert steps[0].item() == 1 and steps[1].item() == 0


def test_meta_tensors_are_validated_without_computing():
    p = torch.empty(4, device="meta")
    OP([p], [torch.empty(4, device="meta")], [torch.empty(4, device="meta")],
       [torch.empty((), device="meta")], **HYPER)
    with pytest.raises(RuntimeError, match="param 0: grad has shape"):
        OP([p], [torch.empty(5, device="meta")], [torch.empty(4, device="meta")],
           [torch.empty((), device="meta")], **HYPER)


def test_build_info():
    info = fused_adagrad.build_info()
    # The package's version adds the torch it was built for: 0.1.0+torch2.13cpu.
    version, local = fused_adagrad.__version__.split("+")
    assert info["version"] == version
    torch_minor = ".".join(torch.__version__.split(".")[:2])
    assert local == f"torch{torch_minor}" + (f"cu{torch.version.cuda.replace('.', '')}" if info["cuda"] else "cpu")
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    assert info["cpu_kernels"][0] == "base"
    assert info["cpu_kernel"] in info["cpu_kernels_runnable"]
    assert info["cpu_kernel_error"] == ""
    assert isinstance(info["cuda"], bool)
    if info["cuda"]:
        assert info["cuda_archs"] and info["cuda_devices"] == torch.cuda.device_count()
    else:
        assert info["cuda_archs"] == [] and info["cuda_devices"] == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="libstdc++ and dlsym: Linux")
def test_native_code_shares_the_process_cpp_runtime():
    """No second copy of libstdc++ inside our libraries: with a static copy beside torch's shared
    one (a compiler without the shared library links it so), the first error message our code
    formatted crashed the process. A symbol our code uses must resolve to libstdc++'s own."""
    import ctypes
    package = os.path.dirname(fused_adagrad.__file__)
    try:
        runtime = ctypes.CDLL("libstdc++.so.6")
    except OSError:
        pytest.skip("no libstdc++.so.6 in this process (another C++ runtime)")
    # std::ostream::_M_insert<unsigned long>: what formatting an index into a message runs.
    symbol = "_ZNSo9_M_insertImEERSoT_"
    for path in [_C.__file__, os.path.join(package, "lib", "libfused_adagrad.so")]:
        ours = ctypes.cast(getattr(ctypes.CDLL(path), symbol), ctypes.c_void_p).value
        assert ours == ctypes.cast(getattr(runtime, symbol), ctypes.c_void_p).value, (
            f"{path} carries its own copy of libstdc++")
    with pytest.raises(RuntimeError, match=r"sparse grad index 7 \(entry 0\)"):
        p = torch.zeros(3, 2)
        p.grad = torch.sparse_coo_tensor(torch.tensor([[7]]), torch.ones(1, 2), (3, 2),
                                         check_invariants=False)
        FusedAdagrad([p]).step()


@pytest.mark.skipif(not fused_adagrad.build_info()["cuda"], reason="fused_adagrad was built without CUDA")
def test_cuda_build_registers_every_op_and_loads_without_a_gpu():
    """A CUDA build imports, and answers build_info(), where no GPU or driver is (a login node, a
    CPU CI box): nothing touched the CUDA runtime. Every op has its CUDA kernels registered."""
    info = fused_adagrad.build_info()
    assert info["cuda_devices"] == torch.cuda.device_count()
    assert info["cuda_archs"], "no CUDA architectures recorded"
    for arch in info["cuda_archs"]:
        assert re.fullmatch(r"\d+\.\d+[a-z]?(\+PTX)?", arch), info["cuda_archs"]
    if info["cuda_devices"] == 0:
        assert not info["cuda_launch"]["large_tables_usable"]
    for op in ("adagrad_step_", "adagrad_step_groups_", "rowwise_adagrad_step_"):
        for key in ("CUDA", "SparseCUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_adagrad::{op}", key), (op, key)


def _import_with(env):
    return subprocess.run([sys.executable, "-c", "import fused_adagrad; print(fused_adagrad.build_info()['cpu_kernel'])"],
                          env={**os.environ, **env}, capture_output=True, text=True)


def test_max_isa_hides_wider_kernels():
    """FUSED_ADAGRAD_MAX_ISA plays a CPU without the wider instruction sets, on any CPU."""
    run = _import_with({"FUSED_ADAGRAD_MAX_ISA": "base", "FUSED_ADAGRAD_CPU_KERNEL": ""})
    assert run.returncode == 0 and run.stdout.strip() == "base", run.stderr


@pytest.mark.parametrize("env, message", [
    ({"FUSED_ADAGRAD_MAX_ISA": "base", "FUSED_ADAGRAD_CPU_KERNEL": "avx2"},
     "FUSED_ADAGRAD_CPU_KERNEL=avx2: this CPU cannot run the avx2 kernel (it runs base, as "
     "FUSED_ADAGRAD_MAX_ISA=base hides wider ones); unset it or choose one of those"),
    ({"FUSED_ADAGRAD_CPU_KERNEL": "sse"}, "FUSED_ADAGRAD_CPU_KERNEL=sse is not a kernel name"),
    ({"FUSED_ADAGRAD_MAX_ISA": "avx3"}, "FUSED_ADAGRAD_MAX_ISA=avx3 is not a kernel name"),
])
def test_impossible_kernel_request_fails_at_import_naming_it(env, message):
    run = _import_with(env)
    assert run.returncode != 0
    last_line = run.stderr.strip().splitlines()[-1]
    assert last_line.startswith("RuntimeError: " + message), run.stderr
    # The traceback points at the check of the request, not at an unrelated line.
    assert "_check_cpu_kernel_request" in run.stderr


@pytest.mark.parametrize("kw", [dict(), dict(lr=0.1, lr_decay=0.1, weight_decay=0.05),
                                dict(maximize=True, initial_accumulator_value=0.2, eps=1e-4)])
def test_cpp_optimizer_from_python(kw):
    """The C++ fused_adagrad::FusedAdagrad, through pybind11: the same op, so bitwise equal to the
    Python optimizer, and close to torch.optim.Adagrad."""
    torch.manual_seed(0)
    a = [torch.randn(17), torch.randn(4, 33, dtype=torch.float64)]
    b, c = [p.clone() for p in a], [p.clone() for p in a]
    cpp = _C.CppFusedAdagrad(a, **kw)
    py = FusedAdagrad(b, **kw)
    ref = torch.optim.Adagrad(c, foreach=False, **kw)
    for step in range(20):
        for ps in (a, b, c):
            torch.manual_seed(step)
            for p in ps:
                p.grad = torch.randn_like(p)
        cpp.step()
        py.step()
        ref.step()
    for x, y, z in zip(a, b, c):
        assert torch.equal(x, y)
        torch.testing.assert_close(x, z, rtol=1e-5, atol=1e-6)
        state = cpp.state(x)
        assert set(state) == {"step", "sum"}
        assert state["step"].item() == 20
        assert torch.equal(state["sum"], py.state[y]["sum"])
    cpp.zero_grad(True)
    assert all(p.grad is None for p in a)


def test_cpp_optimizer_validates_options():
    with pytest.raises(RuntimeError, match="Invalid learning rate: -1"):
        _C.CppFusedAdagrad([torch.randn(2)], lr=-1.0)


def aliasing_cases():
    p, q = torch.randn(6), torch.randn(6)
    step = torch.tensor(0.0)
    yield "shared step", ([p, q], [torch.randn(6), torch.randn(6)], [torch.zeros(6), torch.zeros(6)],
                          [step, step]), r"param 0: state 'step' shares memory with param 1's state 'step'"
    yield "sum is the param", ([p], [torch.randn(6)], [p], [torch.tensor(0.0)]), "shares memory"
    big = torch.randn(10)
    yield "grad overlaps param", ([big[:6]], [big[4:]], [torch.zeros(6)], [torch.tensor(0.0)]), "shares memory"
    yield "same param twice", ([p, p], [torch.randn(6), torch.randn(6)], [torch.zeros(6), torch.zeros(6)],
                               [torch.tensor(0.0), torch.tensor(0.0)]), "shares memory"
    yield "expanded param", ([torch.randn(1).expand(6)], [torch.randn(6)], [torch.zeros(6)],
                             [torch.tensor(0.0)]), "param 0: param has elements that share memory"


@pytest.mark.parametrize("case", list(aliasing_cases()), ids=lambda c: c[0])
def test_tensors_that_share_written_memory_are_refused_and_nothing_changes(case):
    _, (params, grads, sums, steps), match = case
    before = [t.clone() for t in (*params, *sums, *steps)]
    with pytest.raises(RuntimeError, match=match):
        OP(params, grads, sums, steps, **HYPER)
    # The op over groups names the group too.
    with pytest.raises(RuntimeError, match=re.sub(r"param (\d)", r"param group 0, param \1", match)):
        GROUPS_OP(params, grads, sums, steps, **groups_kwargs(1, group_sizes=[len(params)]))
    assert all(torch.equal(a, b) for a, b in zip(before, (*params, *sums, *steps)))


def test_grads_may_share_memory_with_each_other():
    g = torch.randn(6)
    params = [torch.randn(6), torch.randn(6)]
    OP(params, [g, g], [torch.zeros(6), torch.zeros(6)], [torch.tensor(0.0), torch.tensor(0.0)], **HYPER)


def test_bad_lr_tensor_is_refused_before_any_group_steps():
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    opt = FusedAdagrad([{"params": [a]}, {"params": [b]}], lr=0.1)
    opt.param_groups[1]["lr"] = torch.tensor([0.1, 0.2])
    a.grad, b.grad = torch.randn(3), torch.randn(3)
    before = a.detach().clone()
    with pytest.raises(RuntimeError, match="param group 1, lr must be a float or a one-element"):
        opt.step()
    assert torch.equal(a, before) and opt.state[a]["step"].item() == 0


@pytest.mark.parametrize("bad", [float("nan"), -1.0])
def test_nan_or_negative_host_step_is_refused_and_nothing_changes(bad):
    params = [torch.randn(5), torch.randn(5)]
    steps = [torch.tensor(2.0), torch.tensor(bad)]
    before = [t.clone() for t in (*params, steps[0])]
    with pytest.raises(RuntimeError, match="param 1: state 'step' is (nan|-1); a step count must be"):
        OP(params, [torch.randn(5), torch.randn(5)], [torch.zeros(5), torch.zeros(5)], steps, **HYPER)
    assert all(torch.equal(a, b) for a, b in zip(before, (*params, steps[0])))

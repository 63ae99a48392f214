"""fused_adagrad.FusedAdagrad: a drop-in for torch.optim.Adagrad backed by one fused op call per
step for all param groups, and the base it shares with RowWiseAdagrad (rowwise.py)."""
import re
import sys
import weakref
from typing import Optional, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _C
from ._compat import eager_under_compile

_step_groups = eager_under_compile(torch.ops.fused_adagrad.adagrad_step_groups_)
_step = eager_under_compile(torch.ops.fused_adagrad.adagrad_step_)
_rowwise_step = eager_under_compile(torch.ops.fused_adagrad.rowwise_adagrad_step_)


def _with_user_indices(message: str, kept) -> str:
    """An op error names "param group g, param i" by its position in the op's lists; kept[g]
    maps that back to the param's index in the user's group (None: all of the group passed)."""
    def rename(m):
        g, i = int(m.group(1)), int(m.group(2))
        index = kept[g][i] if g < len(kept) and kept[g] is not None and i < len(kept[g]) else i
        return f"param group {g}, param {index}"
    return re.sub(r"param group (\d+), param (\d+)", rename, message)


def _on_huge_pages(empty: Tensor) -> Tensor:
    """`empty` (just allocated, not yet written), its memory asked onto transparent huge pages
    where it holds whole 2 MiB ones (CPU, Linux; see advise_huge_pages in the C++ header): a
    sparse step touches rows all over a table, and on 4 KiB pages each one is a TLB miss."""
    if type(empty) is Tensor and empty.device.type == "cpu":
        _C.advise_huge_pages(empty)
    return empty


def _huge_page_copy(t: Tensor) -> Tensor:
    """t copied onto 2 MiB pages, for a state loaded from a checkpoint (torch allocated it,
    without the advice); t itself where the advice cannot be taken (not a plain CPU tensor, no
    whole 2 MiB page, THP off)."""
    if type(t) is not Tensor or t.device.type != "cpu" or t.nbytes < (2 << 20):
        return t
    copy = torch.empty_like(t, memory_format=torch.preserve_format)
    return copy.copy_(t) if _C.advise_huge_pages(copy) else t


def _dtensor_type():
    """torch.distributed.tensor.DTensor once something has imported it (FSDP2, DTensor users),
    else None: a process that never did pays nothing for the check."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def _local_shards(params, grads, sums):
    """DTensor params (FSDP2's fully_shard, distribute_tensor) step on their local shards:
    Adagrad is element-wise, so each rank's shard steps exactly as the whole tensor would. Sums
    and grads are DTensors of the param's placements (sums are made with them); the op gets the
    local tensors. Plain tensors pass through."""
    dtensor = _dtensor_type()

    def local(t):
        return t._local_tensor if isinstance(t, dtensor) else t

    return ([local(p) for p in params], [None if g is None else local(g) for g in grads],
            [local(s) for s in sums])


class _FusedAdagradBase(Optimizer):
    """Arguments, validation, state and the one-op step of both optimizers; a subclass says
    which Adagrad it is and makes its `sum` state."""

    _rowwise = False  # which Adagrad the op runs: element-wise or row-wise
    # torch.amp.GradScaler then skips its own unscaling pass: it sets `grad_scale` and
    # `found_inf` on the optimizer around step(), which hands them to the op.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params,
        lr: Union[float, Tensor] = 1e-2,
        lr_decay: float = 0,
        weight_decay: float = 0,
        initial_accumulator_value: float = 0,
        eps: float = 1e-10,
        foreach: Optional[bool] = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        eps_inside_sqrt: bool = False,
        step_in_backward: bool = False,
    ) -> None:
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= lr_decay:
            raise ValueError(f"Invalid lr_decay value: {lr_decay}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not 0.0 <= initial_accumulator_value:
            raise ValueError(f"Invalid initial_accumulator_value value: {initial_accumulator_value}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if differentiable:
            raise ValueError(
                f"{type(self).__name__} does not support differentiable=True; "
                "use torch.optim.Adagrad(differentiable=True) to differentiate through the step"
            )
        if fused and foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        defaults = {
            "lr": lr,
            "lr_decay": lr_decay,
            "eps": eps,
            "weight_decay": weight_decay,
            "initial_accumulator_value": initial_accumulator_value,
            "foreach": foreach,
            "maximize": maximize,
            "differentiable": differentiable,
            "fused": fused,
            "eps_inside_sqrt": eps_inside_sqrt,
        }
        # Set before super().__init__, whose add_param_group calls register the hooks.
        self._step_in_backward = step_in_backward
        self._backward_hooks = []
        self._group_of_param = None  # id(param) -> its group, for the hooks; None: rebuild
        super().__init__(params, defaults)  # calls add_param_group, which creates the state

    def _new_sum(self, p: Tensor, init: float) -> Tensor:
        raise NotImplementedError

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for p in group["params"]:
            self._init_state(p, group)
        self._group_of_param = None
        if getattr(self, "_step_in_backward", False):
            optimizer = weakref.ref(self)  # the params' hooks must not keep the optimizer alive

            def hook(param):
                opt = optimizer()
                if opt is not None:
                    opt._step_param(param)

            for p in group["params"]:
                if p.requires_grad:
                    self._backward_hooks.append(p.register_post_accumulate_grad_hook(hook))

    def _step_param(self, p: Tensor) -> None:
        """step_in_backward: one param's step as soon as its grad is complete, then its grad is
        freed. The group is looked up now, so schedulers and load_state_dict take effect."""
        if self._group_of_param is None:
            self._group_of_param = {id(q): (i, g) for i, g in enumerate(self.param_groups)
                                    for q in g["params"]}
        index, group = self._group_of_param[id(p)]
        state = self.state[p] or self._init_state(p, group)
        lr = group["lr"]
        is_tensor = isinstance(lr, Tensor)
        op = _rowwise_step if self._rowwise else _step
        try:
            with torch.no_grad():
                ps, gs, ss = [p], [p.grad], [state["sum"]]
                if _dtensor_type() is not None and isinstance(p, _dtensor_type()):
                    ps, gs, ss = _local_shards(ps, gs, ss)
                op(ps, gs, ss, [state["step"]],
                   lr=0.0 if is_tensor else lr, lr_decay=group["lr_decay"],
                   weight_decay=group["weight_decay"], eps=group["eps"],
                   maximize=group["maximize"], eps_inside_sqrt=group["eps_inside_sqrt"],
                   lr_tensor=lr if is_tensor else None)
        except RuntimeError as e:
            raise RuntimeError(f"{type(self).__name__}: param group {index}, {e}") from None
        p.grad = None

    def share_memory(self) -> None:
        """Moves the `sum` states to shared memory (Hogwild training with torch.multiprocessing),
        as torch.optim.Adagrad does; steps stay per process, as there."""
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["sum"].share_memory_()

    def _init_state(self, p: Tensor, group: dict) -> dict:
        state = self.state[p]
        if len(state) == 0:
            # Same keys, order and dtypes as torch.optim.Adagrad. On an accelerator the step lives
            # with the param, so a step needs no host synchronization.
            if p.device.type == "cpu":
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
            else:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["sum"] = self._new_sum(p, group["initial_accumulator_value"])
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # Loaded sums are torch's allocations: onto 2 MiB pages, as the ones we create.
        for state in self.state.values():
            if torch.is_tensor(state.get("sum")):
                state["sum"] = _huge_page_copy(state["sum"])

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._group_of_param = None  # load_state_dict made new group dicts
        # Unpickled (another process): hooks do not travel, so it steps in step().
        self.__dict__.setdefault("_step_in_backward", False)
        self.__dict__.setdefault("_backward_hooks", [])
        for group in self.param_groups:
            group.setdefault("foreach", None)
            group.setdefault("maximize", False)
            group.setdefault("differentiable", False)
            group.setdefault("fused", None)
            group.setdefault("eps_inside_sqrt", False)
            for p in group["params"]:
                p_state = self.state.get(p)
                step = p_state.get("step") if p_state else None
                if step is None:
                    continue
                if not torch.is_tensor(step):
                    step = torch.tensor(float(step), dtype=torch.float32)
                if not p.is_cpu and step.device != p.device:
                    # Checkpoints of torch.optim.Adagrad keep steps on the host; ours live with
                    # accelerator params, so a step needs no host synchronization.
                    step = step.to(p.device, torch.float32)
                p_state["step"] = step

    @torch.no_grad()
    def step(self, closure=None):
        """Performs one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._step_in_backward:
            scaler_set = (getattr(self, "grad_scale", None) is not None
                          or getattr(self, "found_inf", None) is not None)
            if scaler_set:
                raise RuntimeError(
                    f"{type(self).__name__}: step_in_backward=True cannot be used with "
                    "torch.amp.GradScaler: the params stepped during backward, on grads the scaler "
                    "had not yet checked or unscaled. Step in step() (step_in_backward=False), or "
                    "use bfloat16 autocast, which needs no scaler")
            return loss  # the params stepped during backward

        # One op call for every group: it validates them all before it changes any, so a failed
        # step changes nothing. Per param the least work (list comprehensions); state is made
        # here only for a param whose state was emptied (add_param_group made it). Only params
        # with a grad are passed, as torch's optimizers do: the op's grads are mutable (a
        # grad_scale makes it write them), and torch.compile's functionalization cannot take
        # None in a mutable list.
        params, grads, sums, steps = [], [], [], []
        sizes, lr, lr_tensor, kept = [], [], [], []
        dtensor = _dtensor_type()  # once: per param, it was a tenth of a 1000-tensor step
        for group in self.param_groups:
            ps = group["params"]
            group_grads = [p.grad for p in ps]
            if any(g is None for g in group_grads):  # not `None in`: that runs Tensor.__eq__
                kept.append([i for i, g in enumerate(group_grads) if g is not None])
                ps = [ps[i] for i in kept[-1]]
                group_grads = [group_grads[i] for i in kept[-1]]
            else:
                kept.append(None)
            states = [self.state[p] for p in ps]
            if not all(states):
                states = [s or self._init_state(p, group) for p, s in zip(ps, states)]
            group_sums = [s["sum"] for s in states]
            if dtensor is not None and any(isinstance(p, dtensor) for p in ps):
                ps, group_grads, group_sums = _local_shards(ps, group_grads, group_sums)
            params += ps
            grads += group_grads
            sums += group_sums
            steps += [s["step"] for s in states]
            sizes.append(len(ps))
            group_lr = group["lr"]
            is_tensor = isinstance(group_lr, Tensor)
            lr.append(0.0 if is_tensor else group_lr)
            lr_tensor.append(group_lr if is_tensor else None)
        if not params:
            return loss  # no grads: nothing steps (and the op would have no device to run on)
        groups = self.param_groups
        try:
            _step_groups(
                params, grads, sums, steps,
                group_sizes=sizes,
                lr=lr,
                lr_decay=[g["lr_decay"] for g in groups],
                weight_decay=[g["weight_decay"] for g in groups],
                eps=[g["eps"] for g in groups],
                maximize=[g["maximize"] for g in groups],
                eps_inside_sqrt=[g["eps_inside_sqrt"] for g in groups],
                lr_tensor=lr_tensor,
                rowwise=self._rowwise,
                grad_scale=getattr(self, "grad_scale", None),
                found_inf=getattr(self, "found_inf", None),
            )
        except RuntimeError as e:
            message = _with_user_indices(str(e), kept)
            raise RuntimeError(f"{type(self).__name__}: {message}") from None
        return loss


class FusedAdagrad(_FusedAdagradBase):
    """Adagrad with the arguments, numbers and state layout of ``torch.optim.Adagrad``.

    Each step is one fused op call for all param groups (validated together before any
    changes): for every element it reads param, grad and the squared-gradient sum once and
    writes param and sum once. ``state_dict()`` from either optimizer
    loads into the other. Differences from torch.optim.Adagrad, all additions:

    * ``eps_inside_sqrt=True`` divides by ``sqrt(sum + eps)`` (Keras 3, Optax, d2l) instead of
      ``sqrt(sum) + eps``.
    * A step that raises (bad grad shape, dtype, device, a sparse grad with weight decay, a state
      loaded from another model) changes no parameter and no state.
    * Params added with ``add_param_group`` get state at once, from their own group's
      ``initial_accumulator_value``.

    * ``step_in_backward=True`` steps each param from a post-accumulate-grad hook as soon as
      backward has produced its grad, then frees the grad (``p.grad = None``), so that no more
      than one param's grad needs to be alive at once beyond what autograd holds; ``step()``
      then only runs the closure. Same numbers as the plain step; each backward is one step (no
      grad accumulation over several backwards), and a failing param raises from backward.
    * ``share_memory()`` as torch.optim.Adagrad's.
    * Under ``torch.amp.GradScaler`` the step unscales the grads itself, in its own pass (as
      torch's ``fused=True`` does, and with the same numbers): ``scaler.step(opt)`` hands it
      the scale instead of unscaling the grads first (it still checks them for infs). A step the scaler finds infs for changes nothing (no param, sum,
      step count or grad); any other step leaves the unscaled grads in ``.grad``, as
      ``fused=True`` does. (``step_in_backward=True`` cannot be combined with a GradScaler: its
      steps run during backward, before the scaler has looked at the grads.)

    ``foreach`` and ``fused`` are accepted and stored for compatibility; they change nothing.
    ``differentiable=True`` is not supported.
    """

    def _new_sum(self, p: Tensor, init: float) -> Tensor:
        init = complex(init, init) if torch.is_complex(p) else init
        return _on_huge_pages(torch.empty_like(p, memory_format=torch.preserve_format)).fill_(init)

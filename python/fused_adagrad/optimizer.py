"""fused_adagrad.FusedAdagrad: a drop-in for torch.optim.Adagrad backed by one fused op per group,
and the base it shares with RowWiseAdagrad (rowwise.py)."""
from typing import Optional, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

_check_op = torch.ops.fused_adagrad.check_adagrad_inputs


class _FusedAdagradBase(Optimizer):
    """Arguments, validation, state and the one-op-per-group step of both optimizers; a subclass
    names its op and makes its `sum` state."""

    _step_op = None  # torch.ops.fused_adagrad.*_step_
    _rowwise = False

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
        super().__init__(params, defaults)  # calls add_param_group, which creates the state

    def _new_sum(self, p: Tensor, init: float) -> Tensor:
        raise NotImplementedError

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for p in group["params"]:
            self._init_state(p, group)

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

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
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

    def _group_inputs(self, group: dict):
        """Every param of the group in order (errors then name its index); grad None = skipped.
        Runs once per group and step, so it does the least per param: list comprehensions, and
        state is made here only for a param whose state was emptied (add_param_group made it)."""
        params = group["params"]
        states = [self.state[p] for p in params]
        if not all(states):
            states = [s or self._init_state(p, group) for p, s in zip(params, states)]
        return (params, [p.grad for p in params], [s["sum"] for s in states],
                [s["step"] for s in states])

    @torch.no_grad()
    def step(self, closure=None):
        """Performs one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        name = type(self).__name__
        work = [(group, self._group_inputs(group)) for group in self.param_groups]
        if len(work) > 1:
            # Validate every group before stepping any, so that a failed step changes nothing.
            for index, (group, (params, grads, sums, steps)) in enumerate(work):
                lr = group["lr"]
                try:
                    _check_op(params, grads, sums, steps, weight_decay=group["weight_decay"],
                              rowwise=self._rowwise, lr_tensor=lr if isinstance(lr, Tensor) else None)
                except RuntimeError as e:
                    raise RuntimeError(f"{name}: param group {index}, {e}") from None
        step_op = type(self)._step_op
        for index, (group, (params, grads, sums, steps)) in enumerate(work):
            lr = group["lr"]
            lr_is_tensor = isinstance(lr, Tensor)
            try:
                step_op(
                    params,
                    grads,
                    sums,
                    steps,
                    lr=0.0 if lr_is_tensor else lr,
                    lr_decay=group["lr_decay"],
                    weight_decay=group["weight_decay"],
                    eps=group["eps"],
                    maximize=group["maximize"],
                    eps_inside_sqrt=group["eps_inside_sqrt"],
                    lr_tensor=lr if lr_is_tensor else None,
                )
            except RuntimeError as e:
                # The op validates before it changes anything, so this group is untouched too.
                raise RuntimeError(f"{name}: param group {index}, {e}") from None
        return loss


class FusedAdagrad(_FusedAdagradBase):
    """Adagrad with the arguments, numbers and state layout of ``torch.optim.Adagrad``.

    Each step runs one fused op per param group: for every element it reads param, grad and the
    squared-gradient sum once and writes param and sum once. ``state_dict()`` from either optimizer
    loads into the other. Differences from torch.optim.Adagrad, all additions:

    * ``eps_inside_sqrt=True`` divides by ``sqrt(sum + eps)`` (Keras 3, Optax, d2l) instead of
      ``sqrt(sum) + eps``.
    * A step that raises (bad grad shape, dtype, device, a sparse grad with weight decay, a state
      loaded from another model) changes no parameter and no state.
    * Params added with ``add_param_group`` get state at once, from their own group's
      ``initial_accumulator_value``.

    ``foreach`` and ``fused`` are accepted and stored for compatibility; they change nothing.
    ``differentiable=True`` is not supported.
    """

    _step_op = torch.ops.fused_adagrad.adagrad_step_

    def _new_sum(self, p: Tensor, init: float) -> Tensor:
        init = complex(init, init) if torch.is_complex(p) else init
        return torch.full_like(p, init, memory_format=torch.preserve_format)

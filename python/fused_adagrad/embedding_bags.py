"""fused_adagrad.FusedEmbeddingBags: embedding-bag tables whose backward is their Adagrad step.

With ``nn.EmbeddingBag(sparse=True)``, backward writes a sparse grad of one row per looked-up id,
which the optimizer then sorts and reads back. Here backward goes straight from the output grad
to the tables (the op ``embedding_bags_adagrad_step_``): the grad rows are never made, and the
numbers are those of the unfused path stepped by FusedAdagrad or RowWiseAdagrad.
"""
import copy
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .optimizer import FusedAdagrad, _on_huge_pages
from .rowwise import RowWiseAdagrad

_forward = torch.ops.fused_adagrad.embedding_bags_forward
_step = torch.ops.fused_adagrad.embedding_bags_adagrad_step_

_MODES = {"sum": 0, "mean": 1}


class _UpdatedInBackward:
    """The optimizer of a FusedEmbeddingBags: its param_groups carry the hyperparameters the
    backward reads (so torch.optim.lr_scheduler works), its state is the tables' Adagrad state in
    FusedAdagrad's (RowWiseAdagrad's) layout, and step() has nothing left to do: it marks the
    backward's update as taken, which the next backward checks."""

    _update_pending = False

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()  # its backward updates the tables
        self._update_pending = False
        return loss


class EmbeddingBagsAdagrad(_UpdatedInBackward, FusedAdagrad):
    """FusedEmbeddingBags' optimizer, optimizer="adagrad" (see _UpdatedInBackward)."""


class EmbeddingBagsRowWiseAdagrad(_UpdatedInBackward, RowWiseAdagrad):
    """FusedEmbeddingBags' optimizer, optimizer="rowwise" (see _UpdatedInBackward)."""


_OPTIMIZERS = {"adagrad": (EmbeddingBagsAdagrad, FusedAdagrad),
               "rowwise": (EmbeddingBagsRowWiseAdagrad, RowWiseAdagrad)}


class _BagsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, bags, indices, offsets, per_sample_weights, *weights):
        ctx.bags = bags
        ctx.updates = bags._updates
        ctx.stepped = False
        ctx.save_for_backward(indices, offsets, per_sample_weights)
        return _forward(list(weights), indices, offsets, per_sample_weights, pooling=bags._mode,
                        padding_idx=bags._padding_idx,
                        include_last_offset=bags.include_last_offset)

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.stepped:
            raise RuntimeError(
                "FusedEmbeddingBags: a second backward through the same forward would update the "
                "tables twice with one batch's grads; its Adagrad step already ran in the first")
        ctx.stepped = True
        ctx.bags._step_from_output_grad(grad_output, *ctx.saved_tensors, ctx.updates)
        return (None,) * (4 + len(ctx.bags.weights))


def _padding_per_table(padding_idx, tables) -> List[int]:
    """nn.EmbeddingBag's padding_idx per table (None, one for all, or one each), as
    non-negative row numbers, -1 for none."""
    if padding_idx is None or isinstance(padding_idx, int):
        padding_idx = [padding_idx] * len(tables)
    if len(padding_idx) != len(tables):
        raise ValueError(f"padding_idx: {len(padding_idx)} values for {len(tables)} tables")
    out = []
    for t, (pad, (rows, _)) in enumerate(zip(padding_idx, tables)):
        if pad is None:
            out.append(-1)
            continue
        if not -rows <= pad < rows:
            raise ValueError(f"table {t}: padding_idx {pad} is out of range for {rows} rows")
        out.append(pad + rows if pad < 0 else pad)
    return out


class FusedEmbeddingBags(nn.Module):
    """Several ``nn.EmbeddingBag`` tables in one module, stepped by Adagrad inside backward.

    ``tables``: ``(num_embeddings, embedding_dim)`` per table. ``forward(indices, offsets,
    per_sample_weights=None)`` takes every table's bags at once in ``nn.EmbeddingBag``'s
    convention, as TorchRec's KeyedJaggedTensor lays them out: ``indices`` holds table 0's ids,
    then table 1's, ...; ``offsets`` starts each bag, ``batch`` bags per table, table after table
    (plus, with ``include_last_offset``, the end of the last bag). It returns the pooled rows of
    all tables side by side, ``(batch, sum of the dims)``; ``split(output)`` gives one
    ``(batch, dim)`` view per table. Every id is checked first: an id out of range (or negative)
    raises, naming its table, bag and position, and nothing changes.

    ``loss.backward()`` updates the tables in place with ``optimizer="adagrad"``
    (``FusedAdagrad``'s numbers: every option but weight decay, which torch refuses for sparse
    grads) or ``"rowwise"`` (``RowWiseAdagrad``'s, with weight decay on the touched rows);
    the weights get no ``.grad``. The results equal, bit for bit, ``nn.EmbeddingBag(sparse=True)``
    tables stepped by that optimizer after each backward, whatever the thread count.

    ``self.optimizer`` holds the hyperparameters (``param_groups``, for lr schedulers) and the
    Adagrad state; call ``optimizer.step()`` after each backward, as with any optimizer: it has
    nothing left to do but is how the module tells one update per batch from grads accumulated
    over several backwards, which it refuses (as it refuses a second backward through one
    forward): each backward here *is* a step. ``state_dict()`` carries the weights and the
    optimizer state; ``from_embedding_bags`` and ``to_embedding_bags`` convert from and to a list
    of ``nn.EmbeddingBag`` plus a FusedAdagrad/RowWiseAdagrad state dict.
    """

    def __init__(
        self,
        tables: Sequence[Tuple[int, int]],
        mode: str = "sum",
        optimizer: str = "adagrad",
        lr: Union[float, Tensor] = 1e-2,
        lr_decay: float = 0,
        weight_decay: float = 0,
        initial_accumulator_value: float = 0,
        eps: float = 1e-10,
        *,
        maximize: bool = False,
        eps_inside_sqrt: bool = False,
        padding_idx: Union[None, int, Sequence[Optional[int]]] = None,
        include_last_offset: bool = False,
        dtype: Optional[torch.dtype] = None,
        device=None,
        _weights: Optional[Sequence[Tensor]] = None,
    ) -> None:
        super().__init__()
        if mode not in _MODES:
            raise ValueError(f"mode {mode!r} is not supported: 'sum' or 'mean' (max has no fused "
                             "backward)")
        if optimizer not in _OPTIMIZERS:
            raise ValueError(f"optimizer {optimizer!r}: 'adagrad' or 'rowwise'")
        if optimizer == "adagrad" and weight_decay != 0:
            raise ValueError("weight_decay needs optimizer='rowwise': element-wise Adagrad refuses "
                             "it for sparse grads (torch.optim.Adagrad does too)")
        tables = [(int(rows), int(dim)) for rows, dim in tables]
        if not tables or any(rows <= 0 or dim <= 0 for rows, dim in tables):
            raise ValueError(f"tables must be a non-empty list of (rows, dim), got {tables}")
        self.tables = tables
        self.mode = mode
        self._mode = _MODES[mode]
        self.optimizer_name = optimizer
        self._padding_idx = _padding_per_table(padding_idx, tables)
        self.include_last_offset = include_last_offset
        if _weights is None:
            _weights = []
            for (rows, dim), pad in zip(tables, self._padding_idx):
                # nn.EmbeddingBag's init, N(0, 1) (randn's own draws), on huge pages as the state.
                w = _on_huge_pages(torch.empty(rows, dim, dtype=dtype, device=device)).normal_()
                if pad >= 0:
                    w[pad] = 0
                _weights.append(w)
        self.weights = nn.ParameterList([nn.Parameter(w) for w in _weights])
        self._updates = 0  # backwards that stepped the tables
        self.optimizer = _OPTIMIZERS[optimizer][0](
            list(self.weights), lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
            initial_accumulator_value=initial_accumulator_value, eps=eps, maximize=maximize,
            eps_inside_sqrt=eps_inside_sqrt)

    def forward(self, indices: Tensor, offsets: Tensor,
                per_sample_weights: Optional[Tensor] = None) -> Tensor:
        if per_sample_weights is not None and per_sample_weights.requires_grad:
            raise RuntimeError("FusedEmbeddingBags: per_sample_weights that require grad are not "
                               "supported (the module makes no grads; its backward is the "
                               "tables' step)")
        return _BagsFunction.apply(self, indices, offsets, per_sample_weights, *self.weights)

    def split(self, output: Tensor) -> List[Tensor]:
        """The output of forward as one (batch, dim) view per table."""
        return list(output.split([dim for _, dim in self.tables], dim=1))

    def _step_from_output_grad(self, grad_output, indices, offsets, per_sample_weights,
                               updates_seen_by_forward) -> None:
        if updates_seen_by_forward != self._updates:
            raise RuntimeError(
                "FusedEmbeddingBags: the tables were updated by another backward after this "
                "backward's forward ran; its grads belong to the old values. Each backward is an "
                "Adagrad step here, so grads cannot be accumulated over several backwards: run "
                "forward, backward and optimizer.step() in turn")
        opt = self.optimizer
        if opt._update_pending:
            raise RuntimeError(
                "FusedEmbeddingBags: a second backward without optimizer.step() in between; each "
                "backward is an Adagrad step here, so grads cannot be accumulated over several "
                "backwards (that would update the tables once per backward). Call "
                "optimizer.step() after each backward (it has nothing left to do)")
        group = opt.param_groups[0]
        lr = group["lr"]
        weights = list(self.weights)
        states = [opt.state[w] for w in weights]
        with torch.no_grad():
            _step(weights, [s["sum"] for s in states], [s["step"] for s in states],
                  grad_output, indices, offsets, per_sample_weights, pooling=self._mode,
                  padding_idx=self._padding_idx, include_last_offset=self.include_last_offset,
                  rowwise=self.optimizer_name == "rowwise",
                  lr=0.0 if isinstance(lr, Tensor) else lr, lr_decay=group["lr_decay"],
                  weight_decay=group["weight_decay"], eps=group["eps"],
                  maximize=group["maximize"], eps_inside_sqrt=group["eps_inside_sqrt"],
                  lr_tensor=lr if isinstance(lr, Tensor) else None)
        self._updates += 1
        opt._update_pending = True

    # The optimizer state travels in the module's state_dict (as its extra state).
    def get_extra_state(self):
        return {"optimizer": self.optimizer.state_dict()}

    def set_extra_state(self, state) -> None:
        self.optimizer.load_state_dict(state["optimizer"])

    @classmethod
    def from_embedding_bags(cls, bags: Sequence[nn.EmbeddingBag],
                            optimizer_state_dict: Optional[dict] = None,
                            optimizer: str = "adagrad", **options) -> "FusedEmbeddingBags":
        """A module with copies of these tables' weights, and, from ``optimizer_state_dict`` (a
        FusedAdagrad or torch.optim.Adagrad state dict, RowWiseAdagrad's for "rowwise", over
        exactly these tables' weights in this order), their Adagrad state and hyperparameters.
        The mode, padding_idx and include_last_offset come from the bags; other options (``lr``,
        ...) from ``options`` unless the state dict gives them."""
        bags = list(bags)
        if not bags:
            raise ValueError("from_embedding_bags: no tables")
        first = bags[0]
        for t, bag in enumerate(bags):
            if not isinstance(bag, nn.EmbeddingBag):
                raise TypeError(f"table {t}: expected an nn.EmbeddingBag, got {type(bag).__name__}")
            if (bag.mode, bag.include_last_offset) != (first.mode, first.include_last_offset):
                raise ValueError(f"table {t}: mode and include_last_offset must be the same for "
                                 "all tables")
        def own_copy(w):  # on 2 MiB pages, as the tables the module creates
            return _on_huge_pages(torch.empty(w.shape, dtype=w.dtype, device=w.device)).copy_(w)

        module = cls([tuple(b.weight.shape) for b in bags], mode=first.mode, optimizer=optimizer,
                     padding_idx=[b.padding_idx for b in bags],
                     include_last_offset=first.include_last_offset,
                     _weights=[own_copy(b.weight.detach()) for b in bags], **options)
        if optimizer_state_dict is not None:
            # A copy: torch's load_state_dict keeps the given tensors, which the caller still has.
            module.optimizer.load_state_dict(copy.deepcopy(optimizer_state_dict))
        return module

    def to_embedding_bags(self, sparse: bool = True) -> Tuple[List[nn.EmbeddingBag], dict]:
        """The tables as ``nn.EmbeddingBag`` modules (copies) and a state dict that
        FusedAdagrad (RowWiseAdagrad for "rowwise") over their weights, in order, loads:
        ``opt = FusedAdagrad([b.weight for b in bags]); opt.load_state_dict(state)``."""
        bags = []
        for (rows, dim), w, pad in zip(self.tables, self.weights, self._padding_idx):
            bag = nn.EmbeddingBag(rows, dim, mode=self.mode, sparse=sparse,
                                  include_last_offset=self.include_last_offset,
                                  padding_idx=None if pad < 0 else pad,
                                  dtype=w.dtype, device=w.device)
            with torch.no_grad():
                bag.weight.copy_(w)
            bags.append(bag)
        return bags, copy.deepcopy(self.optimizer.state_dict())

    def extra_repr(self) -> str:
        return (f"tables={self.tables}, mode={self.mode!r}, optimizer={self.optimizer_name!r}, "
                f"include_last_offset={self.include_last_offset}")

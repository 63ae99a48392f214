"""fused_adagrad.RowWiseAdagrad: one Adagrad accumulator per row, as recommender systems train
their embedding tables (FBGEMM's EXACT_ROWWISE_ADAGRAD)."""
import torch
from torch import Tensor

from .optimizer import _FusedAdagradBase, _dtensor_type, _huge_page_copy, _on_huge_pages


class RowWiseAdagrad(_FusedAdagradBase):
    """Row-wise Adagrad: ``torch.optim.Adagrad``'s arguments, with one accumulator per row of
    dim 0 instead of one per element. For each row ``r`` of a param (``D`` elements per row)::

        g = -grad if maximize else grad
        g = g + weight_decay * p[r]
        sum[r] += mean(g * g)                    # over the row's D elements, in float32
        p[r] -= clr * g / (sqrt(sum[r]) + eps)   # or sqrt(sum[r] + eps) with eps_inside_sqrt

    with ``clr = lr / (1 + (step - 1) * lr_decay)``. This is FBGEMM's ``EXACT_ROWWISE_ADAGRAD``
    (weight decay as its L2 mode) plus torch's ``lr_decay``, tensor ``lr``, ``maximize`` and
    ``initial_accumulator_value``. The state of an (R, D) table shrinks from R * D values to R.

    State per param: ``step`` (as FusedAdagrad) and ``sum`` of shape ``(R,)`` (``()`` for a 0-d
    param), float32 for float32/float16/bfloat16 params and float64 for float64 ones. Sparse
    grads (``nn.Embedding(sparse=True)``) update only the rows they touch, duplicates summed
    first, and weight decay then applies to those rows only. Complex params are not supported.
    A step that raises changes no parameter and no state. ``step_in_backward`` and
    ``share_memory()`` work as in FusedAdagrad.
    """

    _rowwise = True

    @staticmethod
    def _sum_dtype(p: Tensor) -> torch.dtype:
        return torch.float64 if p.dtype == torch.float64 else torch.float32

    def _new_sum(self, p: Tensor, init: float) -> Tensor:
        if torch.is_complex(p):
            raise ValueError("RowWiseAdagrad does not support complex parameters")
        dtensor = _dtensor_type()
        if dtensor is not None and isinstance(p, dtensor):
            return self._new_sharded_sum(p, init)
        sum_ = torch.empty(p.shape[:1], dtype=self._sum_dtype(p), device=p.device)
        return _on_huge_pages(sum_).fill_(init)

    def _new_sharded_sum(self, p: Tensor, init: float) -> Tensor:
        """A DTensor param's row sums: a DTensor on the param's mesh holding, on each rank, the
        sums of the rows of its local shard. Exact only if no row is split between ranks, so
        only sharding along dim 0 (FSDP2's) or replication is accepted."""
        from torch.distributed.tensor import DTensor, Replicate, Shard

        placements = []
        for placement in p.placements:
            if isinstance(placement, Shard) and placement.dim == 0 and p.dim() > 0:
                placements.append(Shard(0))
            elif isinstance(placement, Replicate):
                placements.append(Replicate())
            else:
                raise ValueError(
                    f"RowWiseAdagrad: a DTensor param of shape {tuple(p.shape)} with placements "
                    f"{p.placements} splits its rows between ranks, so no rank sees a whole row "
                    "to average g*g over; shard it along dim 0 (as fully_shard does) or "
                    "replicate it")
        local_rows = p._local_tensor.shape[:1]
        local = torch.full(local_rows, init, dtype=self._sum_dtype(p), device=p._local_tensor.device)
        return DTensor.from_local(local, p.device_mesh, placements, run_check=False,
                                  shape=p.shape[:1], stride=(1,) if p.dim() > 0 else ())

    def load_state_dict(self, state_dict: dict) -> None:
        # torch.optim.Optimizer casts every floating state tensor but `step` to its param's dtype:
        # the float32 row sums of a bfloat16/float16 table would come back rounded to the table's
        # dtype (and then be refused by the step). Keep the saved values, in the sum's own dtype.
        saved = {i: s["sum"] for i, s in state_dict["state"].items()
                 if torch.is_tensor(s.get("sum")) and s["sum"].is_floating_point()}
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        super().load_state_dict(state_dict)  # checks that the groups match ours
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(saved_ids, params):
            if i in saved:
                sum_ = saved[i].to(device=p.device, dtype=self._sum_dtype(p))
                self.state[p]["sum"] = _huge_page_copy(sum_)

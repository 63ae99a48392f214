"""fused_adagrad.RowWiseAdagrad: one Adagrad accumulator per row, as recommender systems train
their embedding tables (FBGEMM's EXACT_ROWWISE_ADAGRAD)."""
import torch
from torch import Tensor

from .optimizer import _FusedAdagradBase


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
    A step that raises changes no parameter and no state.
    """

    _step_op = torch.ops.fused_adagrad.rowwise_adagrad_step_
    _rowwise = True

    def _new_sum(self, p: Tensor, init: float) -> Tensor:
        if torch.is_complex(p):
            raise ValueError("RowWiseAdagrad does not support complex parameters")
        shape = p.shape[:1]
        dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        return torch.full(shape, init, dtype=dtype, device=p.device)

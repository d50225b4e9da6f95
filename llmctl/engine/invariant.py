"""Row-invariant products: a token's linear layers round alike in a one-token step and among several tokens.

On a CPU a bfloat16 product of one row (a decode step of one stream) runs another kernel than a product of
two rows or more (measured with torch 2.13 and oneDNN: with more than 1,024 input features, such as
SmolLM2's MLP down-projection, about 1 output row in 10 differs in its last bit), while every row of a
product of two rows or more is the same whatever the number of rows beside it. A speculative step verifies
k + 1 tokens in one product; a plain step of one stream computes one. So that both give the same tokens,
every one-row product of the served model is computed as two copies of the row, of which the first is
kept (`widen`). float32 products differ with the number of rows on any count (MKL) and are left as they
are; on a GPU nothing is changed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

WIDENED = "_llmctl_widened"  # set on a linear layer whose forward `widen` wrapped
DTYPES = (torch.bfloat16,)  # where products of two rows or more were measured row-invariant


def as_two_rows(x: torch.Tensor, product: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``product(x)`` for a row-wise ``product`` of ``x`` [..., features]; a single row (bfloat16 on a CPU)
    is computed as two copies of itself, the first kept."""
    if x.numel() != x.shape[-1] or x.dtype not in DTYPES or x.device.type != "cpu":
        return product(x)
    row = x.reshape(1, -1)
    out = product(torch.cat([row, row]))[:1]
    return out.reshape(*x.shape[:-1], out.shape[-1])


def widen(model: torch.nn.Module) -> int:
    """Make every linear layer of ``model`` compute a one-row input as two rows (`as_two_rows`); returns how
    many layers it wrapped (0 where the weights are not bfloat16 on a CPU)."""
    wrapped = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, torch.nn.Linear) or getattr(module, WIDENED, False) or weight is None \
                or weight.dtype not in DTYPES or weight.device.type != "cpu":
            continue
        forward = module.forward
        module.forward = lambda x, *args, _forward=forward, **kwargs: as_two_rows(  # type: ignore[method-assign]
            x, lambda rows: _forward(rows, *args, **kwargs))
        setattr(module, WIDENED, True)
        wrapped += 1
    return wrapped

"""Attention Selectivity Index (SPEC §3): from attention statistics to drafter flags per (scale, layer)."""

from __future__ import annotations

import torch

COMBINES = ("sum", "product", "topk", "current")


def asi(current: torch.Tensor, topk: torch.Tensor, combine: str = "sum") -> torch.Tensor:
    """ASI per (scale, layer). ``sum``: attention mass that the current map plus K' history tokens keep;
    ``product``: the paper's typography; ``topk``/``current``: one term alone (ablations). High = refiner."""
    if combine == "sum":
        return current + topk
    if combine == "product":
        return current * topk
    if combine == "topk":
        return topk.clone()
    if combine == "current":
        return current.clone()
    raise ValueError(f"combine={combine!r}: expected one of {COMBINES}")


def standardise(values: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Z-score per scale (row) over layers: (x - mean) / (std + eps). values: (scales, layers)."""
    mean = values.mean(dim=1, keepdim=True)
    std = values.std(dim=1, unbiased=False, keepdim=True)
    return (values - mean) / (std + eps)


def pick_drafters(z: torch.Tensor, scales: list[int], num_drafters: int) -> torch.Tensor:
    """Bool (scales, layers): the ``num_drafters`` lowest Z among the (scale, layer) pairs of ``scales``, ranked
    globally, so the number of drafters may differ per scale. Ties break by (scale, layer) order."""
    pool = z[scales].flatten()
    if not 0 <= num_drafters <= pool.numel():
        raise ValueError(f"num_drafters={num_drafters}: expected 0..{pool.numel()} (pairs in the compressed scales)")
    order = torch.sort(pool, stable=True).indices[:num_drafters]
    chosen = torch.zeros_like(pool, dtype=torch.bool)
    chosen[order] = True
    flags = torch.zeros_like(z, dtype=torch.bool)
    flags[scales] = chosen.view(len(scales), -1)
    return flags

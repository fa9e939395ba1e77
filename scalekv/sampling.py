"""Token sampling shared by the generators."""

from __future__ import annotations

import torch


def sample_top_k_top_p(
    logits: torch.Tensor,
    *,
    top_k: int = 0,
    top_p: float = 0.0,
    generator: torch.Generator | list[torch.Generator] | tuple[torch.Generator, ...] | None = None,
) -> torch.Tensor:
    """Draw one token per position from ``logits`` (B, n, V) after top-k and top-p filtering.

    top-k drops logits strictly below the k-th largest; top-p drops the low tail whose cumulative probability is
    <= 1 - top_p (the largest logit always stays). One ``torch.multinomial`` over the (B*n, V) probabilities is
    drawn from ``generator``, which is what makes seeded runs reproduce the official ones. ``generator`` may also be
    a list of B generators, one per row: row ``b`` then draws its (n, V) multinomial from ``generator[b]`` alone, so
    its tokens do not depend on the other rows. Returns (B, n) int64.
    """
    b, n, v = logits.shape
    logits = logits.clone()
    if 0 < top_k < v:
        kth = logits.topk(top_k, dim=-1, largest=True, sorted=False).values.amin(dim=-1, keepdim=True)
        logits.masked_fill_(logits < kth, float("-inf"))
    if top_p > 0:
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        drop = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        drop[..., -1:] = False
        logits.masked_fill_(drop.scatter(-1, order, drop), float("-inf"))
    if isinstance(generator, (list, tuple)):
        if len(generator) != b:
            raise ValueError(f"{len(generator)} generators for {b} rows of logits; expected one per row")
        probs = logits.softmax(dim=-1)
        rows = [
            torch.multinomial(p, num_samples=1, replacement=True, generator=g)
            for p, g in zip(probs, generator, strict=True)
        ]
        return torch.stack(rows).view(b, n)
    probs = logits.softmax(dim=-1).view(-1, v)
    return torch.multinomial(probs, num_samples=1, replacement=True, generator=generator).view(b, n)

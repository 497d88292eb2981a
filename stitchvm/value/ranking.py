"""Rank statistics in torch: Pearson, Spearman (average ranks for ties), within-group Spearman, Recall@1."""
from __future__ import annotations

import torch


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a 1-D tensor, ties sharing the mean of their ranks (as scipy.stats.rankdata)."""
    x = x.double()
    order = torch.argsort(x, stable=True)
    sorted_x = x[order]
    # group boundaries of equal values in sorted order
    new_group = torch.ones_like(sorted_x, dtype=torch.bool)
    new_group[1:] = sorted_x[1:] != sorted_x[:-1]
    group = torch.cumsum(new_group, 0) - 1
    positions = torch.arange(1, len(x) + 1, dtype=torch.float64)
    sums = torch.zeros(int(group[-1]) + 1, dtype=torch.float64).index_add_(0, group, positions)
    counts = torch.zeros_like(sums).index_add_(0, group, torch.ones_like(positions))
    ranks = torch.empty_like(positions)
    ranks[order] = (sums / counts)[group]
    return ranks


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double().flatten(), y.double().flatten()
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"pearson needs two equally long vectors of length >= 2, got {len(x)} and {len(y)}")
    x, y = x - x.mean(), y - y.mean()
    denom = (x.norm() * y.norm()).item()
    return float("nan") if denom == 0 else (x @ y).item() / denom


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    return pearson(average_ranks(x.flatten()), average_ranks(y.flatten()))


def spearman_within_groups(x: torch.Tensor, y: torch.Tensor, groups: torch.Tensor) -> float:
    """Mean over groups (with >= 2 members and non-constant scores) of the Spearman correlation inside each group."""
    values = []
    for g in torch.unique(groups):
        m = groups == g
        if m.sum() >= 2:
            r = spearman(x[m], y[m])
            if r == r:  # a group whose scores are all equal has no ranking
                values.append(r)
    return float("nan") if not values else sum(values) / len(values)


def recall_at_1(score_matrix: torch.Tensor, labels: torch.Tensor) -> float:
    """(N, K) image-to-text scores and (N,) true prompt indices: the fraction whose best prompt is the true one."""
    return (score_matrix.argmax(1) == labels).double().mean().item()

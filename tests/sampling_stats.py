"""Statistics for the sampling-losslessness tests: empirical total variation and its bound."""

import math

import torch


def tv_bound(draws: int, cells: int, failure: float = 1e-6) -> float:
    """TV(empirical, true) stays below this except with probability `failure`.

    E[TV] <= 0.5 * sqrt((cells - 1) / n) (Cauchy-Schwarz over the cells' binomial spreads), and
    one draw moves TV by at most 1/n, so McDiarmid adds sqrt(ln(1/failure) / (2n)).
    """
    return 0.5 * math.sqrt((cells - 1) / draws) + math.sqrt(math.log(1 / failure) / (2 * draws))


def total_variation(samples: torch.Tensor, p: torch.Tensor) -> float:
    """TV between the empirical distribution of integer `samples` and p (flattened)."""
    counts = torch.bincount(samples.flatten(), minlength=p.numel()).double()
    return 0.5 * (counts / counts.sum() - p.flatten().double()).abs().sum().item()

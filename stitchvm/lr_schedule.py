"""The learning-rate schedule of every trainer here: linear warm-up, then cosine decay to a floor.

The world models decay to 5% of the base rate (the default), the value model's training to 10%."""
from __future__ import annotations

import math
from typing import Callable


def warmup_cosine(n_steps: int, warmup: int, floor: float = 0.05) -> Callable[[int], float]:
    """The LambdaLR factor at `step`: (step + 1) / warmup during warm-up, then cosine from 1 down to `floor`."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        done = (step - warmup) / max(1, n_steps - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, done)))
    return factor

"""The learning-rate schedule every world model trains with: linear warm-up, then cosine decay to 5% of the base."""
from __future__ import annotations

import math
from typing import Callable


def warmup_cosine(n_steps: int, warmup: int) -> Callable[[int], float]:
    """The LambdaLR factor at `step`: (step + 1) / warmup during warm-up, then cosine from 1 down to 0.05."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        done = (step - warmup) / max(1, n_steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, done)))
    return factor

"""What the evaluation stages share: timing models side by side, and matplotlib without a
screen."""

from __future__ import annotations

import statistics
import time

from pydantic import Field

from pipelines.stage import StageConfig
from stages.lazy import lazy

torch = lazy("torch")


def latencies_ms(models: list[torch.nn.Module], x: torch.Tensor, repeats: int,
                 warmup: int = 3) -> list[float]:
    """Median forward latency (ms) of each model on batch ``x``, interleaved."""
    times = [[] for _ in models]
    with torch.inference_mode():
        for i in range(warmup + repeats):
            for model, t in zip(models, times):
                start = time.perf_counter()
                model(x)
                if i >= warmup:
                    t.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(t) for t in times]


class LatencyConfig(StageConfig):
    """How the evaluation stages time student and teacher side by side."""

    repeats: int = Field(20, ge=3)           # timed forward passes per model
    latency_batch_size: int = Field(256, ge=1)
    threads: int = Field(1, ge=1)            # torch threads for both models

    def latencies(self, models: list, x) -> list[float]:
        """``latencies_ms`` with ``threads`` torch threads, restored afterwards."""
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return latencies_ms(models, x, self.repeats)
        finally:
            torch.set_num_threads(before)


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no screen needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt

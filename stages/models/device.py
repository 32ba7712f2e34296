"""Where a stage's torch work runs."""

from __future__ import annotations

from stages.lazy import lazy

torch = lazy("torch")


def device() -> torch.device:
    """The GPU Ray gave this process, else the CPU. Ray sets ``CUDA_VISIBLE_DEVICES`` for a
    task or actor that reserved a GPU (a stage's ``resources.num_gpus``, a GPU actor of Ray
    Data, a ``use_gpu`` Ray Train worker), so a process without one sees no CUDA device."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def alive_nodes() -> int:
    """The nodes of the Ray cluster this process is connected to (1 without Ray)."""
    import ray
    return sum(1 for n in ray.nodes() if n.get("Alive")) if ray.is_initialized() else 1

"""``strategy: fsdp``: a network sharded across the Ray Train workers with FSDP2
(``torch.distributed.fsdp.fully_shard``; Zhao et al. 2023, "PyTorch FSDP: Experiences on
Scaling Fully Sharded Data Parallel", arXiv 2304.11277).

Each worker holds 1/world of every parameter, gradient and optimiser state (DTensors
sharded on dim 0). A forward all-gathers one unit's parameters at a time and frees them
after; a backward reduce-scatters the gradients, so each worker's step is the mean
gradient over the global batch, as with DDP. The units are the model's repeated blocks:
a ``transformers`` model names them in ``_no_split_modules`` (``LlamaDecoderLayer``,
``Qwen2DecoderLayer``, ``GPT2Block``); the root holds the rest (embeddings, the head).

Checkpoints hold whole tensors (``full``), as DDP's do: one format whatever the strategy,
so an FSDP run resumes with any number of workers, and the student is saved as usual.
"""

from __future__ import annotations

from stages.lazy import lazy

torch = lazy("torch")


def shard(net, device):
    """``net`` on ``device``, its blocks and then its root wrapped by ``fully_shard`` (in
    place: the module stays the same object, its parameters become DTensor shards)."""
    from torch.distributed.fsdp import fully_shard
    net = net.to(device)
    blocks = set(getattr(net, "_no_split_modules", None) or ())
    for module in list(net.modules()):
        if module is not net and type(module).__name__ in blocks:
            fully_shard(module)
    fully_shard(net)
    return net


def full(state):
    """A (nested) state dict with every DTensor gathered whole, on the CPU; a collective:
    every worker calls it, in the same order."""
    from torch.distributed.tensor import DTensor
    from torch.utils._pytree import tree_map_only
    return tree_map_only(DTensor, lambda t: t.full_tensor().cpu(), state)


def restore_optimizer(optimizer, state: dict) -> dict:
    """A checkpoint's whole optimiser state (``full``) as shards like the optimiser's own
    parameters: each state tensor shaped as its parameter is cut as that parameter is
    (every worker read the whole checkpoint, so no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    params = [p for g in optimizer.param_groups for p in g["params"]]
    per_param = {}
    for index, values in state["state"].items():
        p = params[int(index)]
        per_param[index] = {
            k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements,
                                 src_data_rank=None)
            if isinstance(p, DTensor) and torch.is_tensor(v) and v.shape == p.shape else v
            for k, v in values.items()}
    return {**state, "state": per_param}


def held_elements(nets: dict) -> int:
    """The parameter elements this worker holds: all of them under DDP, about 1/world of
    them under FSDP (reported per epoch as ``params_held``)."""
    return sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel()
               for net in nets.values() for p in net.parameters())


def sharded(net) -> bool:
    """Whether ``net`` is sharded across more than one worker (its forward passes are
    collectives: every worker must make as many, e.g. ``generate(synced_gpus=True)``)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    return isinstance(net, FSDPModule) and dist.is_initialized() and \
        dist.get_world_size() > 1

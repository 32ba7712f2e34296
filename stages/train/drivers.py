"""The two drivers of the training harness (``stages.train.harness``): Ray Train workers
(the one ``TorchTrainer`` of the catalog) and the stage's own process. Each gives the loop
a session: its rank and world size, its device, how a network is prepared (DDP on Ray
Train), the last checkpoint, and how an epoch's checkpoint and metrics are kept."""

from __future__ import annotations

import json
import os
import tempfile

from pipelines.errors import UserError
from stages.lazy import lazy
from stages.models.device import device as local_device
from stages.models.device import task_torch_threads
from stages.train.harness import Trained, train_loop

torch = lazy("torch")

STATE_FILE, CONFIG_FILE = "state.pt", "config.json"

# the in-process driver's checkpoint, in the stage's work files
CHECKPOINT, CONFIG = f"harness/{STATE_FILE}", f"harness/{CONFIG_FILE}"


# -- Ray Train ----------------------------------------------------------------------------
class _RayTrainSession:
    def __init__(self, find_unused: bool, strategy: str = "ddp"):
        import ray.train
        import ray.train.torch
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.find_unused, self.strategy = find_unused, strategy
        self.shard = None

    def load(self) -> dict | None:
        import ray.train
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as d:
            return load_checkpoint(d)

    def prepare(self, net):
        import ray.train.torch
        if not any(p.requires_grad for p in net.parameters()):
            return net.to(self.device)
        if self.strategy == "fsdp":
            from stages.train.sharding import shard
            return shard(net, self.device)
        # transformers backbones have parameters a loss may leave unused (BERT's pooler)
        return ray.train.torch.prepare_model(net, parallel_strategy_kwargs={
            "find_unused_parameters": self.find_unused})

    def full(self, state: dict) -> dict:
        """A network's or optimiser's state with whole tensors (every worker calls it)."""
        if self.strategy != "fsdp":
            return state
        from stages.train.sharding import full
        return full(state)

    def restore(self, optimizer, state: dict) -> dict:
        """A checkpoint's optimiser state, cut as the optimiser's parameters are."""
        if self.strategy != "fsdp":
            return state
        from stages.train.sharding import restore_optimizer
        return restore_optimizer(optimizer, state)

    def save(self, saved: dict | None, metrics: dict, config: dict) -> None:
        import ray.train
        with temp_checkpoint_dir() as d:  # every rank reports; rank 0 with the checkpoint
            checkpoint = None
            if saved is not None:
                save_checkpoint(d, saved, config)
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)


def _worker(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    session = _RayTrainSession(config["find_unused"], config["run"].cfg.strategy)
    if config["run"].rows.streamed:
        session.shard = ray.train.get_dataset_shard("train")
    train_loop(config["run"], config["method"], session)


def run_ray_train(run, method) -> Trained:
    """``TorchTrainer`` with ``num_workers`` workers (a GPU each when the cluster has GPUs
    and ``use_gpu``), named after the artifact key so a re-run resumes."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig
    from ray.train import ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    cfg, ctx, rows = run.cfg, run.ctx, run.rows
    use_gpu = ctx.num_gpus_available > 0 and cfg.use_gpu
    stream = rows.stream
    datasets = {"train": stream} if stream is not None else {}
    payload = {"run": run, "method": method,
               "find_unused": getattr(method, "find_unused_parameters", False)}
    if stream is not None:  # the dataset goes to the trainer, not through the config
        from dataclasses import replace
        payload["run"] = replace(run, rows=replace(rows, stream=_Streamed()))
    trainer = TorchTrainer(
        _worker, train_loop_config=payload,
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=use_gpu,
            resources_per_worker={"CPU": 1, **({"GPU": 1} if use_gpu else {})}),
        run_config=RunConfig(
            name=f"{ctx.kind}-{ctx.key[:16]}", storage_path=ctx.train_storage,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets=datasets or None, dataset_config=DataConfig(datasets_to_split=list(datasets)))
    try:
        result = trainer.fit()
    except TrainingFailedError as e:
        raise _original_error(e) from e
    with result.checkpoint.as_directory() as d:
        state = load_checkpoint(d)
    # a run resumed after its last epoch reports nothing new: its checkpoint's metrics
    return Trained(state=state, metrics=dict(result.metrics or state.get("metrics", {})))


class _Streamed:
    """Stands for the stream in a worker's copy of the rows: the worker reads its shard."""


def _original_error(error: Exception) -> Exception:
    """The worker's own exception (the FloatingPointError naming the step, a UserError)
    from the error Ray Train wraps it in, so the caller of the stage sees that message."""
    for failure in getattr(error, "worker_failures", {}).values():
        if isinstance(failure, (FloatingPointError, UserError)):
            return failure
    return error


# -- in-process ---------------------------------------------------------------------------
class _LocalSession:
    rank, world, shard = 0, 1, None

    def __init__(self, ctx):
        self.device = local_device()  # the GPU of the stage's resources.num_gpus, if any
        self.files = ctx.work_files
        self.last: dict | None = None
        self.metrics: dict = {}

    def load(self) -> dict | None:
        path = self.files.get(CHECKPOINT)
        return load_checkpoint(os.path.dirname(path)) if path else None

    def prepare(self, net):
        return net.to(self.device)

    def full(self, state: dict) -> dict:
        return state

    def restore(self, optimizer, state: dict) -> dict:
        return state

    def save(self, saved: dict, metrics: dict, config: dict) -> None:
        """The config, then the state, each put whole (the state last: it is what a
        resume looks for)."""
        import json
        import torch
        tmp = self.files.new_file(CONFIG)
        with open(tmp, "w") as f:
            json.dump(config, f, indent=2)
        self.files.put(CONFIG, tmp)
        tmp = self.files.new_file(CHECKPOINT)
        torch.save(saved, tmp)
        self.files.put(CHECKPOINT, tmp)
        self.last, self.metrics = saved, metrics


AUTO_IN_PROCESS_ROW_PASSES = 200_000  # rows x epochs: below it Ray Train's start-up dominates


def workers_for(cfg, rows, gpus: float, nodes: int = 1) -> int:
    """The Ray Train workers ``fit`` starts (0: the loop in the stage's own process).
    ``num_workers: auto`` trains in the stage's process when the rows are held (not
    streamed), the work is small (rows x epochs at most ``AUTO_IN_PROCESS_ROW_PASSES``),
    Ray has one node (a laptop: on a cluster the coordinator, which reserves no CPU, may sit
    on the head), no GPU would be used (the stage's task holds none), no restart is asked
    for and no sharding (``strategy: fsdp`` needs Ray Train's process group); else one
    worker. Either way one process trains: the same maths (keyed as 1)."""
    if cfg.num_workers != "auto":
        return cfg.num_workers
    count = rows.num_rows or (len(next(iter(rows.tensors.values()))) if rows.tensors else 0)
    small = not rows.streamed and count * cfg.epochs <= AUTO_IN_PROCESS_ROW_PASSES
    alone = nodes == 1 and not (gpus > 0 and cfg.use_gpu) and cfg.max_failures == 0 \
        and cfg.strategy == "ddp"
    return 0 if small and alone else 1


def run_in_process(run, method) -> Trained:
    """The loop in this process, with ``loop_threads`` torch threads in a Ray task
    (reported as ``train_threads``); its checkpoint is a work file of the stage, so a run
    of the same key that was killed resumes from its last epoch."""
    session = _LocalSession(run.ctx)
    with task_torch_threads() as threads:
        train_loop(run, method, session)
    state = session.last if session.last is not None else session.load()
    metrics = dict(session.metrics or state.get("metrics", {}))
    return Trained(state=state, metrics={**metrics, "train_threads": threads})


# -- checkpoint files ----------------------------------------------------------------------
def save_checkpoint(directory: str, saved: dict, config: dict) -> None:
    """The state and the resolved config, as a checkpoint directory holds them."""
    torch.save(saved, os.path.join(directory, STATE_FILE))
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)


def load_checkpoint(directory: str) -> dict:
    return torch.load(os.path.join(directory, STATE_FILE), map_location="cpu",
                      weights_only=True)


def temp_checkpoint_dir():
    return tempfile.TemporaryDirectory(prefix="distill-ckpt-")

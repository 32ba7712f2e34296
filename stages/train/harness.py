"""The one training harness: every student and teacher the catalog trains goes through
``fit``. A method says what it trains (``TrainMethod``: its networks, optimisers, one
step's losses, what else its checkpoint holds); the harness does the rest, in the numbered
steps of ``train_loop`` below:

1. device and seeds (``seed + rank`` for torch, a per-rank generator for the method);
2. the method's networks, their EMA copies, a resume from the last checkpoint, DDP
   wrapping or FSDP sharding (``strategy``, ``stages.train.sharding``), the optimisers
   (restored too);
3. the rows: a global ``batch_size`` split across the workers, one global permutation per
   epoch (``seed + epoch``, the same on every worker; worker r takes rows ``r::world`` of
   each global batch, as torch's ``DistributedSampler`` does, a last partial batch
   dropped), or, for tables too large to hold, Ray Data shards streamed with a shuffle
   buffer (``batch_size / world`` each). Held rows train the same model whatever the
   number of workers: ``batch_size`` is a multiple of ``num_workers``, DDP averages the
   workers' gradients, so each step's is the mean over the global batch;
4. epochs of steps: the learning rates (the optimisers' own times the method's
   ``lr_factor`` of the run's progress), the method's losses, a non-finite loss raises
   naming epoch and step, one backward and update per optimiser (gradients clipped), the
   EMA updates;
5. every epoch: metrics to the run (so Tune's schedulers can stop a trial early), a
   checkpoint of whole tensors with the resolved config (rank 0), the elapsed time kept in
   it so a ``max_minutes`` budget survives a resume. A budget either stops the run early
   (``max_minutes``: the result depends on the machine's speed) or, as ``deadline_minutes``,
   fails it with a clear error once spent, the checkpoint kept (a run of fixed length:
   the result never depends on the machine; a re-run with a larger budget resumes).

Two drivers run the loop: Ray Train (``num_workers`` >= 1, a ``TorchTrainer`` built here
and nowhere else; checkpoints in ``ctx.train_storage``, restarts under ``max_failures``)
and in-process (``num_workers: 0``, for small work; checkpoints in the stage's work files,
so a killed stage resumes from its last epoch when it runs again). Either way the run is
keyed by the artifact key: a re-run of the same key resumes.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import Field, model_validator

from pipelines.errors import UserError
from pipelines.stage import StageConfig
from stages.lazy import lazy
from stages.train.rows import Rows
from stages.train.sharding import held_elements

torch = lazy("torch")


class TrainConfig(StageConfig):
    """The fields of every trained model: the schedule and how the work runs.

    ``num_workers`` and ``max_failures`` are execution settings (not in the cache key):
    the loop keeps the maths whatever the number of workers (a global batch split evenly,
    one global permutation per epoch, gradients averaged so every step is the mean over
    the global batch). A config whose maths does depend on it says so in
    ``keyed_execution``: noise drawn on each worker, per-worker BatchNorm statistics or
    dropout masks, rows streamed and shuffled per worker."""

    execution = ("num_workers", "max_failures", "strategy")

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)       # global: split across the workers
    grad_clip: float | None = Field(None, gt=0)  # max gradient norm per optimiser
    # Ray Train workers; 0: in the stage's process; auto: ``workers_for`` decides (0 or 1)
    num_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = 1
    use_gpu: bool = True                    # used only when the cluster has GPUs
    max_failures: int = Field(0, ge=-1)     # Ray Train worker-group restarts
    # how the workers hold a network: ddp (a replica each, gradients all-reduced) or fsdp
    # (FSDP2 ``fully_shard``: parameters, gradients and optimiser state sharded across the
    # workers, for students larger than one device; ``stages.train.sharding``). The same
    # maths (the mean gradient over the global batch), so not in the cache key
    strategy: Literal["ddp", "fsdp"] = "ddp"

    def split_execution(self) -> tuple[dict, dict, dict[str, str]]:
        keyed, execution, kept = super().split_execution()
        if keyed.get("num_workers") == "auto":  # 0 or 1: one process either way, keyed as 1
            keyed["num_workers"] = 1
        return keyed, execution, kept

    @model_validator(mode="after")
    def _an_even_split(self):
        if self.num_workers != "auto" and self.num_workers and \
                self.batch_size % self.num_workers:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of "
                             f"num_workers ({self.num_workers}): the global batch is split "
                             f"evenly across the workers; allowed: "
                             f"{self._multiples()}")
        return self

    @model_validator(mode="after")
    def _sharded_on_workers(self):
        if self.strategy == "fsdp" and self.num_workers == 0:
            raise ValueError("strategy fsdp shards the networks across Ray Train workers: "
                             "num_workers must be at least 1 (or auto, which then starts "
                             "1), not 0 (the stage's process)")
        return self

    def _multiples(self) -> str:
        w, b = self.num_workers, self.batch_size
        low, high = max(w, b - b % w), b - b % w + w
        return f"e.g. {low} or {high}" if low != high else f"e.g. {high}"


class AdamWConfig(TrainConfig):
    """A trained model with one AdamW optimiser (Loshchilov & Hutter 2019)."""

    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)

    def adamw(self, net: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)


@dataclass
class Loss:
    """One step of a method: the loss each named optimiser minimises now (a method with
    alternating updates returns only the ones it steps), and sums over the batch of
    what the epoch reports as ``train_<name>`` (divided by the rows of the steps that
    returned that sum)."""

    losses: dict[str, torch.Tensor]
    rows: int
    sums: dict[str, float] = field(default_factory=dict)


class TrainMethod:
    """What a trained model plugs into the harness (pickled to the workers)."""

    columns: dict[str, torch.dtype] = {}   # the row columns a batch holds
    ema: dict[str, float] = {}             # network -> EMA decay (an EMA copy is kept)

    def setup(self, device: torch.device) -> dict[str, torch.nn.Module]:
        """Load what the method needs (a frozen teacher) and build its trainable
        networks, on ``device``."""
        raise NotImplementedError

    def optimizers(self, nets: dict) -> dict[str, torch.optim.Optimizer]:
        """Optimisers over the (DDP-wrapped) networks; a loss is named after one."""
        raise NotImplementedError

    def loss(self, nets: dict, emas: dict, batch: dict, gen: torch.Generator) -> Loss:
        raise NotImplementedError

    def begin(self, total_steps: int) -> None:
        """Called once the rows are known: the run's length in optimisation steps."""

    def begin_epoch(self, epoch: int, nets: dict) -> None:
        pass

    def lr_factor(self, progress: float) -> float:
        """The learning rate's factor at ``progress`` in [0, 1] of the run (steps or
        ``max_minutes``, whichever is further)."""
        return 1.0

    def epoch_metrics(self, nets: dict) -> dict[str, float]:
        """Further metrics after each epoch (validation scores, schedule values)."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass
class Trained:
    state: dict          # the last checkpoint: nets, emas, optimizers, method, epoch, ...
    metrics: dict        # the last epoch's metrics


@dataclass
class _Run:
    """What the loop needs besides the method: the settings and the stage's context."""

    cfg: TrainConfig
    ctx: object
    rows: Rows
    max_minutes: float | None = None
    deadline_minutes: float | None = None


class BudgetSpent(UserError):
    """A fixed-length run ran past its time budget (``deadline_minutes``)."""


def check_deadline(elapsed_s: float, deadline_minutes: float | None, epoch: int,
                   epochs: int, where: str) -> None:
    """Fail, never shorten: ``deadline_minutes`` spent before ``epoch`` (of ``epochs``)."""
    if deadline_minutes and elapsed_s > 60 * deadline_minutes:
        raise BudgetSpent(
            f"{where}: max_minutes {deadline_minutes:g} spent after {epoch} of {epochs} "
            f"epochs ({elapsed_s / 60:.1f} minutes); the run trains a fixed number of epochs "
            "and is never cut short. Its checkpoint is kept: run again with a larger "
            "max_minutes (an execution setting, not in the cache key) to resume, or lower "
            "epochs")


def train_loop(run: _Run, method: TrainMethod, session) -> None:
    cfg, ctx, rank, world = run.cfg, run.ctx, session.rank, session.world
    device = session.device                                         # 1. device, seeds
    torch.manual_seed(ctx.seed + rank)
    gen = torch.Generator().manual_seed(ctx.seed * 7919 + rank)
    nets = method.setup(device)                                     # 2. networks, resume
    state = session.load()
    start, elapsed = 0, 0.0
    if state:
        for n, m in nets.items():
            m.load_state_dict(state["nets"][n])
        method.load_state_dict(state["method"])
        start, elapsed = state["epoch"] + 1, state.get("elapsed", 0.0)
        if world == 1:  # the generator goes on where it stopped; with several workers
            gen.set_state(state["rng"])  # only rank 0's was saved: a fresh one per rank
        else:
            gen.manual_seed((ctx.seed * 7919 + rank) * 1_000_003 + start)
    wrapped = {n: session.prepare(net) for n, net in nets.items()}  # DDP or FSDP
    emas = {n: copy.deepcopy(nets[n]).eval().requires_grad_(False) for n in method.ema}
    if state:
        for n, m in emas.items():
            m.load_state_dict(state["emas"][n])
    opts = method.optimizers(wrapped)
    base_lr = {n: [g["lr"] for g in o.param_groups] for n, o in opts.items()}
    if state:
        for n, o in opts.items():
            o.load_state_dict(session.restore(o, state["optimizers"][n]))  # FSDP: sharded
    data = run.rows.for_worker(rank, world, cfg.batch_size, device, session.shard)  # 3.
    total_steps = cfg.epochs * data.steps_per_epoch
    method.begin(total_steps)
    step_count, began = start * data.steps_per_epoch, time.monotonic() - elapsed

    for epoch in range(start, cfg.epochs):                          # 4. epochs
        if run.max_minutes and over_workers(
                time.monotonic() - began, device) > 60 * run.max_minutes:
            break  # the budget is spent (also by a run resumed after it): every worker
            # stops before the same epoch
        check_deadline(over_workers(time.monotonic() - began, device), run.deadline_minutes,
                       epoch, cfg.epochs, f"stage '{ctx.name}' ({ctx.kind})")
        method.begin_epoch(epoch, nets)
        for net in wrapped.values():
            net.train()
        # the share of max_minutes used, the same on every worker (their learning rates
        # must not drift apart), taken once an epoch
        used = over_workers((time.monotonic() - began) / (60 * run.max_minutes), device) \
            if run.max_minutes else 0.0
        totals, counts, sums, sum_counts, seen = {}, {}, {}, {}, 0
        for step, (batch, weight) in enumerate(data.batches(ctx.seed + epoch)):
            factor = method.lr_factor(min(max(step_count / max(total_steps, 1), used), 1.0))
            for n, o in opts.items():
                for g, lr in zip(o.param_groups, base_lr[n]):
                    g["lr"] = lr * factor
            out = method.loss(wrapped, emas, batch, gen)
            for name, loss in out.losses.items():
                value = loss.item()
                if not math.isfinite(value):
                    raise FloatingPointError(f"training loss{'' if len(opts) == 1 else ' ' + name}"
                                             f" is {value} at epoch {epoch} step {step}; "
                                             "lower the learning rate")
                opts[name].zero_grad(set_to_none=True)
                (loss * weight if weight != 1.0 else loss).backward()
                if cfg.grad_clip:
                    params = [p for g in opts[name].param_groups for p in g["params"]]
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opts[name].step()
                totals[name] = totals.get(name, 0.0) + value * out.rows
                counts[name] = counts.get(name, 0) + out.rows
            with torch.no_grad():
                for n, e in emas.items():
                    for pe, p in zip(e.parameters(), nets[n].parameters()):
                        pe.lerp_(p, 1 - method.ema[n])
            for k, v in out.sums.items():
                sums[k] = sums.get(k, 0.0) + float(v)
                sum_counts[k] = sum_counts.get(k, 0) + out.rows
            seen, step_count = seen + out.rows, step_count + 1
        metrics = _epoch_metrics(totals, sums, seen, list(opts), counts, sum_counts)
        metrics.update(start_epoch=start, params_held=held_elements(nets),
                       **method.epoch_metrics(nets))
        elapsed = time.monotonic() - began
        saved = None                                                # 5. checkpoint, report
        # whole tensors (FSDP gathers its shards, on every worker): one checkpoint format
        full = {n: session.full(m.state_dict()) for n, m in nets.items()}
        full_opts = {n: session.full(o.state_dict()) for n, o in opts.items()}
        if rank == 0:
            saved = {"nets": full, "emas": {n: m.state_dict() for n, m in emas.items()},
                     "optimizers": full_opts,
                     "method": method.state_dict(), "epoch": epoch, "elapsed": elapsed,
                     "rng": gen.get_state(), "metrics": metrics}
        session.save(saved, metrics, cfg.model_dump(mode="json"))
        if rank == 0:
            ctx.log_metrics(metrics, step=epoch)
            ctx.progress(epoch + 1, cfg.epochs, "epochs")


def over_workers(value, device=None, op: str = "max") -> float:
    """A scalar (a float or a 0-d tensor) reduced over the Ray Train workers, ``max`` or
    ``mean``; itself with one worker. Every worker must call it equally often."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return float(value)
    t = torch.as_tensor(value, dtype=torch.float64, device=device).clone().reshape(1)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return float(t.item()) / (1 if op == "max" else dist.get_world_size())


def _epoch_metrics(totals: dict, sums: dict, seen: int, names: list[str],
                   counts: dict | None = None, sum_counts: dict | None = None) -> dict:
    """``train_loss`` (the first optimiser's), ``train_loss_<name>`` for the others, each
    per row of the steps that stepped it (alternating methods), and ``train_<sum>`` for
    each sum, per row of the steps that returned it (``dmd-distill``'s generator terms
    come only on its turns); rows not counted: every row seen."""
    counts, sum_counts = counts or {}, sum_counts or {}
    per = lambda n: totals.get(n, 0.0) / max(counts.get(n, seen), 1)  # noqa: E731
    metrics = {"train_loss": per(names[0])}
    metrics.update({f"train_loss_{n}": per(n) for n in names[1:]})
    metrics.update({f"train_{k}": v / max(sum_counts.get(k, seen), 1)
                    for k, v in sums.items()})
    return metrics


def fit(ctx, method: TrainMethod, rows: Rows, cfg: TrainConfig, max_minutes=None,
        deadline_minutes=None) -> Trained:
    """Train ``method`` on ``rows`` with the driver ``drivers.workers_for`` picks; returns
    the last checkpoint (a re-run of the same artifact key resumes from it), its metrics
    with ``train_workers`` (0: in the stage's process). ``max_minutes`` stops early;
    ``deadline_minutes`` fails (``BudgetSpent``) instead."""
    from pipelines.context import alive_nodes
    from stages.train.drivers import run_in_process, run_ray_train, workers_for
    if cfg.strategy == "fsdp" and method.ema:
        raise UserError(f"stage '{ctx.name}' ({ctx.kind}) field 'strategy': fsdp is for "
                        f"methods without EMA copies (this one keeps {sorted(method.ema)}); "
                        f"allowed: ddp")
    nodes = alive_nodes() if cfg.num_workers == "auto" else 1
    workers = workers_for(cfg, rows, ctx.num_gpus_available, nodes)
    run = _Run(cfg=cfg.model_copy(update={"num_workers": workers}), ctx=ctx, rows=rows,
               max_minutes=max_minutes, deadline_minutes=deadline_minutes)
    trained = run_in_process(run, method) if workers == 0 else run_ray_train(run, method)
    trained.metrics["train_workers"] = workers
    return trained

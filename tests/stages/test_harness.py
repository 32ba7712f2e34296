"""The training harness (``stages.train.harness``) on a toy method: the global batch and
its permutation, resume with the resolved config, the non-finite loss, several optimisers,
EMA, and the same weights from 1 and from 2 Ray Train workers."""

import json

import pytest
import torch
from torch import nn

from pipelines import UserError
from pipelines.context import StageContext
from stages.train.drivers import CHECKPOINT, CONFIG
from stages.train.harness import AdamWConfig, Loss, TrainMethod, fit
from stages.train.rows import Rows

COLUMNS = {"x": torch.float32, "y": torch.float32}


def toy_rows(n: int = 32) -> Rows:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g)
    return Rows(COLUMNS, tensors={"x": x, "y": x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3})


class Regression(TrainMethod):
    """Least squares on a linear model; ``bad_at`` makes the loss NaN at that step."""

    columns = COLUMNS

    def __init__(self, cfg, bad_at: int | None = None, ema: float | None = None):
        self.cfg, self.bad_at, self.steps = cfg, bad_at, 0
        self.ema = {"net": ema} if ema is not None else {}

    def setup(self, device):
        return {"net": nn.Linear(3, 1).to(device)}

    def optimizers(self, nets):
        return {"net": torch.optim.SGD(nets["net"].parameters(), lr=self.cfg.lr)}

    def loss(self, nets, emas, batch, gen):
        loss = ((nets["net"](batch["x"]).squeeze(1) - batch["y"]) ** 2).mean()
        if self.steps == self.bad_at:
            loss = loss * float("nan")
        self.steps += 1
        return Loss({"net": loss}, len(batch["y"]), {"seen": len(batch["y"])})

    def state_dict(self):
        return {"steps": torch.tensor(self.steps)}

    def load_state_dict(self, state):
        self.steps = int(state["steps"])


def config(**kw):
    return AdamWConfig(**{"epochs": 3, "batch_size": 8, "lr": 0.05, "num_workers": 0, **kw})


def test_global_batches_split_one_permutation_across_workers():
    rows = toy_rows(30)  # 30 rows, global batch 8: 3 full batches, the partial one dropped
    one = rows.for_worker(0, 1, 8, "cpu")
    two = [rows.for_worker(r, 2, 8, "cpu") for r in (0, 1)]
    assert one.steps_per_epoch == two[0].steps_per_epoch == two[1].steps_per_epoch == 3
    for seed in (0, 1):
        whole = [b for b, _ in one.batches(seed)]
        parts = [[b for b, _ in w.batches(seed)] for w in two]
        for batch, a, b in zip(whole, *parts):
            assert len(a["x"]) + len(b["x"]) == len(batch["x"])  # the global batch, split
            merged = torch.cat([a["x"], b["x"]])
            assert sorted(map(tuple, merged.tolist())) == sorted(map(tuple, batch["x"].tolist()))
    first, second = (torch.cat([b["x"] for b, _ in one.batches(s)]) for s in (0, 1))
    assert not torch.equal(first, second)  # a fresh permutation every epoch
    every = set(map(tuple, rows.tensors["x"].tolist()))
    for seen in (first, second):  # 24 distinct rows of the 30 each epoch
        assert len(set(map(tuple, seen.tolist())) & every) == 24


def test_in_process_fit_checkpoints_with_the_config_and_resumes(tmp_path):
    ctx = StageContext.for_testing(tmp_path, name="toy", kind="toy")
    first = fit(ctx, Regression(config()), toy_rows(), config())
    assert first.state["epoch"] == 2 and first.metrics["start_epoch"] == 0
    assert first.metrics["train_seen"] == 1.0  # sums per row
    with open(ctx.work_files.get(CONFIG)) as f:
        assert json.load(f) == config().model_dump(mode="json")  # the resolved config
    saved = torch.load(ctx.work_files.get(CHECKPOINT), weights_only=True)
    assert saved["method"]["steps"] == 12  # 3 epochs x 4 batches, the method's own state

    more = config(epochs=5)
    second = fit(ctx, Regression(more), toy_rows(), more)
    assert second.metrics["start_epoch"] == 3 and second.state["epoch"] == 4
    assert int(second.state["method"]["steps"]) == 20  # resumed, not restarted
    assert second.metrics["train_loss"] < first.metrics["train_loss"]


def test_a_run_resumed_after_its_last_epoch_keeps_its_metrics(tmp_path):
    ctx = StageContext.for_testing(tmp_path, name="toy", kind="toy")
    first = fit(ctx, Regression(config()), toy_rows(), config())
    again = fit(ctx, Regression(config()), toy_rows(), config())  # nothing left to train
    assert again.state["epoch"] == 2 and again.metrics == first.metrics


def test_fewer_rows_than_a_batch_make_one_weighted_batch():
    rows = toy_rows(7)  # one batch of all 7 rows: 4 + 3 across two workers
    parts = [list(rows.for_worker(r, 2, 8, "cpu").batches(0)) for r in (0, 1)]
    (a, wa), (b, wb) = parts[0][0], parts[1][0]
    assert (len(a["x"]), len(b["x"])) == (4, 3)
    assert wa == pytest.approx(8 / 7) and wb == pytest.approx(6 / 7)  # mean of the 7 rows
    with pytest.raises(UserError, match="7 training rows cannot be split across 8 workers"):
        rows.for_worker(0, 8, 8, "cpu")


def test_a_global_batch_not_divisible_by_the_workers_is_refused():
    from pydantic import ValidationError
    with pytest.raises(ValidationError, match=r"batch_size \(6\) must be a multiple of "
                                              r"num_workers \(4\).*e\.g\. 4 or 8"):
        config(batch_size=6, num_workers=4)


def test_num_workers_is_an_execution_setting():
    keyed, execution, kept = config(num_workers=2).split_execution()
    assert "num_workers" not in keyed and "strategy" not in keyed
    assert execution == {"num_workers": 2, "max_failures": 0, "strategy": "ddp"}
    assert kept == {}


def test_a_non_finite_loss_names_its_epoch_and_step(tmp_path):
    ctx = StageContext.for_testing(tmp_path, name="toy", kind="toy")
    with pytest.raises(FloatingPointError, match=r"at epoch 1 step 1\b"):
        fit(ctx, Regression(config(), bad_at=5), toy_rows(), config())  # 4 steps per epoch


def test_ema_follows_the_network(tmp_path):
    ctx = StageContext.for_testing(tmp_path, name="toy", kind="toy")
    trained = fit(ctx, Regression(config(), ema=0.5), toy_rows(), config())
    net, ema = trained.state["nets"]["net"], trained.state["emas"]["net"]
    assert not torch.equal(net["weight"], ema["weight"])
    assert torch.allclose(net["weight"], ema["weight"], atol=0.5)


class TwoNets(TrainMethod):
    """Two networks, two optimisers; the second is stepped every other step only."""

    columns = COLUMNS

    def setup(self, device):
        self.calls = 0
        return {"a": nn.Linear(3, 1), "b": nn.Linear(3, 1)}

    def optimizers(self, nets):
        return {n: torch.optim.Adam(m.parameters(), lr=0.01) for n, m in nets.items()}

    def loss(self, nets, emas, batch, gen):
        self.calls += 1
        losses = {"a": (nets["a"](batch["x"]).squeeze(1) - batch["y"]).pow(2).mean()}
        if self.calls % 2 == 0:
            losses["b"] = (nets["b"](batch["x"]).squeeze(1) + batch["y"]).pow(2).mean()
        return Loss(losses, len(batch["y"]))


def test_several_networks_and_optimisers(tmp_path):
    ctx = StageContext.for_testing(tmp_path, name="toy", kind="toy")
    cfg = config(epochs=1)
    torch.manual_seed(0)
    trained = fit(ctx, TwoNets(), toy_rows(), cfg)
    assert set(trained.state["optimizers"]) == {"a", "b"}
    steps = {n: int(s["state"][0]["step"]) for n, s in trained.state["optimizers"].items()}
    assert steps == {"a": 4, "b": 2}  # 4 batches: b only when its loss was returned
    assert {"train_loss", "train_loss_b"} <= set(trained.metrics)


def test_two_ray_train_workers_train_as_one_with_the_global_batch(ray_session, tmp_path):
    """DDP averages the workers' gradients; with the global batch split evenly that is the
    gradient of the whole batch, so 2 workers end where 1 worker does."""
    for n, batch in ((30, 8), (7, 8)):  # a partial batch dropped; one odd, weighted batch
        weights = {}
        for workers in (0, 1, 2):
            cfg = config(num_workers=workers, batch_size=batch)
            ctx = StageContext.for_testing(tmp_path / f"{n}-{workers}", name="toy",
                                           kind="toy", key=f"toy{n}-{workers}")
            weights[workers] = fit(ctx, Regression(cfg), toy_rows(n), cfg).state["nets"]["net"]
        for k in weights[1]:
            assert torch.allclose(weights[0][k], weights[1][k], atol=1e-6), (n, k)
            assert torch.allclose(weights[1][k], weights[2][k], atol=1e-5), (n, k)


class Slow(Regression):
    """Each epoch takes at least 0.2 s."""

    def begin_epoch(self, epoch, nets):
        import time
        time.sleep(0.2)


def test_a_deadline_fails_a_fixed_length_run_and_a_larger_one_resumes_it(tmp_path):
    from stages.train.harness import BudgetSpent
    ctx = StageContext.for_testing(tmp_path, name="toy", kind="toy")
    cfg = config(epochs=6)
    with pytest.raises(BudgetSpent) as e:  # 0.3 s: spent after the second epoch
        fit(ctx, Slow(cfg), toy_rows(), cfg, deadline_minutes=0.005)
    message = str(e.value)
    assert "stage 'toy'" in message and "max_minutes 0.005" in message
    assert "of 6 epochs" in message and "resume" in message
    saved = torch.load(ctx.work_files.get(CHECKPOINT), weights_only=True)
    assert 1 <= saved["epoch"] < 5  # the checkpoint kept, the run not cut short silently
    done = fit(ctx, Slow(cfg), toy_rows(), cfg, deadline_minutes=10)
    assert done.state["epoch"] == 5 and done.metrics["start_epoch"] == saved["epoch"] + 1

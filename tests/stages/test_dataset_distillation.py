"""The dataset-distillation family on tiny settings: expert trajectories (parquet layout,
resume), mtt / dm / random-subset / herding (synthetic-set artifacts, checkpoints, resume,
bad input, divergence) and evaluate-synthetic (metric names, honest numbers)."""

import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.context import StageContext
from pipelines.errors import UserError
from stages.data.digits import LoadDigits
from stages.distill.dm import DistributionMatching
from stages.distill.herding import Herding
from stages.distill.mtt import CHECKPOINT, MatchTrajectories
from stages.distill.random_subset import RandomSubset
from stages.evaluate.evaluate_synthetic import EvaluateSynthetic
from stages.distill.experts import ExpertReader
from stages.teacher.expert_trajectories import ExpertTrajectories

from .conftest import run_stage

NET = {"width": 8, "depth": 2}
EXPERTS = {**NET, "epochs": 4, "lr": 0.05}
MTT = {**NET, "ipc": 1, "syn_steps": 3, "expert_epochs": 1, "max_start_epoch": 2,
       "checkpoint_every": 2}


@pytest.fixture(scope="module")
def experts_run(ray_session, digits, tmp_path_factory):
    """expert-trajectories run twice on one work dir: 1 expert, then 2 (as a retried
    attempt with more work would be): the second run trains only expert 1."""
    ctx = StageContext.for_testing(tmp_path_factory.mktemp("experts"), name="experts",
                                   kind="expert-trajectories")
    ExpertTrajectories({**EXPERTS, "experts": 1}).run(ctx, data=digits)
    first = os.path.join(ctx.work_dir, "experts", "expert-00000.parquet")
    mtime = os.stat(first).st_mtime_ns
    ctx.board.take_history("experts")
    out = ExpertTrajectories({**EXPERTS, "experts": 2}).run(ctx, data=digits)["experts"]
    return {"experts": out, "ctx": ctx, "first_mtime": mtime, "first": first}


@pytest.fixture(scope="module")
def experts(experts_run):
    return experts_run["experts"]


def test_experts_layout_and_resume(experts_run, digits):
    ex, ctx = experts_run["experts"], experts_run["ctx"]
    assert ex.info["arch"]["width"] == 8 and ex.info["experts"] == 2 and ex.info["epochs"] == 4
    assert ex.info["dataset"] and ex.info["num_params"] > 0
    files = ex.files()
    assert [os.path.basename(f) for f in files] == ["expert-00000.parquet",
                                                    "expert-00001.parquet"]
    for e, f in enumerate(files):
        meta = pq.ParquetFile(f).metadata
        # one row per (expert, epoch 0..4), one row group per row: readers fetch single rows
        assert meta.num_rows == 5 and meta.num_row_groups == 5
        table = pq.read_table(f)
        assert table.column("expert").to_pylist() == [e] * 5
        assert table.column("epoch").to_pylist() == list(range(5))
        assert table.schema.field("params").type.list_size == ex.info["num_params"]
    # resume: expert 0 was not retrained, only expert 1 logged an accuracy
    assert os.stat(experts_run["first"]).st_mtime_ns == experts_run["first_mtime"]
    steps = [s for k, _, s in ctx.board.history_of("experts") if k == "expert_test_accuracy"]
    assert steps == [1]
    # the trajectory moves: epoch 4 differs from epoch 0
    reader = ExpertReader(ex, "test")
    assert float((reader.load(1, 4) - reader.load(1, 0)).abs().sum()) > 0
    assert reader.rows_read == 2


def test_network_tasks_ask_for_a_gpu_share_only_when_ray_has_one(tmp_path):
    from stages.distill.dd_common import NETWORK_GPU_SHARE, task_gpus
    assert task_gpus(StageContext.for_testing(tmp_path)) == 0.0
    assert task_gpus(StageContext.for_testing(tmp_path, num_gpus_available=2)) == NETWORK_GPU_SHARE
    # a cluster with only a fraction of a GPU free still gets the GPU path
    assert task_gpus(StageContext.for_testing(tmp_path, num_gpus_available=0.5)) == NETWORK_GPU_SHARE


def test_random_subset_and_bad_ipc(digits, tmp_path):
    out = run_stage(RandomSubset, {"ipc": 3}, tmp_path, "random", data=digits)[0]["synthetic"]
    cols = out.to_numpy()
    assert cols["x"].shape == (30, 1, 8, 8)
    assert np.bincount(cols["label"]).tolist() == [3] * 10
    assert out.info["method"] == "random" and out.info["ipc"] == 3
    with pytest.raises(UserError, match=r"ipc 1000 .*smallest training class"):
        run_stage(RandomSubset, {"ipc": 1000}, tmp_path, "random2", data=digits)


def test_dm_learns_and_resumes(digits, tmp_path):
    ctx = StageContext.for_testing(tmp_path, name="dm", kind="dm")
    cfg = {**NET, "ipc": 2, "batch_real": 32, "checkpoint_every": 2}
    first = DistributionMatching({**cfg, "iterations": 2}).run(ctx, data=digits)["synthetic"]
    assert first.info["resumed_from"] == 0
    x1 = first.to_numpy()["x"]
    second = DistributionMatching({**cfg, "iterations": 3}).run(ctx, data=digits)["synthetic"]
    assert second.info["resumed_from"] == 2 and second.info["iterations"] == 3
    x2 = second.to_numpy()["x"]
    init = RandomSubset({"ipc": 2}).run(StageContext.for_testing(tmp_path, name="init"),
                                        data=digits)["synthetic"].to_numpy()["x"]
    assert x2.shape == (20, 1, 8, 8) and not np.allclose(x1, x2) and not np.allclose(init, x1)
    with pytest.raises(UserError, match="ipc"):
        run_stage(DistributionMatching, {**cfg, "ipc": 500}, tmp_path, "dm2", data=digits)


def test_mtt_resumes_streams_and_reports_divergence(experts, digits, tmp_path):
    ctx = StageContext.for_testing(tmp_path, name="mtt", kind="mtt")
    first = MatchTrajectories({**MTT, "iterations": 2}).run(ctx, experts=experts, data=digits)
    first = first["synthetic"]
    assert first.info["resumed_from"] == 0 and first.info["synthetic_lr"] > 0
    assert first.info["expert_rows_read"] == 4  # 2 rows per iteration, never the artifact
    second = MatchTrajectories({**MTT, "iterations": 3}).run(ctx, experts=experts,
                                                             data=digits)["synthetic"]
    assert second.info["resumed_from"] == 2 and second.info["expert_rows_read"] == 2
    assert np.bincount(second.to_numpy()["label"]).tolist() == [1] * 10
    # a huge image step makes the next iteration diverge; the checkpoint (3) is kept
    with pytest.raises(FloatingPointError, match="diverged at iteration 4"):
        MatchTrajectories({**MTT, "iterations": 8, "lr_img": 1e38,
                           "checkpoint_every": 100}).run(ctx, experts=experts, data=digits)
    import torch
    assert torch.load(os.path.join(ctx.work_dir, CHECKPOINT))["iteration"] == 3
    # a huge synthetic learning rate diverges at once
    with pytest.raises(FloatingPointError, match="diverged at iteration 0"):
        run_stage(MatchTrajectories, {**MTT, "iterations": 2, "lr_init": 1e8}, tmp_path,
                  "mtt_lr", experts=experts, data=digits)


def test_mtt_alpha_starts_at_the_experts_learning_rate(experts, digits, tmp_path):
    """As in MTT's code (syn_lr starts at lr_teacher): a student taking syn_steps steps at a
    fifth of the experts' rate can only match them with images that give huge gradients."""
    assert experts.info["lr"] == EXPERTS["lr"]
    tiny = {**MTT, "iterations": 1, "lr_lr": 1e-9}  # alpha all but frozen: its start shows
    own = run_stage(MatchTrajectories, tiny, tmp_path, "own", experts=experts,
                    data=digits)[0]["synthetic"]
    assert own.info["synthetic_lr"] == pytest.approx(EXPERTS["lr"], rel=1e-6)
    set_ = run_stage(MatchTrajectories, {**tiny, "lr_init": 0.01}, tmp_path, "set",
                     experts=experts, data=digits)[0]["synthetic"]
    assert set_.info["synthetic_lr"] == pytest.approx(0.01, rel=1e-6)


def test_mtt_refines_the_synthetic_set_wired_as_init(experts, digits, tmp_path):
    # a synthetic set drawn with another seed than mtt's own real init
    start = run_stage(RandomSubset, {"ipc": 1}, tmp_path, "start", seed=5,
                      data=digits)[0]["synthetic"]
    cols = start.to_numpy()
    out = run_stage(MatchTrajectories, {**MTT, "iterations": 1, "lr_img": 1e-6}, tmp_path,
                    "refine", experts=experts, data=digits, init=start)[0]["synthetic"]
    got = out.to_numpy()
    order = np.argsort(cols["label"], kind="stable")
    assert got["label"].tolist() == list(range(10)) and out.info["init"] == "random"
    np.testing.assert_allclose(got["x"], cols["x"][order], atol=1e-4)  # a tiny step from it
    plain = run_stage(MatchTrajectories, {**MTT, "iterations": 1, "lr_img": 1e-6}, tmp_path,
                      "plain", experts=experts, data=digits)[0]["synthetic"]
    assert plain.info["init"] == "real" and not np.allclose(plain.to_numpy()["x"], got["x"])
    two = run_stage(RandomSubset, {"ipc": 2}, tmp_path, "two", data=digits)[0]["synthetic"]
    with pytest.raises(UserError, match=r"input 'init'.*images per class.*\[2, 2"):
        run_stage(MatchTrajectories, {**MTT, "iterations": 1}, tmp_path, "bad",
                  experts=experts, data=digits, init=two)


def test_experts_from_another_architecture_or_dataset(experts, digits, tmp_path):
    with pytest.raises(UserError, match="architecture"):
        run_stage(MatchTrajectories, {**MTT, "width": 16, "iterations": 1}, tmp_path, "a",
                  experts=experts, data=digits)
    other = run_stage(LoadDigits, {"test_fraction": 0.3}, tmp_path, "digits30")[0]["data"]
    with pytest.raises(UserError, match="dataset"):
        run_stage(Herding, {**NET, "ipc": 1}, tmp_path, "b", experts=experts, data=other)
    with pytest.raises(UserError, match="max_start_epoch"):
        run_stage(MatchTrajectories, {**MTT, "max_start_epoch": 4}, tmp_path, "c",
                  experts=experts, data=digits)


def test_herding_picks_real_images(experts, digits, tmp_path):
    out = run_stage(Herding, {**NET, "ipc": 2}, tmp_path, "herd", experts=experts,
                    data=digits)[0]["synthetic"]
    x = out.to_numpy()["x"]
    train = digits.to_numpy(["x", "split"])
    real = train["x"][train["split"] == "train"].reshape(-1, 64)
    assert x.shape == (20, 1, 8, 8)
    assert all((np.abs(real - xi.reshape(1, 64)).sum(1) == 0).any() for xi in x)


def test_evaluate_synthetic_metrics(ray_session, digits, tmp_path):
    syn = run_stage(RandomSubset, {"ipc": 2}, tmp_path, "syn", data=digits)[0]["synthetic"]
    cfg = {**NET, "networks": 5, "epochs": 30, "full_networks": 1, "full_epochs": 3,
           "lr": 0.05}
    out, ctx = run_stage(EvaluateSynthetic, cfg, tmp_path, "eval", synthetic=syn, data=digits)
    report = out["report"]
    m = report.metrics()
    for name in ("accuracy_mean", "accuracy_std", "random_accuracy_mean",
                 "full_accuracy_mean", "ior"):
        assert name in m and np.isfinite(m[name])
    assert m["ior"] == pytest.approx(m["accuracy_mean"] - m["random_accuracy_mean"], abs=1e-6)
    per = report.info["per_network"]
    assert len(per["synthetic"]) == 5 and len(per["random"]) == 5 and len(per["full"]) == 1
    assert m["accuracy_std"] == pytest.approx(np.std(per["synthetic"]), abs=1e-6)
    assert 0.2 < m["accuracy_mean"] <= 1 and m["full_accuracy_mean"] > 0.5  # it learned
    assert os.path.exists(os.path.join(report.path, "synthetic.png"))
    assert os.path.exists(os.path.join(report.path, "accuracy.png"))
    with pytest.raises(Exception, match="networks"):
        EvaluateSynthetic({"networks": 3})


@pytest.mark.parametrize("example", ["dd_digits.yaml", "dd_mnist.yaml"])
def test_examples_name_every_cell(example):
    from pipelines import Pipeline
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p = Pipeline.from_yaml(os.path.join(root, "examples", example)).validate()
    kinds = {"mtt": "mtt", "dm": "dm", "random": "random-subset", "herding": "herding"}
    for method, kind in kinds.items():
        for ipc in (1, 10):
            evaluation, synthetic = p.nodes[f"eval_{method}_ipc{ipc}"], p.nodes[f"{method}_ipc{ipc}"]
            assert evaluation.stage.kind == "evaluate-synthetic"
            assert synthetic.stage.kind == kind and synthetic.stage.config.ipc == ipc
            assert evaluation.inputs["synthetic"][0] == f"{method}_ipc{ipc}"
            assert evaluation.stage.config.networks >= 5
    cells = [n for n in p.nodes if n.startswith("eval_")]  # every cell: its method, its IPC
    for cell in cells:
        synthetic = p.nodes[p.nodes[cell].inputs["synthetic"][0]]
        assert synthetic.name == cell[len("eval_"):]
        assert f"_ipc{synthetic.stage.config.ipc}" == cell[cell.rindex("_"):]
        if synthetic.stage.kind == "sre2l":  # relabelled by its teacher, as SRe2L evaluates
            assert p.nodes[cell].inputs["teacher"][0] == synthetic.inputs["teacher"][0]
    assert len(cells) == {"dd_digits.yaml": 16, "dd_mnist.yaml": 14}[example]


def test_load_mnist(tmp_path):
    from stages.data.mnist import LoadMNIST
    out = run_stage(LoadMNIST, {"test_fraction": 0.2}, tmp_path, "mnist")[0]["data"]
    cols = out.to_numpy()
    assert cols["x"].shape == (5000, 1, 28, 28) and cols["x"].dtype == np.float32
    assert 0 <= cols["x"].min() and cols["x"].max() == 1
    assert sorted(cols["id"].tolist()) == list(range(5000))
    test = cols["split"] == "test"
    assert np.bincount(cols["label"][test]).tolist() == [100] * 10  # stratified
    assert out.info == {"num_classes": 10, "input_shape": [1, 28, 28]}


def test_work_files_resume_on_another_node_of_an_s3_store(ray_session, digits, s3_uri,
                                                          tmp_path):
    """On an s3:// store the checkpoints and finished experts are in the store's work
    location: an attempt on another node (another local work directory) resumes from them;
    nothing is read from the first node's directory."""
    import shutil

    from pipelines._internal.store import Store
    store = Store.open(s3_uri)

    def node_ctx(node, kind):
        return StageContext(name=kind, kind=kind, key="k", seed=0,
                            staging_dir=str(tmp_path / node / kind / "staging"),
                            work_dir=str(tmp_path / node / kind / "work"),
                            work_uri=store.work_uri(kind, "k"))

    cfg = {**NET, "ipc": 2, "batch_real": 32, "checkpoint_every": 2}
    DistributionMatching({**cfg, "iterations": 2}).run(node_ctx("a", "dm"), data=digits)
    ExpertTrajectories({**EXPERTS, "experts": 1}).run(node_ctx("a", "experts"), data=digits)
    shutil.rmtree(tmp_path / "a")  # the first node is gone
    dm = DistributionMatching({**cfg, "iterations": 3}).run(node_ctx("b", "dm"), data=digits)
    assert dm["synthetic"].info["resumed_from"] == 2
    ctx = node_ctx("b", "experts")
    ex = ExpertTrajectories({**EXPERTS, "experts": 2}).run(ctx, data=digits)["experts"]
    steps = [s for k, _, s in ctx.board.history_of("experts") if k == "expert_test_accuracy"]
    assert steps == [1] and ex.info["experts"] == 2  # expert 0 came from the store
    assert [pq.read_table(f).column("expert")[0].as_py() for f in ex.files()] == [0, 1]

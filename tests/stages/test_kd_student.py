import json
import os

import pyarrow.compute as pc
import pytest
import torch
import torch.nn.functional as F

from pipelines.errors import UserError
from stages.models.classifiers import MLP, load_classifier, predict_logits
from stages.train.kd_student import KDStudent, hinton_kd_loss
from stages.train.rows import (hold_in_memory, hold_tables, permuted_batches, read_share,
                               train_share_bytes)
from tests.stages.conftest import KD_CONFIG, run_stage


def test_hinton_loss():
    torch.manual_seed(0)
    z_s, z_t, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    ce = F.cross_entropy(z_s, y)
    torch.testing.assert_close(hinton_kd_loss(z_s, z_t, y, 4.0, 0.0), ce)
    # a student equal to the teacher pays only the hard-label part
    torch.testing.assert_close(hinton_kd_loss(z_t, z_t, y, 4.0, 0.5),
                               0.5 * F.cross_entropy(z_t, y))
    kl = (F.softmax(z_t / 2, 1) * (F.log_softmax(z_t / 2, 1) - F.log_softmax(z_s / 2, 1)))
    torch.testing.assert_close(hinton_kd_loss(z_s, z_t, y, 2.0, 1.0), 4 * kl.sum(1).mean())


def test_held_rows_decision_and_permuted_batches():
    import pyarrow as pa
    assert hold_in_memory(2**20, 1) and not hold_in_memory(2**20 + 1, 1)
    assert not hold_in_memory(0, 0)  # 0: always stream
    from ray.data.extensions import ArrowTensorArray
    import numpy as np
    tables = [pa.table({"x": [[1.0, 2.0], [3.0, 4.0]], "label": [0, 1]}),  # lists
              pa.table({"x": ArrowTensorArray.from_numpy(np.array([[5.0, 6.0]])),
                        "label": [2]}),                                   # Ray's tensors
              pa.table({"x": pa.array([], pa.list_(pa.float64())),
                        "label": pa.array([], pa.int64())})]              # an empty block
    held = hold_tables(tables, {"x": torch.float32, "label": torch.int64})
    assert held["x"].shape == (3, 2) and held["x"].dtype == torch.float32
    assert held["label"].tolist() == [0, 1, 2] and held["label"].dtype == torch.int64
    epochs = [list(permuted_batches(held, 2, seed, "cpu")) for seed in (0, 0, 1, 2, 3)]
    for batches in epochs:  # every row once per epoch, rows kept whole, batches of 2
        assert [len(b["label"]) for b in batches] == [2, 1]
        rows = torch.cat([b["label"] for b in batches])
        assert sorted(rows.tolist()) == [0, 1, 2]
        assert torch.equal(torch.cat([b["x"] for b in batches]), held["x"][rows])
    orders = [torch.cat([b["label"] for b in e]).tolist() for e in epochs]
    assert orders[0] == orders[1] and len({tuple(o) for o in orders}) > 1  # seeded, reshuffled


def test_each_worker_reads_an_equal_share_of_the_train_rows(tmp_path):
    """Shares are disjoint, equal, in file order, cover the train rows but the remainder,
    read only their row groups; the size estimate comes from the footers."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    files, ids = [], np.arange(23)
    split = np.where(ids % 4 == 3, "test", "train")          # 17 train rows
    for i, part in enumerate(np.array_split(ids, 3)):         # 3 files, row groups of 3
        path = str(tmp_path / f"part-{i}.parquet")
        pq.write_table(pa.table({"id": part, "x": ids[part].astype(np.float32) * 10,
                                 "split": split[part]}), path, row_group_size=3)
        files.append(path)
    train = ids[split == "train"]
    for world in (1, 2, 3, 5):
        shares = [pa.concat_tables(read_share(files, ["id", "x"], r, world)).to_pydict()
                  for r in range(world)]
        m = len(train) // world
        assert [s["id"] for s in shares] == [train[r * m:(r + 1) * m].tolist()
                                             for r in range(world)]
        assert shares[0]["x"] == [10.0 * i for i in shares[0]["id"]]
        assert set(shares[0]) == {"id", "x"}
    # the last worker of 5 (train rows 12-14: ids 16-18) reads one row group of the 8
    assert [t.num_rows for t in read_share(files, ["id"], 4, 5)] == [3]
    big = str(tmp_path / "big.parquet")
    rng = np.random.default_rng(0)
    pq.write_table(pa.table({"id": np.arange(4000), "x": rng.random(4000, np.float32),
                             "split": np.where(np.arange(4000) < 3000, "train", "test")}), big)
    per_row = train_share_bytes([big], ["id", "x"], 1) / 3000
    assert 10 <= per_row <= 30, per_row  # an int64 and a float32 a row, parquet's overhead
    assert train_share_bytes([big], ["id", "x"], 2) == train_share_bytes([big], ["id", "x"], 1) // 2
    assert train_share_bytes([big], ["id"], 1) < train_share_bytes([big], ["id", "x"], 1)


def test_student_learns_from_the_teacher(student, signal):
    model = load_classifier(student.path)
    assert isinstance(model, MLP)
    test = signal.to_numpy(["x", "label", "logits"], filter=pc.field("split") == "test")
    pred = predict_logits(model, test["x"]).argmax(1).numpy()
    assert (pred == test["label"]).mean() >= 0.8  # chance is 0.1
    assert (pred == test["logits"].argmax(1)).mean() >= 0.8


def test_second_run_resumes_from_the_last_checkpoint(kd_runs):
    first, second = kd_runs["first"], kd_runs["second"]
    assert first.info["start_epoch"] == 0 and first.info["epochs"] == 2
    assert first.info["shard_in_memory"] is False and second.info["shard_in_memory"] is True
    assert second.info["start_epoch"] == 2 and second.info["epochs"] == 5
    assert second.info["train_loss"] < first.info["train_loss"]
    # every checkpoint carries the resolved config; two are kept
    ctx = kd_runs["ctx"]
    run_dir = os.path.join(ctx.work_dir, "ray_train", f"{ctx.kind}-{ctx.key[:16]}")
    configs = [os.path.join(root, "config.json") for root, _, files in os.walk(run_dir)
               if "state.pt" in files]
    assert len(configs) == 2
    with open(sorted(configs)[-1]) as f:
        saved = json.load(f)
    assert saved == KDStudent.Config(**KD_CONFIG, epochs=5, loss="hinton",
                                     num_workers=1).model_dump()  # resolved


def test_refuses_a_signal_it_cannot_use(signal, digits, tmp_path):
    wrong = type(signal)(path=signal.path, info={**signal.info, "signal": "topk-logprobs"})
    with pytest.raises(UserError, match=r"stage 'kd' \(kd-student\) input 'signal'.*"
                                        r"'topk-logprobs'.*allowed: embeddings, hidden_states, "
                                        r"logits, probabilities, responses, topk_logprobs "
                                        r"\(did you mean 'topk_logprobs'\?\)"):
        run_stage(KDStudent, {}, tmp_path, "kd", signal=wrong)
    no_logits = type(digits)(path=digits.path, info={"signal": "logits"})
    with pytest.raises(UserError, match=r"logits"):
        run_stage(KDStudent, {}, tmp_path, "kd", signal=no_logits)

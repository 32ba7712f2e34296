"""``strategy: fsdp``: a causal-LM student sharded with FSDP2 (``fully_shard``) across 2
Ray Train CPU workers over gloo holds about half its parameters on each, ends on DDP's
weights, resumes from its (whole-tensor) checkpoint with its optimiser state re-sharded,
and generates on-policy (GKD) with every worker stepping together."""

import pytest
import torch
from safetensors.torch import load_file

from pipelines.context import StageContext
from stages.train.kd_student import KDStudent
from tests.stages.conftest import run_stage

STUDENT = {"keep_every": 2, "batch_size": 8, "lr": 3e-3, "loss": "forward_kl",
           "num_workers": 2}


def weights(model) -> dict:
    return load_file(f"{model.path}/model.safetensors")


def assert_close(a: dict, b: dict, atol: float):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol), (k, (a[k] - b[k]).abs().max())


def student(llm_chain, root, name, key=None, **config):
    ctx = StageContext.for_testing(root, name=name, kind=KDStudent.kind, seed=0,
                                   key=key or "test")
    return KDStudent({**STUDENT, **config}).run(ctx, signal=llm_chain["responses"],
                                                 teacher=llm_chain["teacher"])["model"]


def test_fsdp_shards_the_student_ends_on_ddps_weights_and_resumes(llm_chain, tmp_path):
    ddp = student(llm_chain, tmp_path / "ddp", "ddp", epochs=2)
    fsdp = student(llm_chain, tmp_path / "fsdp", "fsdp", epochs=2, strategy="fsdp")
    assert fsdp.info["train_workers"] == ddp.info["train_workers"] == 2
    # each worker holds its half of every parameter (odd sizes: one element more)
    assert fsdp.info["params_held"] < 0.55 * ddp.info["params_held"], fsdp.info
    assert_close(weights(fsdp), weights(ddp), atol=1e-4)

    # one epoch, then the same run (same key) asked for two: it resumes at epoch 1, its
    # optimiser's moments re-sharded from the checkpoint, and ends where the straight run did
    first = student(llm_chain, tmp_path / "resume", "r", key="k", epochs=1, strategy="fsdp")
    assert first.info["start_epoch"] == 0
    resumed = student(llm_chain, tmp_path / "resume", "r", key="k", epochs=2,
                      strategy="fsdp")
    assert resumed.info["start_epoch"] == 1 and resumed.info["epochs"] == 2
    assert_close(weights(resumed), weights(fsdp), atol=1e-5)


def test_fsdp_gkd_students_write_their_responses_in_step(llm_chain, tmp_path):
    """On-policy GKD: each worker's sharded student writes its share of the batch (synced
    generation under no_grad, below), then trains on the teacher's scores."""
    model = student(llm_chain, tmp_path, "gkd", epochs=1, strategy="fsdp", loss="jsd",
                    beta=0.5, lmbda=1.0, max_new_tokens=6)
    assert model.info["loss"] == "jsd" and model.info["train_workers"] == 2


def test_fsdp_needs_workers_and_no_ema_copies(tiny_diffusion, tmp_path):
    from pipelines import UserError
    from stages.train.consistency_distill import ConsistencyDistill
    with pytest.raises(ValueError, match="num_workers must be at least 1"):
        KDStudent.Config(strategy="fsdp", num_workers=0)
    assert "strategy" not in KDStudent.Config(strategy="fsdp").split_execution()[0]
    with pytest.raises(UserError, match="field 'strategy': fsdp is for methods without EMA"):
        run_stage(ConsistencyDistill, {"strategy": "fsdp", "epochs": 1}, tmp_path, "cd",
                  teacher=tiny_diffusion["teacher"],
                  pairs=tiny_diffusion["pairs"]["consistency"])


def _synced_worker(rank: int, folder: str, eos: int, prompts: list, port: int, out) -> None:
    import os

    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.models.lm_generate import generate_ids, left_padded
    from stages.train.sharding import shard, sharded
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model = shard(AutoModelForCausalLM.from_pretrained(folder), torch.device("cpu"))
    model.generation_config.eos_token_id = eos
    batch = left_padded([prompts[rank]], 2)
    rows = generate_ids(model, AutoTokenizer.from_pretrained(folder), batch["input_ids"],
                        batch["attention_mask"], max_new_tokens=8, synced=sharded(model))
    out[rank] = rows[0]["response_ids"].tolist()
    dist.destroy_process_group()


def test_sharded_generation_steps_until_every_worker_is_done(tmp_path):
    """Worker 0's row ends at its first token, worker 1's runs 8: each worker's forward
    passes are all-gathers, so worker 0 keeps stepping (synced) until worker 1 is done,
    and both get what the unsharded model generates."""
    import multiprocessing
    import socket

    from transformers import AutoModelForCausalLM

    from tests.stages import lm_tiny
    folder = lm_tiny.build("llama", str(tmp_path / "m"), layers=2, sharpness=40.0)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()

    def greedy(ids, n=8):
        with torch.no_grad():
            return model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                                  pad_token_id=2, eos_token_id=[2])[0, len(ids):].tolist()
    first = [3, 4, 5]
    eos = greedy(first, 1)[0]
    second = next(p for p in ([i, i + 1] for i in range(6, 60))
                  if eos not in greedy(p) and 2 not in greedy(p))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spawn = multiprocessing.get_context("spawn")
    out = spawn.Manager().dict()
    procs = [spawn.Process(target=_synced_worker, args=(r, folder, eos, [first, second], port,
                                                        out)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive and all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    assert out[0] == [eos] and out[1] == greedy(second), dict(out)

"""The MiniLM embedding pass of ``examples/kd_embeddings.yaml`` (``teacher-outputs``,
``signal: embeddings``, max_length 64, batch size 128, its default ``actors: auto``)
against a bare loop using every core: one process, torch at ``os.cpu_count()`` threads,
the same tokenizer, model, batches and mean pooling, over the same sentences read with
pyarrow into memory (issue 26's row "MiniLM embedding pass rows/s vs a bare loop using
both cores").

Both sides run alternately in every repetition (order swapped every other one); the figure
is bare seconds / pipeline seconds (= pipeline rows/s over bare rows/s), median and spread.
The pipeline side is ``pipelines.run(..., force=["teacher_outputs"])`` in this process
(embedded Ray up, its start not timed): Ray Data reads the corpus, the actor pool embeds
it, parquet is written and committed, MLflow records the run. The bare embeddings are
checked against the stage's (``max_abs_diff``).

    python -m benchmarks --only embedding_pass --repetitions 5
"""

from __future__ import annotations

import os
import time

import numpy as np
import yaml

from benchmarks import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("corpus", "teacher", "teacher_outputs")


def spec() -> dict:
    with open(os.path.join(ROOT, "examples", "kd_embeddings.yaml")) as f:
        example = yaml.safe_load(f)
    return {"name": "bench_embedding_pass", "seed": example["seed"],
            "stages": {n: example["stages"][n] for n in STAGES}}


def bare_pass(corpus, model, cfg: dict, threads: int) -> tuple[float, np.ndarray, np.ndarray]:
    """Seconds to read the sentences and embed them all; the ids and the embeddings."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from stages.models.text import mean_pool, tokenize  # the actor's own helpers
    with common.torch_threads(threads):
        t0 = time.perf_counter()
        cols = common.load_columns(corpus.files(), ["id", "text"])
        tokenizer = AutoTokenizer.from_pretrained(model.path)
        net = AutoModel.from_pretrained(model.path).eval()
        out, texts, size = [], [str(t) for t in cols["text"]], cfg["batch_size"]
        with torch.inference_mode():
            for i in range(0, len(texts), size):  # padded to max_length, as the stage does
                enc = tokenize(tokenizer, texts[i:i + size], cfg["max_length"])
                ids = torch.tensor(enc["input_ids"], dtype=torch.int64)
                mask = torch.tensor(enc["attention_mask"], dtype=torch.int64)
                hidden = net(input_ids=ids, attention_mask=mask).last_hidden_state.float()
                out.append(mean_pool(hidden, mask).numpy())
        return time.perf_counter() - t0, cols["id"], np.concatenate(out)


def max_abs_diff(signal, ids: np.ndarray, embeddings: np.ndarray) -> float:
    got = common.load_columns(signal.files(), ["id", "embedding"])
    order = {k: i for i, k in enumerate(ids.tolist())}
    rows = np.array([order[k] for k in got["id"].tolist()])
    return float(np.abs(got["embedding"].astype(np.float32) - embeddings[rows]).max())


def run(repetitions: int = 5) -> dict:
    store = common.store()
    common.start_ray()
    threads = os.cpu_count() or 1
    try:
        pipeline = spec()
        result, setup_s = common.run_pipeline(pipeline, store)
        corpus, model = common.artifact(result, "corpus"), common.artifact(result, "teacher")
        cfg = pipeline["stages"]["teacher_outputs"]["config"]
        bare_pass(corpus, model, cfg, threads)  # warm-up: imports, kernels (not timed)
        reps, last = [], {}
        for i in range(repetitions):
            def bare():
                seconds, ids, emb = bare_pass(corpus, model, cfg, threads)
                last["bare"] = (ids, emb)
                return seconds

            def stage():
                res, seconds = common.run_pipeline(pipeline, store, force=["teacher_outputs"])
                assert res["teacher_outputs"].status == "ran", res["teacher_outputs"]
                last["signal"] = common.artifact(res, "teacher_outputs")
                return seconds

            sides = [("bare", bare), ("pipeline", stage)]
            timed = dict((n, f()) for n, f in (sides if i % 2 == 0 else sides[::-1]))
            n = len(last["bare"][0])
            reps.append({"bare_s": round(timed["bare"], 2), "run_s": round(timed["pipeline"], 2),
                         "ratio": round(timed["bare"] / timed["pipeline"], 4)})
            print(f"  {i + 1}/{repetitions}: bare {timed['bare']:.1f}s ({n / timed['bare']:.0f}"
                  f" rows/s, {threads} threads), pipeline {timed['pipeline']:.1f}s "
                  f"({n / timed['pipeline']:.0f} rows/s), ratio {reps[-1]['ratio']:.3f}",
                  flush=True)
        median, spread = common.summary([r["ratio"] for r in reps])
        diff = max_abs_diff(last["signal"], *last["bare"])
    finally:
        common.stop_ray()
    return {
        "name": "embedding_pass",
        "what": f"MiniLM embedding pass (examples/kd_embeddings.yaml's teacher-outputs, "
                f"actors auto) vs a bare loop at {threads} torch threads: rows/s ratio, "
                f"{n} sentences",
        "command": f"python -m benchmarks --only embedding_pass --repetitions {repetitions}",
        "median_ratio": median, "spread": spread, "target": "ratio >= 0.9",
        "met": median >= 0.9, "rows": n, "bare_threads": threads, "setup_s": round(setup_s, 1),
        "repetitions": reps, "max_abs_diff": diff, "commit": common.commit(),
    }

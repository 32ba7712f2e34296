"""generate-responses: a tiny random Llama writes responses through its chat template; rows
are the same with 1 and 2 actors (sampling included, per-row seeds), greedy rows are what
transformers' own generate writes, the top-k log-probabilities are the temperature-1
distribution's, a run killed mid-generation resumes from its shards, and bad input is one
clear error before any generation."""

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipelines import Pipeline, UserError, plan, run
from pipelines._internal.store import Store
from stages.data.load_prompts import LoadPrompts
from stages.teacher.generate_responses import GenerateResponses
from tests.pipelines.test_shard_resume import kill_when_sharded
from tests.stages import lm_tiny
from tests.stages.conftest import run_stage

QUESTIONS = [f"Explain what `mod{i}.fn{i % 7}` does in {i} words." for i in range(24)]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return lm_tiny.build("llama", str(tmp_path_factory.mktemp("llama")))


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompts")
    path = root / "q.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": q, "answer": f"ref {i}"})
                              for i, q in enumerate(QUESTIONS)) + "\n")
    out, _ = run_stage(LoadPrompts, {"path": str(path), "test_fraction": 0.25},
                       root / "out", "prompts")
    return out["prompts"]


def model_artifact(path):
    from pipelines.stage import Model
    return Model(path=path, info={})


def generate(tmp_path, llama, prompts, **config):
    out, ctx = run_stage(GenerateResponses, {"max_new_tokens": 10, **config}, tmp_path,
                         "responses", model=model_artifact(llama), prompts=prompts)
    return out["responses"], ctx


def rows(ds) -> dict:
    table = ds.to_arrow().to_pylist()
    return {r["id"]: r for r in table}


def test_rows_identical_with_1_and_2_actors_when_sampling(ray_session, llama, prompts,
                                                          tmp_path):
    cfg = {"temperature": 0.9, "top_p": 0.9, "top_k": 3, "batch_size": 5, "shard_rows": 7}
    one, ctx = generate(tmp_path / "a", llama, prompts, actors=1, **cfg)
    two, _ = generate(tmp_path / "b", llama, prompts, actors=2, **cfg)
    a, b = rows(one), rows(two)
    assert len(a) == len(QUESTIONS) and a.keys() == b.keys()
    for i in a:
        for col in ("response", "response_ids", "prompt_ids", "topk_ids", "finish", "split",
                    "prompt"):
            assert a[i][col] == b[i][col], (i, col)
        assert np.allclose(a[i]["topk_logprobs"], b[i]["topk_logprobs"], atol=1e-5)
        n = len(a[i]["response_ids"])
        assert len(a[i]["topk_ids"]) == len(a[i]["topk_logprobs"]) == 3 * n
    assert ctx.metrics["rows"] == 24 and one.info["top_k"] == 3
    # sampled, not greedy: another seed writes other responses
    other, _ = run_stage(GenerateResponses, {"max_new_tokens": 10, **cfg}, tmp_path / "c",
                         "responses", seed=1, model=model_artifact(llama), prompts=prompts)
    assert sum(a[i]["response_ids"] != r["response_ids"]
               for i, r in rows(other["responses"]).items()) > 12


def test_greedy_rows_are_transformers_generate_and_topk_is_its_distribution(
        ray_session, llama, prompts, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    ds, _ = generate(tmp_path, llama, prompts, top_k=4, batch_size=8)
    model = AutoModelForCausalLM.from_pretrained(llama).eval()
    tok = AutoTokenizer.from_pretrained(llama)
    for row in list(rows(ds).values())[:4]:
        text = tok.apply_chat_template([{"role": "user", "content": row["prompt"]}],
                                       tokenize=False, add_generation_prompt=True)
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        assert ids[0].tolist() == row["prompt_ids"]
        ref = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=2)
        assert ref[0, ids.shape[1]:].tolist()[:len(row["response_ids"])] == row["response_ids"]
        with torch.no_grad():  # teacher forcing on prompt + response: the stored top-k
            full = torch.tensor([row["prompt_ids"] + row["response_ids"]])
            logp = model(full).logits[0, ids.shape[1] - 1:-1].log_softmax(-1)
        top = logp.topk(4, -1)
        assert top.indices.flatten().tolist() == row["topk_ids"]
        assert np.allclose(top.values.flatten().numpy(), row["topk_logprobs"], atol=1e-4)


def test_bad_input_is_one_clear_error_before_generation(ray_session, llama, prompts, tmp_path):
    with pytest.raises(UserError, match=r"field 'engine'.*'vllm'.*transformers here"):
        generate(tmp_path / "v", llama, prompts, engine="vllm")
    with pytest.raises(UserError, match=r"input 'prompts'.*also the columns \['question'\]"):
        generate(tmp_path / "c", llama, prompts, prompt_column="question")
    plain = lm_tiny.build("gpt2", str(tmp_path / "gpt2"))
    cfg_path = os.path.join(plain, "tokenizer_config.json")
    cfg = json.load(open(cfg_path))
    cfg.pop("chat_template", None)
    json.dump(cfg, open(cfg_path, "w"))
    if os.path.exists(os.path.join(plain, "chat_template.jinja")):
        os.remove(os.path.join(plain, "chat_template.jinja"))
    with pytest.raises(UserError, match=r"field 'chat'.*a tokenizer with a chat template"):
        generate(tmp_path / "t", plain, prompts, chat=True)
    with pytest.raises(Exception, match=r"max_new_tokens"):
        GenerateResponses({"max_new_tokens": 0})


SPEC = """
name: gen_resume
seed: 0
stages:
  prompts: {{kind: load-prompts, config: {{path: {prompts}}}}}
  teacher: {{kind: pretrained-model, config: {{path: {llama}, use: causal-lm}}}}
  responses:
    kind: generate-responses
    config: {{max_new_tokens: 32, batch_size: 2, shard_rows: 4, actors: 1}}
    inputs: {{model: teacher, prompts: prompts}}
"""


def test_killed_mid_generation_resumes_from_its_shards(ray_session, llama, tmp_path):
    qfile = tmp_path / "q.txt"
    qfile.write_text("\n".join(f"question number {i} about `x{i}`" for i in range(40)) + "\n")
    path, store = tmp_path / "p.yaml", str(tmp_path / "store")
    path.write_text(SPEC.format(prompts=qfile, llama=llama))
    p = Pipeline.from_yaml(str(path))
    key = plan(p, store=store).states["responses"].key
    shards = os.path.join(store, "_work", "generate-responses", key, "shards", "responses")
    done = kill_when_sharded(ray_session, path, store, shards, 8)
    assert 8 <= len(done) < 40, len(done)
    result = run(p, store=store, progress=False)
    assert [s.status for s in result.stages] == ["cached", "cached", "ran"]
    metrics = result["responses"].metrics
    assert metrics["rows_resumed"] == len(done) and metrics["rows"] == 40
    st = Store(store)
    m = st.manifest("generate-responses", key)["outputs"]["responses"]
    out = pq.read_table(os.path.join(st.artifact_dir("generate-responses", key),
                                     m["path"])).to_pylist()
    assert len(out) == len({r["id"] for r in out}) == 40
    # the resumed rows are the rows an uninterrupted pass writes
    again, _ = run_stage(LoadPrompts, {"path": str(qfile)}, tmp_path / "pq", "prompts")
    fresh, _ = generate(tmp_path / "fresh", llama, again["prompts"], max_new_tokens=32,
                        batch_size=2)
    assert {r["id"]: r["response_ids"] for r in out} == {
        i: r["response_ids"] for i, r in rows(fresh).items()}

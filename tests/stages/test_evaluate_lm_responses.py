"""evaluate-lm on a teacher's responses (instruction models): tiny teacher -> load-prompts
(with references) -> generate-responses -> evaluate-lm. The teacher against itself agrees
everywhere (KL 0, ROUGE-L 1, the same perplexity); a 2-layer copy of its layers 0 and 2
does not (its generation speed is only checked to be measured: tiny models on a busy
2-core machine time too noisily to compare); ROUGE-L is an LCS F1; bad input is one clear
error."""

import json
import math
import os

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipelines import UserError
from pipelines.stage import Dataset, Model
from stages.evaluate.evaluate_lm import EvaluateLM
from stages.evaluate.lm_responses import lcs, rouge_l
from tests.stages import lm_tiny
from tests.stages.conftest import run_stage

EVAL = {"max_new_tokens": 8, "repeats": 3}


@pytest.fixture(scope="module")
def chain(llm_chain):
    return llm_chain


def evaluate(chain, tmp_path, student, **config):
    return run_stage(EvaluateLM, {**EVAL, **config}, tmp_path, "ev", student=student,
                     teacher=chain["teacher"], data=chain["responses"])[0]["report"]


def test_the_teacher_against_itself_agrees_everywhere(chain, tmp_path):
    report = evaluate(chain, tmp_path, chain["teacher"])
    m = report.metrics()
    assert m["top1_agreement"] == 1.0 and m["rougeL_vs_teacher"] == 1.0
    assert m["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)
    assert m["response_perplexity"] == pytest.approx(m["teacher_response_perplexity"])
    assert m["rougeL_vs_reference"] == pytest.approx(m["teacher_rougeL_vs_reference"])
    assert m["param_ratio"] == 1.0
    info = report.info
    assert info["test_rows"] >= 2 and info["tokens"] > 0 and info["max_new_tokens"] == 8
    assert 0 < info["reference_rows"] <= info["test_rows"]
    ex = info["examples"][0]
    assert ex["teacher"] == ex["student"] and "m" in ex["prompt"] and "reference" in ex
    assert os.path.exists(os.path.join(report.path, "responses.png"))


def test_a_two_layer_student_differs_from_its_teacher(chain, tmp_path):
    from stages.models.text import student_from_teacher
    folder = tmp_path / "student"
    student_from_teacher(chain["teacher"].path, "causal-lm", [0, 2]).save_pretrained(folder)
    from transformers import AutoTokenizer
    AutoTokenizer.from_pretrained(chain["teacher"].path).save_pretrained(folder)
    report = evaluate(chain, tmp_path / "ev", Model(path=str(folder), info={}),
                      max_eval_prompts=6, max_new_tokens=16)
    m = report.metrics()
    print({k: round(v, 4) for k, v in m.items()})
    assert report.info["test_rows"] <= 6
    assert m["top1_agreement"] < 1 and m["kl_to_teacher"] > 0
    assert m["response_perplexity"] > m["teacher_response_perplexity"]
    assert 0 <= m["rougeL_vs_teacher"] <= 1 and 0 <= m["rougeL_vs_reference"] <= 1
    for key in ("student_tokens_per_s", "teacher_tokens_per_s"):
        assert math.isfinite(m[key]) and m[key] > 0
    assert m["generation_speedup"] == pytest.approx(m["student_tokens_per_s"] /
                                                    m["teacher_tokens_per_s"])
    assert m["param_ratio"] < 1


def test_rouge_l_is_the_lcs_f1():
    assert lcs(list("ABCBDAB"), list("BDCABA")) == 4
    assert rouge_l("The cat sat", "the cat  sat") == 1.0
    assert rouge_l("a b c d", "a x c") == pytest.approx(2 * 2 / 7)
    assert rouge_l("a b", "c d") == 0.0 and rouge_l("", "") == 1.0 and rouge_l("a", "") == 0.0


def test_bad_input(chain, tmp_path):
    table = chain["responses"].to_arrow()
    folder = tmp_path / "train_only"
    folder.mkdir()
    pq.write_table(table.filter(pc.field("split") == "train"), folder / "part.parquet")
    train_only = Dataset(path=str(folder), info=chain["responses"].info)
    with pytest.raises(UserError, match=r"stage 'ev' \(evaluate-lm\) input 'data'.*held-out "
                                        r"rows.*0.*test_fraction"):
        run_stage(EvaluateLM, EVAL, tmp_path, "ev", student=chain["teacher"],
                  teacher=chain["teacher"], data=train_only)
    other = lm_tiny.build("llama", str(tmp_path / "other"), layers=2)
    file = tmp_path / "other" / "tokenizer.json"
    vocab = json.loads(file.read_text())
    table = vocab["model"]["vocab"]
    table["Ġt"], table["he"] = table["he"], table["Ġt"]
    file.write_text(json.dumps(vocab))
    with pytest.raises(UserError, match=r"input 'student'.*vocabulary does not match the "
                                        r"teacher's.*different ids"):
        evaluate(chain, tmp_path / "bad", Model(path=other, info={}))
    with pytest.raises(Exception, match="generation_batch_size"):
        EvaluateLM({"generation_batch_size": 0})

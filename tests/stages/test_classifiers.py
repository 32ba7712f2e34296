import json
import os

import pydantic
import pytest
import torch

from pipelines.errors import UserError
from stages.models.classifiers import (ARCHITECTURES, ClassifierArch, ConvNet, MLP,
                                       load_classifier, save_classifier)


@pytest.mark.parametrize("cfg", [dict(arch="convnet", width=8, depth=3, norm="instance"),
                                 dict(arch="mlp", hidden=[16, 8])])
def test_save_load_round_trip(tmp_path, cfg):
    model = ClassifierArch(**cfg).build([1, 8, 8], 10).eval()
    save_classifier(model, str(tmp_path))
    assert {"config.json", "model.safetensors", "classifier.json"} <= set(os.listdir(tmp_path))
    loaded = load_classifier(str(tmp_path))
    assert type(loaded) is ARCHITECTURES[cfg["arch"]]
    x = torch.rand(5, 1, 8, 8)
    torch.testing.assert_close(loaded(x), model(x))
    # the mixin's own from_pretrained rebuilds the same module
    direct = ARCHITECTURES[cfg["arch"]].from_pretrained(str(tmp_path)).eval()
    torch.testing.assert_close(direct(x), model(x))


def test_convnet_shapes():
    for in_shape in ([1, 8, 8], [3, 32, 32], [1, 28, 28]):
        model = ConvNet(in_shape=in_shape, num_classes=7, width=4, depth=4)
        assert model(torch.rand(2, *in_shape)).shape == (2, 7)
    assert MLP(in_shape=[40], num_classes=3, hidden=[])(torch.rand(2, 40)).shape == (2, 3)


def test_bad_arch_name_rejected_by_config():
    with pytest.raises(pydantic.ValidationError, match="'convnet', 'convnet1d' or 'mlp'"):
        ClassifierArch(arch="resnet")


def _assert_user_error(path, *needles):
    with pytest.raises(UserError) as err:
        load_classifier(str(path), where="stage 'student' input 'model'")
    msg = str(err.value)
    assert msg.startswith("stage 'student' input 'model'")
    for needle in needles:
        assert needle in msg, msg
    for name in ARCHITECTURES:
        assert name in msg, msg


def test_bad_model_folder_is_user_error(tmp_path):
    _assert_user_error(tmp_path / "missing", str(tmp_path / "missing"), "does not exist")
    _assert_user_error(tmp_path, str(tmp_path), "config.json")  # empty folder

    save_classifier(MLP(hidden=[4]), str(tmp_path))
    with open(tmp_path / "classifier.json", "w") as f:
        json.dump({"architecture": "resnet18"}, f)
    _assert_user_error(tmp_path, "'resnet18'", "architecture")

"""load-mnist1d (generated locally with make_dataset, never downloaded), ConvNet1D, and the
arch-for-input checks. Small datasets keep it cheap; no Ray."""

import random

import numpy as np
import pytest
import torch

from pipelines.errors import UserError
from stages.data.mnist1d import LoadMNIST1D
from stages.models.classifiers import (ClassifierArch, ConvNet1D, MLP, load_classifier,
                                       save_classifier)
from tests.stages.conftest import run_stage

N = 500  # rows: 50 per class


def load(tmp_path, name, seed=0, **cfg):
    return run_stage(LoadMNIST1D, {"num_samples": N, **cfg}, tmp_path, name, seed=seed)[0]["data"]


@pytest.fixture(scope="module")
def mnist1d(tmp_path_factory):
    return load(tmp_path_factory.mktemp("mnist1d"), "mnist1d")


def test_schema_and_values(mnist1d):
    assert mnist1d.to_arrow().column_names == ["id", "x", "label", "split"]
    cols = mnist1d.to_numpy()
    assert cols["id"].dtype == np.int64 and cols["label"].dtype == np.int64
    assert cols["x"].dtype == np.float32 and cols["x"].shape == (N, 1, 40)
    np.testing.assert_array_equal(cols["id"], np.arange(N))
    np.testing.assert_array_equal(np.bincount(cols["label"]), [N // 10] * 10)
    assert abs(cols["x"].mean()) < 1e-3 and abs(cols["x"].std() - 1) < 1e-3  # standardised
    assert mnist1d.info == {"num_classes": 10, "input_shape": [1, 40]}


def test_matches_make_dataset(mnist1d):
    from mnist1d.data import get_dataset_args, make_dataset
    args = get_dataset_args()
    args.num_samples, args.seed = N, 0
    ref = make_dataset(args)
    cols = mnist1d.to_numpy()
    np.testing.assert_allclose(cols["x"][:, 0], np.concatenate([ref["x"], ref["x_test"]]),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(cols["label"], np.concatenate([ref["y"], ref["y_test"]]))


def test_split_sizes(mnist1d, tmp_path):
    split = mnist1d.to_numpy(["split"])["split"]
    assert (split == "train").sum() == 400 and (split == "test").sum() == 100
    assert (split[:400] == "train").all()  # the package's split: train rows first
    half = load(tmp_path, "half", test_fraction=0.5).to_numpy()
    assert (half["split"] == "test").sum() == 250
    # the rows and their ids do not depend on the split
    np.testing.assert_array_equal(half["x"], mnist1d.to_numpy(["x"])["x"])
    big = load(tmp_path, "big", num_samples=1000).to_numpy(["id", "split"])
    assert len(big["id"]) == 1000 and (big["split"] == "test").sum() == 200


def test_deterministic_per_seed_and_no_global_rng_side_effect(mnist1d, tmp_path):
    np.random.seed(123)
    random.seed(123)
    before = np.random.get_state()[1].copy(), random.getstate()
    same = load(tmp_path, "again").to_numpy()
    np.testing.assert_array_equal(np.random.get_state()[1], before[0])
    assert random.getstate() == before[1]
    ref = mnist1d.to_numpy()
    for k in ("id", "x", "label", "split"):
        np.testing.assert_array_equal(same[k], ref[k])
    other = load(tmp_path, "other", seed=1).to_numpy()
    np.testing.assert_array_equal(other["id"], ref["id"])
    assert not np.allclose(other["x"], ref["x"])


@pytest.mark.parametrize("norm", ["batch", "instance", "none"])
def test_convnet1d_shapes(norm):
    for in_shape, depth in (([1, 40], 3), ([2, 17], 2), ([1, 4], 4)):  # pools stop at length 1
        model = ConvNet1D(in_shape=in_shape, num_classes=7, width=4, depth=depth, norm=norm)
        assert model(torch.rand(3, *in_shape)).shape == (3, 7)


@pytest.mark.parametrize("cfg", [dict(arch="convnet1d", width=8, depth=3, norm="instance"),
                                 dict(arch="convnet1d", width=4, depth=2, norm="batch"),
                                 dict(arch="mlp", hidden=[16])])
def test_save_load_round_trip_on_1d_input(tmp_path, cfg):
    model = ClassifierArch(**cfg).build([1, 40], 10)
    model.train()(torch.rand(8, 1, 40))  # move batch-norm running stats off their init
    model.eval()
    save_classifier(model, str(tmp_path))
    loaded = load_classifier(str(tmp_path))
    assert type(loaded) is type(model)
    x = torch.rand(5, 1, 40)
    torch.testing.assert_close(loaded(x), model(x))


def test_mlp_flattens_1d_input():
    model = ClassifierArch(arch="mlp", hidden=[8]).build([1, 40], 10)
    assert isinstance(model, MLP) and model(torch.rand(2, 1, 40)).shape == (2, 10)


@pytest.mark.parametrize("arch, in_shape, needles", [
    ("convnet", [1, 40], ["'convnet'", "[1, 40]", "(channels, height, width)", "'convnet1d'"]),
    ("convnet1d", [1, 8, 8], ["'convnet1d'", "[1, 8, 8]", "(channels, length)", "'convnet'"]),
    ("convnet1d", [40], ["'convnet1d'", "[40]", "'mlp'"]),
])
def test_wrong_arch_for_input_is_user_error(arch, in_shape, needles):
    with pytest.raises(UserError) as err:
        ClassifierArch(arch=arch).build(in_shape, 10, "stage 'teacher' input 'data'")
    msg = str(err.value)
    assert msg.startswith("stage 'teacher' input 'data'")
    for needle in needles:
        assert needle in msg, msg

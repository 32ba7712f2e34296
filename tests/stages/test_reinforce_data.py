import re

import numpy as np
import pytest

from pipelines.context import StageContext
from pipelines.errors import UserError
from stages.distill.reinforce_data import ReinforceData, augment_view, expand_views
from stages.models.classifiers import load_classifier, predict_logits
from stages.train.kd_student import KDStudent
from tests.stages.conftest import KD_CONFIG, run_stage
from stages.models.classifiers import ARCHITECTURES

ALLOWED = ", ".join(sorted(ARCHITECTURES))  # taken from the code, as the message does

VIEWS = 3
CONFIG = {"views": VIEWS, "max_shift": 1, "noise_std": 0.05, "actors": 2, "batch_size": 500}


@pytest.fixture(scope="module")
def reinforced(ray_session, teacher, digits, tmp_path_factory):
    """The one Ray Data run of the stage in this module."""
    return run_stage(ReinforceData, CONFIG, tmp_path_factory.mktemp("reinforce"), "reinforce",
                     seed=7, model=teacher, data=digits)[0]["signal"]


def test_views_of_every_train_row_with_the_teachers_logits(reinforced, teacher, digits):
    out, src = reinforced.to_numpy(), digits.to_numpy()
    assert set(out) == {"id", "view", "x", "label", "split", "logits"}
    train = src["split"] == "train"
    assert len(out["id"]) == VIEWS * train.sum() + (~train).sum()
    expected_pairs = sorted([(i, v) for i in src["id"][train] for v in range(VIEWS)] +
                            [(i, 0) for i in src["id"][~train]])
    assert sorted(zip(out["id"].tolist(), out["view"].tolist())) == expected_pairs
    assert set(out["split"][out["view"] > 0]) == {"train"}
    # view 0 and test rows are the inputs themselves; other views are the augment function's
    by_id = {i: n for n, i in enumerate(src["id"])}
    src_row = np.array([by_id[i] for i in out["id"]])
    np.testing.assert_array_equal(out["label"], src["label"][src_row])
    np.testing.assert_array_equal(out["split"], src["split"][src_row])
    first = out["view"] == 0
    np.testing.assert_array_equal(out["x"][first], src["x"][src_row[first]])
    for n in np.flatnonzero(~first)[:20]:
        again = augment_view(src["x"][src_row[n]], 7, out["id"][n], out["view"][n], 1, 0.05)
        np.testing.assert_array_equal(out["x"][n], again)
    assert not np.array_equal(out["x"][~first], src["x"][src_row[~first]])
    # the stored logits are the teacher's on the stored (augmented) x
    assert out["logits"].dtype == np.float32 and out["logits"].shape == (len(out["id"]), 10)
    expected = predict_logits(load_classifier(teacher.path), out["x"]).numpy()
    np.testing.assert_allclose(out["logits"], expected, rtol=1e-5, atol=1e-5)
    assert reinforced.info == {
        "signal": "logits", "precision": "float32", "num_classes": 10, "views": VIEWS,
        "augmentations": {"max_shift": 1, "noise_std": 0.05, "include_original": True,
                          "seed": 7},
        "input_shape": [1, 8, 8]}


def test_kd_student_accepts_the_signal(reinforced, tmp_path):
    ctx = StageContext.for_testing(tmp_path, name="student", kind="kd-student")
    meta = KDStudent(KD_CONFIG)._check_signal(ctx, reinforced)
    assert meta["signal"] == "logits" and meta["views"] == reinforced.info["views"]
    assert (meta["num_classes"], meta["input_shape"]) == (10, [1, 8, 8])


def test_augmentation_is_a_function_of_seed_id_and_view():
    x = np.random.default_rng(0).random((1, 8, 8)).astype(np.float32)
    x.setflags(write=False)  # Ray Data hands read-only views
    a = augment_view(x, 0, 5, 1, max_shift=2, noise_std=0.1)
    np.testing.assert_array_equal(a, augment_view(x, 0, 5, 1, max_shift=2, noise_std=0.1))
    assert a.dtype == np.float32 and a.shape == x.shape
    for other in [(0, 5, 2), (0, 6, 1), (1, 5, 1)]:  # another view, id or seed
        assert not np.array_equal(a, augment_view(x, *other, max_shift=2, noise_std=0.1))
    np.testing.assert_array_equal(augment_view(x, 0, 5, 0, 2, 0.1), x)
    assert not np.array_equal(augment_view(x, 0, 5, 0, 2, 0.1, include_original=False), x)
    # a pure shift moves pixels, zero-filled at the border
    shifted = augment_view(x, 0, 5, 1, max_shift=1, noise_std=0.0)
    assert any(np.array_equal(shifted[0, max(dy, 0):8 + min(dy, 0), max(dx, 0):8 + min(dx, 0)],
                              x[0, max(-dy, 0):8 + min(-dy, 0), max(-dx, 0):8 + min(-dx, 0)])
               for dy in (-1, 0, 1) for dx in (-1, 0, 1))


def test_expand_views_batch():
    batch = {"id": np.array([3, 4]), "x": np.ones((2, 1, 4, 4), np.float32),
             "label": np.array([1, 2]), "split": np.array(["train", "test"])}
    out = expand_views(batch, seed=0, views=3, max_shift=1, noise_std=0.1,
                       include_original=True)
    assert out["id"].tolist() == [3, 3, 3, 4] and out["view"].tolist() == [0, 1, 2, 0]
    assert out["split"].tolist() == ["train"] * 3 + ["test"]
    assert out["x"].shape == (4, 1, 4, 4)
    np.testing.assert_array_equal(out["x"][[0, 3]], batch["x"])
    np.testing.assert_array_equal(out["x"][2], augment_view(batch["x"][0], 0, 3, 2, 1, 0.1))


def test_bad_model_folder_fails_before_any_work(tmp_path, digits):
    with pytest.raises(UserError, match=r"stage 'bad' \(reinforce-data\) input 'model'.*"
                                        + re.escape(ALLOWED)):
        run_stage(ReinforceData, {}, tmp_path, "bad",
                  model=type(digits)(path=str(tmp_path / "nope")), data=digits)


@pytest.mark.parametrize("bad", [{"views": 0}, {"max_shift": -1}, {"noise_std": -0.1},
                                 {"precision": "bf16"}])
def test_config_bounds(bad):
    with pytest.raises(ValueError):
        ReinforceData(bad)


def test_one_dimensional_signals_shift_along_their_length():
    """(C, L) inputs (MNIST-1D) shift along L; the channel axis is never shifted away."""
    x = np.arange(1, 41, dtype=np.float32).reshape(1, 40)
    offsets = set()
    for view in range(1, 30):
        v = augment_view(x, 0, 5, view, max_shift=3, noise_std=0.0)
        assert v.shape == (1, 40)
        # a shifted copy: some offset d in [-3, 3] maps it back onto x, zeros filling in
        matches = [d for d in range(-3, 4)
                   if np.array_equal(v[0], np.concatenate([x[0, d:], np.zeros(d)]) if d >= 0
                                     else np.concatenate([np.zeros(-d), x[0, :d]]))]
        assert len(matches) == 1
        offsets.add(matches[0])
    assert len(offsets) > 3  # the offsets vary across views

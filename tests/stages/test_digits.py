import numpy as np
from sklearn.datasets import load_digits

from stages.data.digits import LoadDigits
from tests.stages.conftest import run_stage


def test_schema_and_values(digits):
    table = digits.to_arrow()
    assert table.column_names == ["id", "x", "label", "split"]
    cols = digits.to_numpy()
    assert cols["id"].dtype == np.int64 and cols["label"].dtype == np.int64
    assert cols["x"].dtype == np.float32 and cols["x"].shape == (1797, 1, 8, 8)
    assert cols["x"].min() == 0.0 and cols["x"].max() == 1.0
    np.testing.assert_array_equal(cols["id"], np.arange(1797))
    ref = load_digits()  # ids are the scikit-learn row index
    np.testing.assert_array_equal(cols["label"], ref.target)
    np.testing.assert_allclose(cols["x"][:, 0] * 16, ref.images)
    assert digits.info == {"num_classes": 10, "input_shape": [1, 8, 8]}


def test_split_is_stratified(digits):
    cols = digits.to_numpy(["label", "split"])
    assert set(cols["split"]) == {"train", "test"}
    test = cols["split"] == "test"
    assert abs(test.mean() - 0.2) < 0.01
    for c in range(10):
        assert abs(test[cols["label"] == c].mean() - 0.2) < 0.03


def test_split_is_deterministic_per_seed(digits, tmp_path):
    def split(name, seed=0, **cfg):
        data = run_stage(LoadDigits, cfg, tmp_path, name, seed=seed)[0]["data"]
        return data.to_numpy(["split"])["split"]

    same = split("again")
    np.testing.assert_array_equal(same, digits.to_numpy(["split"])["split"])
    assert (split("other", seed=1) != same).any()
    assert abs((split("half", test_fraction=0.5) == "test").mean() - 0.5) < 0.01

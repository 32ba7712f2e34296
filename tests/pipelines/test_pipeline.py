"""Building and validating pipelines (no Ray): every bad input is one clear UserError."""

import pytest

from pipelines import Dataset, Pipeline, Report, Stage, StageConfig, UserError
from pipelines.stage import register, registry, unregister
from tests.pipelines import toy_stages  # noqa: F401  (registers test kinds)


def spec(**stages):
    return {"name": "t", "seed": 0, "stages": stages}


NUMS = {"kind": "test-numbers", "config": {"n": 10}}


def build(d, overrides=()):
    return Pipeline.from_dict(d, overrides)


def error(d, overrides=()):
    with pytest.raises(UserError) as e:
        build(d, overrides)
    return str(e.value)


def test_valid_pipeline_orders_and_wires():
    p = build(spec(sum={"kind": "test-summarize", "inputs": {"a": "x2", "b": "x3.scaled"}},
                   x2={"kind": "test-scale", "inputs": {"numbers": "nums"}},
                   x3={"kind": "test-scale", "config": {"factor": 3}, "inputs": {"numbers": "nums"}},
                   nums=NUMS))
    order = p.order()
    assert order.index("nums") < order.index("x2") < order.index("sum")
    assert p.nodes["sum"].inputs == {"a": ("x2", "scaled"), "b": ("x3", "scaled")}
    assert p.downstream("nums") == {"x2", "x3", "sum"}
    assert Pipeline.from_dict(p.to_dict()).to_dict() == p.to_dict()


def test_unknown_kind_did_you_mean():
    msg = error(spec(nums={"kind": "test-number"}))
    assert "stage 'nums'" in msg and "'test-number'" in msg
    assert "did you mean 'test-numbers'" in msg and "test-scale" in msg


def test_unknown_config_key_did_you_mean_lists_fields():
    msg = error(spec(nums={"kind": "test-numbers", "config": {"nn": 3}}))
    assert "stage 'nums' (test-numbers)" in msg and "unknown field 'nn'" in msg
    assert "did you mean 'n'" in msg and "allowed fields: api_token, n, sleep" in msg


def test_mistyped_config_value():
    msg = error(spec(nums={"kind": "test-numbers", "config": {"n": "many"}}))
    assert "field 'n'" in msg and "'many'" in msg and "integer" in msg


def test_input_naming_missing_stage():
    msg = error(spec(nums=NUMS, x={"kind": "test-scale", "inputs": {"numbers": "numz"}}))
    assert "stage 'x' (test-scale)" in msg and "'numz'" in msg and "did you mean 'nums'" in msg


def test_missing_and_unknown_inputs():
    assert "input 'numbers' (dataset) is not wired" in error(spec(x={"kind": "test-scale"}))
    msg = error(spec(nums=NUMS, x={"kind": "test-scale", "inputs": {"numbers": "nums", "nmbrs": "nums"}}))
    assert "unknown input 'nmbrs'" in msg and "allowed inputs: numbers" in msg


def test_unknown_output_and_wrong_artifact_type():
    msg = error(spec(nums=NUMS, x={"kind": "test-scale", "inputs": {"numbers": "nums.rows"}}))
    assert "has no output 'rows'" in msg and "outputs: numbers" in msg

    class TakesReport(Stage):
        kind = "test-takes-report"
        version = "1"
        inputs = {"report": Report}
        outputs = {"out": Dataset}

    try:
        msg = error(spec(nums=NUMS, r={"kind": "test-takes-report", "inputs": {"report": "nums"}}))
        assert "input 'report' needs a report, but 'nums.numbers' is a dataset" in msg
    finally:
        unregister("test-takes-report")


def test_optional_input_may_be_left_unwired_and_is_checked_when_wired():
    from pipelines._internal.planner import stage_states

    class Refine(Stage):
        kind = "test-refine"
        version = "1"
        inputs = {"numbers": Dataset}
        optional_inputs = {"init": Dataset}
        outputs = {"out": Dataset}

    try:
        p = build(spec(nums=NUMS, r={"kind": "test-refine", "inputs": {"numbers": "nums"}},
                       r2={"kind": "test-refine", "inputs": {"numbers": "nums", "init": "r"}}))
        assert p.nodes["r"].inputs == {"numbers": ("nums", "numbers")}
        assert p.nodes["r2"].inputs == {"numbers": ("nums", "numbers"), "init": ("r", "out")}
        assert p.order().index("r") < p.order().index("r2")
        keys = stage_states(p)
        assert set(keys["r"].inputs) == {"numbers"} and set(keys["r2"].inputs) == {"numbers", "init"}
        assert keys["r"].key != keys["r2"].key  # the wired optional input is in the key
        msg = error(spec(nums=NUMS, r={"kind": "test-refine",
                                       "inputs": {"numbers": "nums", "int": "nums"}}))
        assert "unknown input 'int'" in msg and "did you mean 'init'" in msg
        assert "allowed inputs: numbers, init" in msg or "allowed inputs: init, numbers" in msg
        assert "names stage 'numz'" in error(spec(nums=NUMS, r={
            "kind": "test-refine", "inputs": {"numbers": "nums", "init": "numz"}}))
        assert "input 'numbers' (dataset) is not wired" in error(spec(
            nums=NUMS, r={"kind": "test-refine", "inputs": {"init": "nums"}}))
    finally:
        unregister("test-refine")
    with pytest.raises(TypeError, match="both in inputs and in optional_inputs"):
        class Twice(Stage):  # noqa: F841
            kind = "test-twice"
            version = "1"
            inputs = {"a": Dataset}
            optional_inputs = {"a": Dataset}
            outputs = {"out": Dataset}


def test_cycle_is_reported_with_its_path():
    msg = error(spec(a={"kind": "test-scale", "inputs": {"numbers": "b"}},
                     b={"kind": "test-scale", "inputs": {"numbers": "a"}}))
    assert "cycle" in msg and ("a -> b -> a" in msg or "b -> a -> b" in msg)


def test_bad_top_level_keys_and_stage_entry_keys():
    assert "unknown field 'stagez'" in error({"name": "t", "stagez": {}})
    msg = error(spec(nums={"kind": "test-numbers", "confg": {}}))
    assert "unknown field 'stages.nums.confg'" in msg and "did you mean 'config'" in msg


def test_overrides_validated_against_config():
    p = build(spec(nums=NUMS), ["nums.n=7"])
    assert p.nodes["nums"].stage.config.n == 7
    p = build(spec(nums=NUMS), ["nums.sleep=1e-3"])
    assert p.nodes["nums"].stage.config.sleep == 0.001
    msg = error(spec(nums=NUMS), ["nums.nn=7"])
    assert "--set nums.nn=7" in msg and "no config field 'nn'" in msg and "did you mean 'n'" in msg
    assert "no stage 'numz'" in error(spec(nums=NUMS), ["numz.n=7"])
    assert "expected stage.field=value" in error(spec(nums=NUMS), ["nums"])
    msg = error(spec(nums=NUMS), ["nums.n=abc"])
    assert "field 'n'" in msg and "'abc'" in msg


def test_resources_override_validated():
    p = build(spec(nums=NUMS | {"resources": {"max_retries": 2}}))
    assert p.nodes["nums"].effective_resources.max_retries == 2
    assert "unknown field 'gpus'" in error(spec(nums=NUMS | {"resources": {"gpus": 1}}))
    msg = error(spec(nums=NUMS | {"resources": {"num_cpus": -1}}))
    assert "stage 'nums' (test-numbers): resources: field 'num_cpus': value -1" in msg


def test_python_builder_validates_each_add():
    p = Pipeline("py").add("nums", "test-numbers", {"n": 3})
    with pytest.raises(UserError, match="names stage 'later'"):
        p.add("x", "test-scale", inputs={"numbers": "later"})
    with pytest.raises(UserError, match="used twice"):
        Pipeline("py").add("a", "test-numbers").add("a", "test-numbers")
    with pytest.raises(UserError, match="name 'bad name'"):
        Pipeline("bad name")


def test_registry_never_silently_overwrites():
    class Numbers2(Stage):
        kind = "test-dup"
        version = "1"
        outputs = {"out": Dataset}

    try:
        with pytest.raises(TypeError, match="already registered"):
            class Other(Stage):
                kind = "test-dup"
                version = "1"
                outputs = {"out": Dataset}
        assert registry()["test-dup"] is Numbers2
        assert register(Numbers2) is Numbers2  # the same class again is fine
    finally:
        unregister("test-dup")


def test_stage_declaration_checked_at_definition():
    with pytest.raises(TypeError, match="Artifact type"):
        class Bad(Stage):
            kind = "test-bad"
            version = "1"
            outputs = {"out": dict}


def test_config_rejects_unknown_keys_and_is_frozen():
    class C(StageConfig):
        a: int = 1
    with pytest.raises(Exception):
        C(b=2)
    with pytest.raises(Exception):
        C().a = 3


def test_a_variadic_input_takes_a_list_of_stages():
    p = build(spec(a=NUMS, b=NUMS, half={"kind": "test-scale", "inputs": {"numbers": "a"}},
                   count={"kind": "test-count-many",
                          "inputs": {"parts": ["a", "b.numbers", "half"]}}))
    assert p.nodes["count"].inputs["parts"] == [("a", "numbers"), ("b", "numbers"),
                                                ("half", "scaled")]
    assert p.order().index("count") == 3 and p.upstream("count") == {"a", "b", "half"}
    again = Pipeline.from_dict(p.to_dict())
    assert again.nodes["count"].inputs == p.nodes["count"].inputs


def test_a_variadic_input_wired_to_one_name_or_a_wrong_type_is_refused():
    msg = error(spec(a=NUMS, count={"kind": "test-count-many", "inputs": {"parts": "a"}}))
    assert "stage 'count' (test-count-many): input 'parts' takes any number of datasets, " \
           "wired as a list; got 'a'" in msg
    msg = error(spec(a=NUMS, r={"kind": "test-summarize", "inputs": {"a": "a", "b": "a"}},
                     count={"kind": "test-count-many", "inputs": {"parts": ["a", "r"]}}))
    assert "input 'parts' needs a dataset, but 'r.report' is a report" in msg
    msg = error(spec(a=NUMS, count={"kind": "test-count-many", "inputs": {"parts": ["a", "a"]}}))
    assert "names stage(s) ['a'] twice" in msg

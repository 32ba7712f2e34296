"""Cache keys and plan decisions: pure functions, no Ray."""

from pipelines._internal.plan import (StageState, cache_key, code_warning, config_diff, decide,
                                      should_retry)


def state(**kw):
    base = dict(name="student", kind="kd-student", version="1", config={"lr": 0.1, "t": 4.0},
                seed=0, inputs={"signal": "abc/signal"}, upstream={"signal": "teacher"})
    base.update(kw)
    return StageState(**base)


def test_key_is_stable_and_ignores_dict_order():
    a = cache_key("k", "1", {"a": 1, "b": {"c": 2, "d": 3}}, 0, {"x": "k1/o"})
    b = cache_key("k", "1", {"b": {"d": 3, "c": 2}, "a": 1}, 0, {"x": "k1/o"})
    assert a == b and len(a) == 64


def test_key_changes_with_every_component():
    base = cache_key("k", "1", {"a": 1}, 0, {"x": "k1/o"})
    variants = [cache_key("k2", "1", {"a": 1}, 0, {"x": "k1/o"}),
                cache_key("k", "2", {"a": 1}, 0, {"x": "k1/o"}),
                cache_key("k", "1", {"a": 2}, 0, {"x": "k1/o"}),
                cache_key("k", "1", {"a": 1.0001}, 0, {"x": "k1/o"}),
                cache_key("k", "1", {"a": 1}, 1, {"x": "k1/o"}),
                cache_key("k", "1", {"a": 1}, 0, {"x": "k2/o"}),
                cache_key("k", "1", {"a": 1}, 0, {"x": "k1/p"}),
                cache_key("k", "1", {"a": 1}, 0, {"y": "k1/o"})]
    assert len({base, *variants}) == len(variants) + 1


def test_committed_is_cached_forced_is_run():
    s = state()
    assert decide(s, True, False, None, set()).status == "cached"
    d = decide(s, True, True, s.to_record(), set())
    assert (d.status, d.reason) == ("run", "forced (--force)")


def test_never_run():
    assert decide(state(), False, False, None, set()).reason == "never run"


def test_reason_names_changed_config_fields():
    prev = state().to_record()
    d = decide(state(config={"lr": 0.1, "t": 2.0}), False, False, prev, set())
    assert d.status == "run"
    assert d.reason == "config changed: t 4.0 -> 2.0"


def test_reason_version_seed_and_input():
    prev = state().to_record()
    assert "version changed: 1 -> 2" in decide(state(version="2"), False, False, prev, set()).reason
    assert "seed changed: 0 -> 3" in decide(state(seed=3), False, False, prev, set()).reason
    d = decide(state(inputs={"signal": "zzz/signal"}), False, False, prev, {"teacher"})
    assert d.reason == "input changed: signal (upstream 'teacher' re-runs)"


def test_reason_when_artifact_was_deleted():
    s = state()
    d = decide(s, False, False, s.to_record(), set())
    assert d.status == "run" and d.reason.startswith("artifact missing")


def test_config_diff_nested_and_unset():
    assert config_diff({"a": {"b": 1}}, {"a": {"b": 2}, "c": 3}) == ["a.b 1 -> 2", "c '<unset>' -> 3"]


def test_code_warning_only_when_code_changed_under_same_version():
    m = {"kind": "k", "version": "1", "code_hash": "aaa"}
    assert code_warning("s", m, "aaa") is None
    w = code_warning("s", m, "bbb")
    assert "version is still '1'" in w and "--force s" in w


def test_retry_system_and_code_failures_within_budget_never_user_or_nan():
    assert should_retry("system", 0, 1) and should_retry("error", 1, 2)
    assert not should_retry("system", 1, 1)
    assert not should_retry("error", 0, 0)
    for kind in ("user", "deterministic"):
        assert not should_retry(kind, 0, 5)

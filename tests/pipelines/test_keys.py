"""The key rules: execution settings out of the key (for every stage that declares them),
the ones a config keeps in it with why, and local folders read by path keyed by content."""

import os
import typing

import pytest

from pipelines import Pipeline, Stage, StageConfig, UserError, plan, registry
from pipelines._internal.content import content_checksum
from pipelines._internal.plan import StageState, decide
from pipelines._internal.planner import stage_states
from pipelines.artifacts import Report
from pipelines.stage import register, unregister


def other_value(cfg, name):
    """(the config with ``name`` changed, its value, the config it is compared with): a
    valid value of execution field ``name`` other than the current one; a choice that
    needs a worker (fsdp) is compared with the same config on one worker."""
    value = getattr(cfg, name)
    annotation = type(cfg).model_fields[name].annotation
    if isinstance(value, bool):
        options = (not value,)
    elif typing.get_origin(annotation) is typing.Literal:  # another choice: ddp -> fsdp
        options = typing.get_args(annotation)
    elif isinstance(value, str):  # a named choice ("auto"): numbers instead
        options = (2, 1)
    else:
        options = ((value or 1) * 2, (value or 0) + 1, 1, 2)
    for candidate in options:
        if candidate == value:
            continue
        # a choice may need a worker to run on (fsdp): num_workers is execution too
        for extra in ({}, {"num_workers": 1}):
            try:
                base = type(cfg)(**(cfg.model_dump() | extra))
                return type(cfg)(**(base.model_dump() | {name: candidate})), candidate, base
            except ValueError:
                continue
    raise AssertionError(f"no other valid value of {name}")


def key_of(kind, cfg):
    keyed, execution, kept = cfg.split_execution()
    return StageState("s", kind, registry()[kind].version, keyed, 0, {"x": "k/o"},
                      execution=execution, kept=kept).key


KINDS = sorted(k for k, cls in registry().items() if cls.Config.execution_fields())


def test_every_inference_and_training_stage_declares_execution_settings():
    must = {"teacher-outputs", "reinforce-data", "diffusion-trajectories", "kd-student",
            "fit-classifier", "fit-causal-lm", "fit-diffusion-teacher", "consistency-distill",
            "progressive-distill", "reflow"}
    assert must <= set(KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_execution_settings_leave_the_key_unless_kept(kind):
    cls = registry()[kind]
    try:
        cfg = cls.Config()
    except ValueError:
        pytest.skip(f"{kind} has no default config")
    base = key_of(kind, cfg)
    _, _, kept = cfg.split_execution()
    for name in cls.Config.execution_fields():
        changed, value, compared = other_value(cfg, name)
        same = key_of(kind, changed) == key_of(kind, compared)
        assert same == (name not in kept), (kind, name, value, kept)
    # a semantic field still changes the key (a number, or else another Literal choice)
    fields = [(n, f) for n, f in cls.Config.model_fields.items()
              if n not in cls.Config.execution_fields()]
    number = next((n for n, f in fields if f.annotation in (int, float)), None)
    if number is not None:
        update = {number: getattr(cfg, number) + 1}
    else:
        name, choices = next((n, typing.get_args(f.annotation)) for n, f in fields
                             if typing.get_origin(f.annotation) is typing.Literal)
        update = {name: next(c for c in choices if c != getattr(cfg, name))}
    changed = type(cfg)(**(cfg.model_dump() | update))
    assert key_of(kind, changed) != base, (kind, update)


def test_kd_student_keeps_num_workers_where_its_rows_stream_or_dropout_stays():
    cls = registry()["kd-student"]
    assert cls.Config().split_execution()[2] == {}
    assert "stream" in cls.Config(in_memory_mib=0).split_execution()[2]["num_workers"]
    assert "dropout" in cls.Config(dropout=None).split_execution()[2]["num_workers"]


def test_batch_norm_keeps_num_workers_in_the_key_and_says_why():
    cls = registry()["fit-classifier"]
    cfg = cls.Config(arch="convnet", norm="batch", num_workers=1)
    assert "BatchNorm" in cfg.split_execution()[2]["num_workers"]
    two = cls.Config(arch="convnet", norm="batch", num_workers=2)
    assert key_of("fit-classifier", cfg) != key_of("fit-classifier", two)
    states = [StageState("t", "fit-classifier", "3", c.split_execution()[0], 0, {},
                         execution=c.split_execution()[1], kept=c.split_execution()[2])
              for c in (cfg, two)]
    d = decide(states[1], False, False, states[0].to_record(), set())
    assert d.status == "run" and "num_workers 1 -> 2 (an execution setting kept in the key: " \
        "BatchNorm" in d.reason
    none = cls.Config(arch="convnet", norm="none", num_workers=1)
    assert key_of("fit-classifier", none) == key_of(
        "fit-classifier", cls.Config(arch="convnet", norm="none", num_workers=2))


def test_an_execution_setting_is_validated_like_any_field():
    # one line for a union field (a number or auto), naming both what it may be
    with pytest.raises(UserError, match=r"teacher-outputs.*field 'actors': value 0 is not "
                                        r"valid: .*greater than or equal to 1 or .*'auto'$"):
        Pipeline.from_dict({"stages": {"t": {"kind": "teacher-outputs",
                                             "config": {"actors": 0}}}})


class ReadFolder(Stage):
    kind = "test-read-folder"
    version = "1"

    class Config(StageConfig):
        path: str

    outputs = {"report": Report}

    def content_paths(self):
        return {"path": self.config.path}

    def run(self, ctx):
        return {"report": ctx.write_report("report", {"files": len(os.listdir(self.config.path))})}


@pytest.fixture
def read_folder():
    register(ReadFolder)
    yield ReadFolder
    unregister(ReadFolder.kind)


def test_a_folder_read_by_path_is_keyed_by_its_content(read_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    p = Pipeline("folder")
    p.add("read", "test-read-folder", {"path": str(folder)})
    first = stage_states(p)["read"]
    assert stage_states(p)["read"].key == first.key
    (folder / "weights.bin").write_bytes(b"\0" * 10)
    second = stage_states(p)["read"]
    assert second.key != first.key
    d = decide(second, False, False, first.to_record(), set())
    assert d.reason == "content changed: the files 'path' names"
    (folder / "weights.bin").write_bytes(b"\1" * 10)  # same size, new bytes
    os.utime(folder / "weights.bin", ns=(1, 1))
    assert stage_states(p)["read"].key not in (first.key, second.key)
    (folder / "weights.bin").unlink()
    assert stage_states(p)["read"].key == first.key


def test_a_missing_folder_is_one_clear_error(read_folder, tmp_path):
    p = Pipeline("folder")
    p.add("read", "test-read-folder", {"path": str(tmp_path / "nope")})
    with pytest.raises(UserError, match=r"stage 'read' \(test-read-folder\): field 'path': "
                                        r".*nope' cannot be read .*allowed: an existing"):
        plan(p, store=str(tmp_path / "store"))


def test_content_checksums_are_remembered_by_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_CACHE_DIR", str(tmp_path / "cache"))
    f = tmp_path / "prompts.txt"
    f.write_text("a cat")
    first = content_checksum(str(f))
    calls = []
    import pipelines._internal.content as content
    real = content.sha256_of
    monkeypatch.setattr(content, "sha256_of", lambda p: calls.append(p) or real(p))
    assert content_checksum(str(f)) == first and calls == []  # remembered
    f.write_text("a dog")
    assert content_checksum(str(f)) != first and calls == [os.path.realpath(f)]


def test_a_sweep_over_an_execution_setting_is_refused():
    from pipelines._internal.sweep_space import parse_space
    from tests.pipelines import toy_stages  # noqa: F401
    p = Pipeline.from_dict({"stages": {
        "nums": {"kind": "test-numbers"},
        "double": {"kind": "test-scale", "inputs": {"numbers": "nums"}}}})
    with pytest.raises(UserError, match=r"key 'double.threads': 'threads' is an execution "
                                        r"setting of test-scale.*every trial would share one "
                                        r"artifact"):
        parse_space({"double.threads": {"choice": [1, 2]}}, p)


def test_a_field_added_later_is_keyed_only_away_from_its_default():
    """An artifact made before a field existed stays a cache hit while the field keeps its
    default (which computes what the kind did before); any other value is keyed."""

    class Before(StageConfig):
        lr: float = 0.1

    class After(StageConfig):
        added = ("ema",)
        lr: float = 0.1
        ema: float | None = None

    assert After().split_execution()[0] == Before().split_execution()[0] == {"lr": 0.1}
    assert After(ema=0.9).split_execution()[0] == {"lr": 0.1, "ema": 0.9}
    assert After(ema=None, lr=0.2).split_execution()[0] == {"lr": 0.2}


@pytest.mark.parametrize("kind", sorted(k for k, c in registry().items() if c.Config.added_fields()))
def test_added_fields_name_fields_of_the_config(kind):
    cfg = registry()[kind].Config
    assert set(cfg.added_fields()) <= set(cfg.model_fields), kind

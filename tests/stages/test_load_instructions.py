"""load-instructions: prompts about the standard library with their docstrings as the
reference, the load-prompts columns, a split by module, a deterministic max_rows sample,
chat prompts, a module filter, one clear error per bad input; and load-prompts'
reference_column."""

import importlib
import json
import platform

import pydantic
import pytest

from pipelines import UserError
from stages.data.load_instructions import LoadInstructions
from stages.data.load_prompts import LoadPrompts
from stages.data.tables import stable_id
from tests.stages.conftest import run_stage


def load(root, config):
    out, ctx = run_stage(LoadInstructions, config, root, "prompts")
    return out["prompts"], ctx


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The default config over the whole standard library."""
    return load(tmp_path_factory.mktemp("full"), {})


def test_prompts_name_their_object_and_the_columns_are_load_prompts(full):
    data, ctx = full
    cols = data.to_numpy()
    assert set(cols) == {"id", "prompt", "reference", "module", "name", "split"}
    n = len(cols["id"])
    assert n > 1000 and ctx.metrics["prompts"] == n
    assert list(cols["id"]) == sorted(stable_id(p) for p in cols["prompt"])
    assert len(set(cols["prompt"])) == n
    for prompt, name, module, ref in zip(cols["prompt"], cols["name"], cols["module"],
                                         cols["reference"]):
        assert f"`{name}`" in prompt
        assert name.split(".")[0] == module and not any(p.startswith("_")
                                                        for p in name.split("."))
        assert 5 <= len(ref.split()) <= 80 and ref == " ".join(ref.split())
    info = data.info
    assert info["text_column"] == "prompt"
    assert info["python_version"] == platform.python_version()
    assert info["source"] == "python standard library docstrings"
    assert (info["train"], info["test"]) == (ctx.metrics["train"], ctx.metrics["test"])


def test_the_split_is_by_module_and_near_test_fraction(full):
    data, ctx = full
    cols = data.to_numpy()
    sides: dict[str, set] = {}
    for module, split in zip(cols["module"], cols["split"]):
        sides.setdefault(module, set()).add(split)
    assert all(len(s) == 1 for s in sides.values())  # no module on both sides
    test_modules = sorted(m for m, s in sides.items() if s == {"test"})
    assert test_modules == data.info["test_modules"]
    assert ctx.metrics["modules"] == len(sides)
    assert 0.04 < len(test_modules) / len(sides) < 0.2
    assert 0.02 < ctx.metrics["test"] / ctx.metrics["prompts"] < 0.3
    assert ctx.metrics["train"] + ctx.metrics["test"] == ctx.metrics["prompts"]


def test_max_rows_is_the_smallest_id_subset_and_deterministic(full, tmp_path):
    whole = full[0].to_numpy()
    a, _ = load(tmp_path / "a", {"max_rows": 200})
    b, _ = load(tmp_path / "b", {"max_rows": 200})
    a, b = a.to_numpy(), b.to_numpy()
    for k in whole:
        assert list(a[k]) == list(b[k]) == list(whole[k][:200]), k


def test_one_module_with_its_docstrings_as_the_reference(tmp_path):
    data, ctx = load(tmp_path, {"modules": ["json"], "test_fraction": 0})
    cols = data.to_numpy()
    assert set(cols["module"]) == {"json"} and set(cols["split"]) == {"train"}
    assert "json.dumps" in set(cols["name"])
    assert ctx.metrics["modules"] == 1
    for name, ref in zip(cols["name"], cols["reference"]):
        module, attrs = name, []
        while True:  # the longest importable prefix is the module
            try:
                obj = importlib.import_module(module)
                break
            except ImportError:
                module, attr = module.rsplit(".", 1)
                attrs.insert(0, attr)
        for attr in attrs:
            obj = getattr(obj, attr)
        assert " ".join(obj.__doc__.split()).startswith(ref), name


def test_chat_prompts_are_messages_json(tmp_path):
    plain, _ = load(tmp_path / "plain", {"modules": ["json"], "test_fraction": 0})
    chat, _ = load(tmp_path / "chat", {"modules": ["json"], "test_fraction": 0, "chat": True})
    cols = chat.to_numpy()
    assert "prompt" not in cols and chat.info["text_column"] == "messages"
    assert list(cols["id"]) == [stable_id(m) for m in cols["messages"]]
    messages = [json.loads(m) for m in cols["messages"]]
    assert all(len(m) == 1 and m[0]["role"] == "user" for m in messages)
    by_name = dict(zip(plain.to_numpy()["name"], plain.to_numpy()["prompt"]))
    assert {n: m[0]["content"] for n, m in zip(cols["name"], messages)} == by_name


@pytest.mark.parametrize("config,message", [
    ({"modules": ["jsno"]}, (r"stage 'prompts' \(load-instructions\) field 'modules': module "
                             r"'jsno' is not valid; expected a public top-level module .* "
                             r"\(did you mean 'json'\?\)")),
    ({"modules": ["json"]}, (r"stage 'prompts' \(load-instructions\) field 'test_fraction': "
                             r"test_fraction 0.1 is not valid; .* the test split is empty")),
    ({"modules": ["json"], "min_reference_words": 80, "max_reference_words": 80},
     r"instructions found 0 is not valid"),
])
def test_bad_input_is_one_clear_error(tmp_path, config, message):
    with pytest.raises(UserError, match=message):
        load(tmp_path, config)


def test_a_bad_word_range_is_refused_by_the_config():
    with pytest.raises(pydantic.ValidationError, match="must not exceed"):
        LoadInstructions({"min_reference_words": 10, "max_reference_words": 5})


def test_load_prompts_reference_column(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "What is 2+2?", "answer": "4"}, {"prompt": "Name a colour.", "answer": None},
        {"prompt": "What is 2+2?", "answer": "four"}]) + "\n")
    out, _ = run_stage(LoadPrompts, {"path": str(path), "reference_column": "answer"},
                       tmp_path / "1", "prompts")
    cols = out["prompts"].to_numpy()
    assert dict(zip(cols["prompt"], cols["reference"])) == {"What is 2+2?": "4",
                                                            "Name a colour.": ""}
    out, _ = run_stage(LoadPrompts, {"path": str(path)}, tmp_path / "2", "prompts")
    assert "reference" not in out["prompts"].to_numpy()  # unchanged without the field
    with pytest.raises(UserError, match=r"field 'reference_column': column 'answr' is not "
                                        r"valid; expected a column of .*: answer, prompt"):
        run_stage(LoadPrompts, {"path": str(path), "reference_column": "answr"},
                  tmp_path / "3", "prompts")

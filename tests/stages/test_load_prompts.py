"""load-prompts: every file format, de-duplication with counts, ids from the text, a
held-out split that does not move, chat prompts, prompts too long for a pipeline's
tokenizer counted, and one clear error per bad input."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import UserError
from stages.data.load_prompts import LoadPrompts
from stages.data.tables import stable_id
from tests.stages.conftest import run_stage

PROMPTS = ["a thick seven", "a thin one, slanted left", "a thick seven", "  ", "a small zero"]


def load(tmp_path, config, **inputs):
    out, ctx = run_stage(LoadPrompts, config, tmp_path / "out", "prompts", **inputs)
    return out["prompts"], ctx


@pytest.mark.parametrize("ext", ["txt", "csv", "jsonl", "parquet"])
def test_every_format_deduplicated_with_ids_from_the_text(tmp_path, ext):
    path = tmp_path / f"prompts.{ext}"
    if ext == "txt":
        path.write_text("\n".join(PROMPTS) + "\n")
    elif ext == "csv":
        path.write_text("prompt,neg\n" + "\n".join(f'"{p}",blurry' for p in PROMPTS) + "\n")
    elif ext == "jsonl":
        path.write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS) + "\n")
    else:
        pq.write_table(pa.table({"prompt": PROMPTS}), path)
    data, ctx = load(tmp_path, {"path": str(path), "test_fraction": 0.5})
    cols = data.to_numpy()
    assert sorted(cols["prompt"]) == ["a small zero", "a thick seven", "a thin one, slanted left"]
    assert list(cols["id"]) == [stable_id(p) for p in cols["prompt"]]
    assert set(cols["split"]) <= {"train", "test"}
    m = ctx.metrics
    assert (m["prompts"], m["duplicates"]) == (3, 1)
    assert m["blank"] == 1


def test_the_split_follows_the_prompt_not_the_file(tmp_path):
    first = tmp_path / "a.txt"
    first.write_text("\n".join(f"digit {i}" for i in range(40)))
    grown = tmp_path / "b.txt"
    grown.write_text("\n".join(f"digit {i}" for i in range(80, 0, -1)))
    a, _ = load(tmp_path / "1", {"path": str(first), "test_fraction": 0.3})
    b, _ = load(tmp_path / "2", {"path": str(grown), "test_fraction": 0.3})
    side = lambda d: dict(zip(d.to_numpy()["prompt"], d.to_numpy()["split"]))  # noqa: E731
    sa, sb = side(a), side(b)
    assert all(sb[p] == s for p, s in sa.items() if p in sb)
    assert 0 < list(sa.values()).count("test") < 40


def test_negative_prompts_and_chat_prompts(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("text,negative\na cat,blurry\na dog,\n")
    data, _ = load(tmp_path / "1", {"path": str(path), "column": "text",
                                    "negative_column": "negative"})
    cols = data.to_numpy()
    assert dict(zip(cols["prompt"], cols["negative_prompt"])) == {"a cat": "blurry", "a dog": ""}
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    data, _ = load(tmp_path / "2", {"path": str(chat), "column": "messages"})
    assert json.loads(data.to_numpy()["messages"][0]) == [{"role": "user", "content": "hi"}]
    assert data.info["text_column"] == "messages"


def test_prompts_from_a_dataset_and_too_long_for_a_tokenizer(tmp_path, corpus):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    folder = tmp_path / "pipeline"
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=8,
                            unk_token="[UNK]").save_pretrained(folder / "tokenizer")
    from pipelines.artifacts import Model
    data, ctx = load(tmp_path, {"column": "text"}, data=corpus, pipeline=Model(str(folder)))
    n = len(data.to_numpy()["prompt"])
    assert n == ctx.metrics["prompts"] > 10
    assert 0 < ctx.metrics["too_long/tokenizer"] <= n  # counted, never cut
    assert max(len(p.split()) for p in data.to_numpy()["prompt"]) > 8


@pytest.mark.parametrize("case,config,message", [
    ("missing", {"path": "nope.txt"}, "field 'path': prompt file .*nope.txt' is not valid; "
                                      "expected an existing file"),
    ("format", {"path": "p.xml"}, r"expected a file ending in \.txt, \.csv, \.jsonl, \.parquet"),
    ("empty", {"path": "empty.txt"}, "prompts in field 'path'.* 0 is not valid; expected at "
                                     "least one non-blank prompt"),
    ("column", {"path": "p.csv", "column": "caption"},
     r"field 'column': column 'caption' is not valid; expected a column of .*: neg, text"),
    ("neither", {}, "give exactly one source of prompts"),
])
def test_bad_input_is_one_clear_error(tmp_path, case, config, message):
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "p.xml").write_text("<a/>")
    (tmp_path / "p.csv").write_text("text,neg\na,b\n")
    if "path" in config:
        config = {**config, "path": str(tmp_path / config["path"])}
    with pytest.raises(UserError, match=message):
        load(tmp_path, config)

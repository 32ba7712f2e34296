"""``load-text-corpus``: English sentences from the docstrings of the Python standard
library, found on this machine and parsed with ``ast`` (nothing is imported, nothing is
downloaded): the local corpus of the embedding and language-model examples.

Steps: 1. parse every ``.py`` file under the stdlib folder (test suites and IDLE skipped),
in sorted order; 2. split module, class and function docstrings into paragraphs and
sentences; 3. keep prose sentences of ``min_words``..``max_words`` words (capitalised, ending
in a period, no code punctuation); 4. de-duplicate; 5. give each sentence a stable id (the
first 63 bits of its sha1, so a sentence keeps its id whatever else is in the corpus) and
a ``split`` (``test`` with probability ``test_fraction``, drawn from the seed in id order).
``max_rows`` keeps the rows with the smallest ids' hashes, a deterministic sample.
The stdlib differs between Python versions: the version is recorded in the info.
"""

from __future__ import annotations

import ast
import re
import sys
import sysconfig

import numpy as np
from pydantic import Field, model_validator

from pipelines.errors import bad_value
from pipelines.stage import Dataset, Stage, StageConfig
from stages.data.stdlib import stdlib_files
from stages.data.tables import stable_id

CODE_LIKE = re.compile(r"[>{}=\[\]|_`#@$\\]|::|\(\)|\.\.\.|https?:")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def docstring_sentences(source: str, min_words: int, max_words: int):
    """Prose sentences of the module, class and function docstrings in ``source``."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                 ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        for paragraph in re.split(r"\n\s*\n", doc or ""):
            for s in SENTENCE_END.split(" ".join(paragraph.split())):
                if (min_words <= len(s.split()) <= max_words and s[:1].isupper()
                        and s.endswith(".") and not CODE_LIKE.search(s)):
                    yield s


class LoadTextCorpus(Stage):
    kind = "load-text-corpus"
    version = "1"

    class Config(StageConfig):
        min_words: int = Field(6, ge=1)
        max_words: int = Field(40, ge=1)
        max_rows: int | None = Field(None, ge=2)
        test_fraction: float = Field(0.1, gt=0, lt=1)

        @model_validator(mode="after")
        def _word_range(self):
            if self.min_words > self.max_words:
                raise ValueError(f"min_words ({self.min_words}) must not exceed max_words "
                                 f"({self.max_words})")
            return self

    outputs = {"data": Dataset}

    def run(self, ctx):
        cfg = self.config
        root = sysconfig.get_paths()["stdlib"]
        files = stdlib_files(root)
        sentences: set[str] = set()
        for i, path in enumerate(files):
            with open(path, encoding="utf-8", errors="replace") as f:
                sentences.update(docstring_sentences(f.read(), cfg.min_words, cfg.max_words))
            ctx.progress(i + 1, len(files), "files")
        texts = sorted(sentences, key=stable_id)[:cfg.max_rows]
        where = f"stage '{ctx.name}' ({self.kind})"
        if len(texts) < 2:
            raise bad_value(where, "sentences found", len(texts),
                            f"at least 2; lower min_words or raise max_words (stdlib: {root})")
        ids = np.array([stable_id(t) for t in texts], dtype=np.int64)
        draw = np.random.default_rng([ctx.seed]).random(len(ids))  # ids are sorted: stable
        split = np.where(draw < cfg.test_fraction, "test", "train")
        split[0], split[-1] = "train", "test"  # never an empty split
        info = {"text_column": "text", "python": sys.version.split()[0],
                "num_train": int((split == "train").sum()),
                "num_test": int((split == "test").sum())}
        ctx.progress(len(texts), len(texts), "rows", force=True)
        return {"data": ctx.write_dataset(
            "data", {"id": ids, "text": np.array(texts, dtype=object), "split": split},
            info=info)}

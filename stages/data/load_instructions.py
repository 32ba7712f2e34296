"""``load-instructions``: a built-in instruction set made offline from the Python standard
library found on this machine ("Explain what `json.dumps` does.", the docstring as the
reference answer): the local prompt set of the instruct-LM examples. Nothing is imported,
nothing is downloaded; the files are parsed with ``ast``.

Steps:

1. list the ``.py`` files of the stdlib folder (test suites and IDLE skipped, as
   ``load-text-corpus`` does) and keep the public modules: no part of the dotted name
   (``json/__init__.py``: ``json``; ``xml/etree/ElementTree.py``:
   ``xml.etree.ElementTree``) starts with an underscore; with ``modules``, only those
   top-level modules (an unknown name is an error);
2. parse each file in sorted order and take its public top-level functions and classes
   and the public methods of its public classes (``json.JSONEncoder.encode``) that have a
   docstring;
3. the reference answer: the docstring's first paragraph (signature-like first lines such
   as ``dumps(obj) -> str`` dropped, cut before a ``>>>`` example), whitespace-normalised,
   kept when it has ``min_reference_words``..``max_reference_words`` words;
4. the prompt: one of a few fixed templates, chosen from the object's name's stable id,
   naming the object in backticks; ``chat: true`` writes it as chat messages;
5. de-duplicate by prompt text (the first is kept); a stable ``id`` from the text column
   alone, as ``load-prompts`` gives; ``max_rows`` keeps the rows with the smallest ids, a
   deterministic sample;
6. a held-out split by top-level module: a module is drawn to ``test`` (``test_fraction``
   of them) from its own stable id, so every prompt about one module is on one side,
   held-out prompts are about unseen modules, and the split is the same for any seed.

Output columns: the ``load-prompts`` ones (``id``, ``prompt`` or, with ``chat``,
``messages`` as JSON text, ``reference``, ``split``), so a user's own prompt file works
the same way, plus ``module`` (the top-level module) and ``name`` (the dotted object
name); sorted by id. The stdlib differs between Python versions: the version is recorded
in the info.
"""

from __future__ import annotations

import ast
import json
import os
import re
import sys
import sysconfig
import warnings

import numpy as np
from pydantic import Field, model_validator

from pipelines.errors import bad_value, did_you_mean
from pipelines.stage import Dataset, Stage, StageConfig
from stages.data.tables import stable_id
from stages.data.stdlib import stdlib_files

TEMPLATES = {
    "function": ("Explain what `{}` does.", "What is `{}` used for in Python?",
                 "Describe the Python function `{}`."),
    "method": ("Explain what `{}` does.", "What is `{}` used for in Python?",
               "Describe the Python method `{}`."),
    "class": ("Explain what the Python class `{}` is for.", "What is `{}` used for in Python?",
              "Describe the Python class `{}`."),
}
SIGNATURE = re.compile(r"^[A-Za-z_][\w.]*\(.*\)\s*(->.*)?$")
FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)


def module_name(root: str, path: str) -> str | None:
    """The dotted module name of a stdlib file, or None for a private or non-module one."""
    parts = os.path.relpath(path, root)[:-3].split(os.sep)
    if parts[-1] == "__init__":
        parts.pop()
    if not parts or not all(p.isidentifier() and not p.startswith("_") for p in parts):
        return None
    return ".".join(parts)


def reference_text(doc: str | None) -> str:
    """The first paragraph of a docstring after any signature-like lines, on one line."""
    lines = (doc or "").strip().splitlines()
    while lines and (SIGNATURE.match(lines[0].strip()) or not lines[0].strip()):
        lines.pop(0)
    paragraph = re.split(r"\n\s*\n|\n\s*>>>", "\n".join(lines))[0]  # up to a doctest
    return " ".join(paragraph.split())


def documented_objects(source: str, module: str):
    """(kind, dotted name, docstring) of the public top-level functions and classes and
    the public methods of those classes in ``source``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escapes in old files
            tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    for node in tree.body:
        if not isinstance(node, (*FUNCTIONS, ast.ClassDef)) or node.name.startswith("_"):
            continue
        name = f"{module}.{node.name}"
        kind = "class" if isinstance(node, ast.ClassDef) else "function"
        yield kind, name, ast.get_docstring(node)
        for sub in node.body if kind == "class" else ():
            if isinstance(sub, FUNCTIONS) and not sub.name.startswith("_"):
                yield "method", f"{name}.{sub.name}", ast.get_docstring(sub)


class LoadInstructions(Stage):
    kind = "load-instructions"
    version = "1"

    class Config(StageConfig):
        max_rows: int | None = Field(None, ge=1)
        test_fraction: float = Field(0.1, ge=0, lt=1)
        min_reference_words: int = Field(5, ge=1)
        max_reference_words: int = Field(80, ge=1)
        chat: bool = False
        modules: list[str] | None = Field(None, min_length=1)  # top-level modules only

        @model_validator(mode="after")
        def _word_range(self):
            if self.min_reference_words > self.max_reference_words:
                raise ValueError(f"min_reference_words ({self.min_reference_words}) must "
                                 f"not exceed max_reference_words ({self.max_reference_words})")
            return self

    outputs = {"prompts": Dataset}
    metrics = ("prompts", "train", "test", "modules")

    def run(self, ctx):
        cfg = self.config
        where = f"stage '{ctx.name}' ({self.kind})"
        root = sysconfig.get_paths()["stdlib"]
        files = [(p, m) for p in stdlib_files(root) if (m := module_name(root, p))]  # 1.
        tops = sorted({m.split(".")[0] for _, m in files})
        for name in cfg.modules or ():
            if name not in tops:
                raise bad_value(f"{where} field 'modules'", "module", name,
                                f"a public top-level module of the standard library in {root}"
                                f" ({len(tops)} of them: {', '.join(tops[:8])}, ...)"
                                f"{did_you_mean(name, tops)}")
        if cfg.modules:
            files = [(p, m) for p, m in files if m.split(".")[0] in cfg.modules]
        column = "messages" if cfg.chat else "prompt"
        rows, seen = [], set()
        for i, (path, module) in enumerate(files):                              # 2.
            with open(path, encoding="utf-8", errors="replace") as f:
                source = f.read()
            for kind, name, doc in documented_objects(source, module):
                reference = reference_text(doc)                                 # 3.
                if not (cfg.min_reference_words <= len(reference.split())
                        <= cfg.max_reference_words):
                    continue
                templates = TEMPLATES[kind]                                     # 4.
                prompt = templates[stable_id(name) % len(templates)].format(name)
                text = (json.dumps([{"role": "user", "content": prompt}]) if cfg.chat
                        else prompt)
                if text in seen:                                                # 5.
                    continue
                seen.add(text)
                rows.append((stable_id(text), text, reference, module.split(".")[0], name))
            ctx.progress(i + 1, len(files), "files")
        rows = sorted(rows)[:cfg.max_rows]
        if not rows:
            raise bad_value(where, "instructions found", 0,
                            "at least one; lower min_reference_words or raise "
                            f"max_reference_words, or name other modules (stdlib: {root})")
        ids, texts, references, modules, names = (list(c) for c in zip(*rows))
        top = sorted(set(modules))                                              # 6.
        test_modules = [m for m in top
                        if (stable_id(m) % 1_000_003) / 1_000_003 < cfg.test_fraction]
        split = np.where(np.isin(modules, test_modules), "test", "train")
        metrics = {"prompts": len(rows), "train": int((split == "train").sum()),
                   "test": int((split == "test").sum()), "modules": len(top)}
        if cfg.test_fraction > 0 and not (metrics["train"] and metrics["test"]):
            empty = "test" if not metrics["test"] else "train"
            raise bad_value(f"{where} field 'test_fraction'", "test_fraction",
                            cfg.test_fraction,
                            f"a split with rows on both sides: the {empty} split is empty "
                            f"(the split is by module and the {len(rows)} rows come from "
                            f"{len(top)} module(s): {', '.join(top[:8])}); set test_fraction "
                            f"to 0, or give more modules or rows")
        ctx.log_metrics(metrics)
        ctx.progress(len(rows), len(rows), "rows", force=True)
        info = {"text_column": column, "python_version": sys.version.split()[0],
                "source": "python standard library docstrings",
                "test_modules": sorted(set(test_modules)), **metrics}
        return {"prompts": ctx.write_dataset("prompts", {
            "id": np.array(ids, dtype=np.int64), column: np.array(texts, dtype=object),
            "reference": np.array(references, dtype=object),
            "module": np.array(modules, dtype=object), "name": np.array(names, dtype=object),
            "split": split}, info=info)}

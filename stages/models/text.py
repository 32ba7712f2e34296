"""``transformers`` models for the text side of knowledge distillation: loading a local
model folder with the real ``from_pretrained`` (clear errors for folders that are not
models), tokenising, mean pooling, and students built from a teacher.

- ``mean_pool``: the sentence embedding of Sentence-BERT (Reimers & Gurevych 2019): the
  mean of the last hidden states over the non-padding tokens, e = sum_i m_i h_i / sum_i m_i.
- ``student_from_teacher``: DistilBERT's initialisation (Sanh et al. 2019, arXiv
  1910.01108, section 3): the student keeps the teacher's embeddings and a subset of its
  layers (every n-th one, or a given list) with their weights.
- ``depth_pruned_layers``: depth pruning by block importance (ShortGPT, Men et al. 2024,
  arXiv 2403.03853, eq. 2; Minitron's depth axis, Muralidharan et al. 2024, arXiv
  2407.14679): BI_l = 1 - E_tokens cos(h_l, h_{l+1}), h_l the input of layer l and h_{l+1}
  its output, measured on sample sequences; the layers of highest BI are kept (in order),
  the ones that change their input least are dropped.
"""

from __future__ import annotations

import json
import os
import re
from typing import Literal

import numpy as np
from pydantic import Field, PositiveInt, model_validator

from pipelines.errors import UserError, bad_value
from pipelines.stage import StageConfig
from stages.lazy import lazy, no_grad

torch = lazy("torch")

#  what a model folder is used for -> the transformers Auto class that loads it
MODEL_CLASSES = {"encoder": "AutoModel", "causal-lm": "AutoModelForCausalLM"}
PROJECTION_FILE = "projection.safetensors"  # a student's learned map to the teacher's width
LAYER_KEY = re.compile(r"^(.*?\.(?:layer|h|layers))\.(\d+)\.(.*)$")


def is_transformers_folder(path: str) -> bool:
    try:
        with open(os.path.join(path, "config.json")) as f:
            return "model_type" in json.load(f)
    except (OSError, ValueError):
        return False


def load_text_model(path: str, use: str, where: str):
    """(model, tokenizer) from a local ``transformers`` folder, in eval mode. A missing
    folder, a folder without a model config or tokenizer, or weights that do not load are
    a ``UserError`` naming ``where``."""
    import transformers
    expected = (f"a transformers model folder (config.json with a model_type, weights and "
                f"a tokenizer) loadable with {MODEL_CLASSES[use]}")
    if not os.path.isdir(path):
        raise bad_value(where, "model folder", path, f"{expected}; it does not exist")
    if not is_transformers_folder(path):
        raise bad_value(where, "model folder", path,
                        f"{expected}; it has no config.json with a model_type")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        model = getattr(transformers, MODEL_CLASSES[use]).from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise bad_value(where, "model folder", path, f"{expected}; loading failed: {e}") from e
    return model.eval(), tokenizer


def tokenize(tokenizer, texts, max_length: int) -> dict[str, np.ndarray]:
    """Token ids and attention mask, padded or truncated to ``max_length``."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    enc = tokenizer([str(t) for t in texts], padding="max_length", truncation=True,
                    max_length=max_length, return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int32),
            "attention_mask": enc["attention_mask"].astype(np.int8)}


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_i m_i h_i / sum_i m_i over the token axis."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def lm_loss(model, ids: torch.Tensor, mask: torch.Tensor):
    """(mean next-token cross-entropy over the real target tokens, their count)."""
    logits = model(input_ids=ids, attention_mask=mask).logits
    keep = mask[:, 1:].bool()
    target = ids[:, 1:][keep]
    return torch.nn.functional.cross_entropy(logits[:, :-1][keep].float(), target), len(target)


def chosen_layers(total: int, keep_every: int, layers: list[int] | None, where: str) -> list[int]:
    """The teacher layers a student keeps: ``layers`` if given, else 0, n, 2n, ..."""
    chosen = list(layers) if layers else list(range(0, total, keep_every))
    bad = [i for i in chosen if not 0 <= i < total]
    if bad:
        raise bad_value(where, "teacher_layers", bad, f"layer indices 0..{total - 1}")
    return chosen


def student_from_teacher(teacher_path: str, use: str, keep: list[int]):
    """A copy of the teacher with only the layers ``keep`` (in that order)."""
    import transformers
    teacher, _ = load_text_model(teacher_path, use, f"teacher folder {teacher_path}")
    config = teacher.config.__class__.from_dict(teacher.config.to_dict())
    config.num_hidden_layers = len(keep)
    student = getattr(transformers, MODEL_CLASSES[use]).from_config(config)
    state, renamed = teacher.state_dict(), {}
    for key, value in state.items():
        m = LAYER_KEY.match(key)
        if m is None:
            renamed[key] = value
        elif int(m.group(2)) in keep:
            renamed[f"{m.group(1)}.{keep.index(int(m.group(2)))}.{m.group(3)}"] = value
    missing, unexpected = student.load_state_dict(renamed, strict=False)
    if unexpected or [k for k in missing if "position_ids" not in k]:
        raise UserError(f"teacher folder {teacher_path}: layer copy failed "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return student


@no_grad
def block_importance(model, sequences: list, batch_size: int = 8) -> list[float]:
    """BI_l of every layer of ``model`` over the tokens of ``sequences`` (1-D id tensors);
    transformers' last hidden state is after the final norm, so the last layer's output is
    compared normalised (cosine is scale-free; only the norm's weights differ)."""
    n_layers = int(model.config.num_hidden_layers)
    total, count = torch.zeros(n_layers, dtype=torch.float64), 0
    for i in range(0, len(sequences), batch_size):
        rows = sequences[i:i + batch_size]
        width = max(len(r) for r in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, r in enumerate(rows):
            ids[j, :len(r)], mask[j, :len(r)] = torch.as_tensor(r), 1
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        keep = mask.bool()
        for layer in range(n_layers):
            cos = torch.nn.functional.cosine_similarity(hidden[layer][keep].double(),
                                                        hidden[layer + 1][keep].double(), -1)
            total[layer] += (1 - cos).sum()
        count += int(keep.sum())
    return (total / max(count, 1)).tolist()


def depth_pruned_layers(teacher_path: str, use: str, sequences: list, count: int,
                        where: str) -> tuple[list[int], list[float]]:
    """(the ``count`` layers of highest block importance, in order; every layer's BI)."""
    teacher, _ = load_text_model(teacher_path, use, where)
    importance = block_importance(teacher, sequences)
    if not 1 <= count <= len(importance):
        raise bad_value(where, "num_layers", count, f"1..{len(importance)} (the teacher's "
                        f"layers) for student_init depth-prune")
    ranked = sorted(range(len(importance)), key=lambda i: -importance[i])
    return sorted(ranked[:count]), importance


def student_from_config(teacher_path: str, use: str, overrides: dict):
    """A fresh model of the teacher's type with the teacher's config changed by
    ``overrides`` (e.g. fewer layers, a smaller hidden size); random weights."""
    import transformers
    config = transformers.AutoConfig.from_pretrained(teacher_path)
    for name, value in overrides.items():
        setattr(config, name, value)
    return getattr(transformers, MODEL_CLASSES[use]).from_config(config)


def set_dropout(model: torch.nn.Module, p: float) -> None:
    """Every dropout of ``model`` to ``p``: its ``nn.Dropout`` modules and the float
    probabilities attention layers keep for their functional dropout (``dropout_prob``,
    ``attention_dropout``, ...); ``model.config`` is left as it was."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
        for name, value in vars(module).items():
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, p)


class TextStudentArch(StageConfig):
    """How a ``transformers`` student is made (the text signals of ``kd-student``):

    - ``teacher-layers``: DistilBERT's initialisation, the teacher with only the layers
      ``teacher_layers`` (default every ``keep_every``-th, from layer 0);
    - ``config``: the teacher's config with ``num_layers`` / ``hidden_size`` /
      ``num_heads`` changed, random weights;
    - ``folder``: a local model folder ``student_path`` (a user's own small model), loaded
      with ``from_pretrained``; its vocabulary must be the teacher's;
    - ``depth-prune``: the teacher's ``num_layers`` layers (default: as many as
      ``keep_every`` keeps) of highest block importance on the signal's sequences
      (``depth_pruned_layers``); the stage measures them and records the layers kept in
      ``teacher_layers`` of the resolved config.
    """

    student_init: Literal["teacher-layers", "config", "folder", "depth-prune"] = \
        "teacher-layers"
    teacher_layers: list[int] | None = None
    keep_every: PositiveInt = 2
    num_layers: PositiveInt | None = None
    hidden_size: PositiveInt | None = None
    num_heads: PositiveInt | None = None
    student_path: str | None = None
    freeze_embeddings: bool = False  # keep the (teacher's) token embeddings fixed
    # the student's dropout while it is distilled (its saved config keeps its own): 0 as
    # TRL's GKD does (its target is the teacher's distribution, not noisy labels), which
    # also makes the run the same whatever the number of workers; None: the config's own
    dropout: float | None = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _student_source(self):
        if (self.student_init == "folder") != (self.student_path is not None):
            raise ValueError("student_path is required with student_init: folder, and only "
                             "used with it")
        return self

    def build_text_student(self, teacher_path: str, use: str, where: str):
        model = self._text_student(teacher_path, use, where)
        if self.freeze_embeddings:
            model.get_input_embeddings().weight.requires_grad_(False)
        if self.dropout is not None:
            set_dropout(model, self.dropout)
        return model

    def _text_student(self, teacher_path: str, use: str, where: str):
        if self.student_init == "folder":
            return load_text_model(self.student_path, use, f"{where} field 'student_path'")[0]
        if self.student_init == "config":
            changes = {"num_hidden_layers": self.num_layers, "hidden_size": self.hidden_size,
                       "num_attention_heads": self.num_heads}
            return student_from_config(teacher_path, use,
                                       {k: v for k, v in changes.items() if v is not None})
        import transformers
        total = transformers.AutoConfig.from_pretrained(teacher_path).num_hidden_layers
        if self.student_init == "depth-prune" and not self.teacher_layers:
            raise UserError(f"{where}: student_init depth-prune needs the layers its stage "
                            f"measures (teacher_layers is set from the signal's sequences)")
        keep = chosen_layers(total, self.keep_every, self.teacher_layers, where)
        return student_from_teacher(teacher_path, use, keep)

    def pruned_count(self, total: int) -> int:
        """How many layers a depth-pruned student keeps."""
        return self.num_layers or len(range(0, total, self.keep_every))

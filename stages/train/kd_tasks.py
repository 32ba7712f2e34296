"""What ``kd-student`` does for each kind of teacher signal: which columns it reads, how the
student is built, the loss of one batch, and how the student is saved. The training loop
itself (Ray Train, checkpoints, resume) is the same for all, in ``kd_student``.

Losses (z_s student logits, z_t teacher logits or log-probabilities, T the temperature):
- ``hinton``: alpha T^2 KL(softmax(z_t/T) || softmax(z_s/T)) + (1 - alpha) CE(y, z_s)
  (Hinton et al. 2015). From a causal LM's stored top-k, the teacher distribution over
  the vocabulary is rebuilt from (top-k log-probabilities, rest mass r): ``topk_rest:
  uniform`` spreads r evenly over the V - k other tokens, ``renormalize`` drops it (the
  top k renormalised); y is the next token.
- ``taid``: TAID's interpolated target (Shing et al. 2025), see ``stages.train.taid``.
- ``cosine`` / ``mse`` / ``cosine_mse``: embedding distillation, 1 - cos(W e_s, e_t) and
  ||W e_s - e_t||^2 between mean-pooled sentence embeddings (W a learned projection when
  the widths differ, else the identity; saved with the student).
- ``feature_mse``: FitNets / DistilBERT hidden-state matching, the mean over the matched
  layers of ||W_l h_s,l - h_t,l||^2 over real tokens (W_l learned, for training only).
"""

from __future__ import annotations

import os

from pipelines.errors import UserError, bad_value
from stages.models.classifiers import save_classifier
from stages.models.text import PROJECTION_FILE
from stages.train.taid import taid_loss
from stages.lazy import lazy

torch = lazy("torch")
F = lazy("torch.nn.functional")
nn = lazy("torch.nn")

NEG = -1e4  # log-probability standing for "no mass" (finite: 0 * -inf would be NaN)


def hinton_kd_loss(z_s, z_t, y, temperature: float, alpha: float):
    """alpha * T^2 * KL(p_t || p_s) + (1 - alpha) * CE(y, z_s), batch mean."""
    hard = F.cross_entropy(z_s, y)
    if alpha == 0:
        return hard
    t = temperature
    kl = F.kl_div(F.log_softmax(z_s / t, dim=1), F.log_softmax(z_t / t, dim=1),
                  log_target=True, reduction="batchmean")
    return alpha * t * t * kl + (1 - alpha) * hard


def missing_teacher(where: str, signal) -> UserError:
    """The one error of a text signal's student without its ``teacher`` input wired."""
    kind = signal.info.get("signal")
    made_by = getattr(getattr(signal, "source", None), "stage", None) or "<signal stage>"
    teacher = signal.info.get("teacher_stage") or "<teacher stage>"
    return UserError(
        f"{where}: input 'teacher' is not wired, and a '{kind}' signal needs it: the "
        f"transformers student is made from the teacher's model folder (its layers or "
        f"config) and is saved with the teacher's tokenizer. Wire the teacher model the "
        f"signal was made from: inputs: {{signal: {made_by}, teacher: {teacher}}}")


def wrong_teacher(where: str, signal, teacher) -> UserError | None:
    """An error if the ``teacher`` input is not the artifact the signal was made from
    (when both are known: committed artifacts), else None."""
    made_from = signal.info.get("teacher")
    source = getattr(teacher, "source", None)
    if not made_from or source is None or f"{source.kind}/{source.key}" == made_from:
        return None
    return UserError(
        f"{where}: input 'teacher' is artifact {source.kind}/{source.key[:12]} (stage "
        f"'{source.stage}'), but the signal was made from {made_from.split('/')[0]}/"
        f"{made_from.split('/', 1)[-1][:12]} (stage "
        f"'{signal.info.get('teacher_stage')}'); wire the teacher the signal was made "
        f"from: inputs: {{teacher: {signal.info.get('teacher_stage')}}}")


def soft_label_loss(cfg, z_s, z_t, y, taid):
    if taid is None:
        return hinton_kd_loss(z_s, z_t, y, cfg.temperature, cfg.alpha)
    return taid_loss(z_s, z_t, y, taid.t, cfg.temperature, cfg.alpha)


def dense_teacher_logprobs(ids, logprobs, rest, vocab: int, mode: str) -> torch.Tensor:
    """[N, V] teacher log-probabilities from the top k: the other V - k tokens share the
    rest mass evenly (``uniform``) or get none (``renormalize``)."""
    k = ids.shape[-1]
    fill = (torch.log(rest.clamp(min=1e-12) / max(vocab - k, 1)).unsqueeze(-1)
            if mode == "uniform" and vocab > k else torch.full_like(rest, NEG).unsqueeze(-1))
    dense = fill.expand(len(ids), vocab).clone()
    return dense.scatter(1, ids, logprobs)


class ClassifierTask:
    """Stored classifier logits (or probabilities) -> a torch classifier."""

    losses = ("hinton", "taid")
    needs_teacher = False  # everything it needs is in the signal

    def __init__(self, cfg, meta: dict, teacher=None):
        self.cfg, self.meta = cfg, meta
        self.target = meta["signal"]  # the column: logits or probabilities
        self.columns = {"x": torch.float32, "label": torch.int64, self.target: torch.float32}

    def build(self, where: str = "student") -> nn.Module:
        return self.cfg.build(self.meta["input_shape"], self.meta["num_classes"], where)

    def loss(self, model, batch, taid):
        z_s, z_t = model(batch["x"]), batch[self.target]
        if self.target == "probabilities":  # log p_t = z_t + const: tempering is the same
            z_t = z_t.clamp(min=1e-12).log()
        return soft_label_loss(self.cfg, z_s, z_t, batch["label"], taid), z_s, batch["label"]

    def save(self, model, out: str) -> dict:
        save_classifier(model, out)
        return {"architecture": self.cfg.arch, "num_classes": self.meta["num_classes"],
                "input_shape": self.meta["input_shape"]}


class TextTask:
    """Shared by the text signals: token columns, the student from the teacher's folder,
    saving the model with the teacher's tokenizer. The teacher is the stage's ``teacher``
    input, an artifact: ``teacher.path`` is a verified copy on the node that reads it (a
    Ray Train worker's own node), never a path recorded elsewhere."""

    use = "encoder"
    needs_teacher = True  # its layers or config, and its tokenizer

    def __init__(self, cfg, meta: dict, teacher=None):
        self.cfg, self.meta, self.teacher = cfg, meta, teacher
        self.columns = {"input_ids": torch.int64, "attention_mask": torch.int64,
                        **self.signal_columns}

    def teacher_dir(self, where: str) -> str:
        if self.teacher is None:
            raise UserError(f"{where}: a '{self.meta['signal']}' signal needs the "
                            f"'teacher' input (its model artifact), and none was given")
        return self.teacher.path

    def student(self, where: str = "student"):
        model = self.cfg.build_text_student(self.teacher_dir(where), self.use, where)
        if model.config.vocab_size != self.meta["vocab_size"]:
            raise bad_value(where, "student vocab_size", model.config.vocab_size,
                            f"the teacher signal's vocab_size {self.meta['vocab_size']}")
        return model

    def save(self, model, out: str) -> dict:
        from transformers import AutoTokenizer
        net = self.backbone(model)
        net.save_pretrained(out)
        AutoTokenizer.from_pretrained(self.teacher_dir("student")).save_pretrained(out)
        return {"model_type": net.config.model_type,
                "num_layers": int(net.config.num_hidden_layers),
                "hidden_size": int(net.config.hidden_size),
                "params": sum(p.numel() for p in net.parameters())}

    def backbone(self, model):
        return model


class CausalLMTask(TextTask):
    """A causal LM's top-k next-token log-probabilities -> a smaller causal LM."""

    losses = ("hinton", "taid")
    use = "causal-lm"
    @property
    def signal_columns(self):
        return {"topk_ids": torch.int64, "topk_logprobs": torch.float32,
                "rest_mass": torch.float32}

    def build(self, where: str = "student") -> nn.Module:
        return self.student(where)

    def loss(self, model, batch, taid):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        keep = mask[:, 1:].bool()  # predictions of real next tokens
        z_s = model(input_ids=ids, attention_mask=mask).logits[:, :-1][keep].float()
        y = ids[:, 1:][keep]
        z_t = dense_teacher_logprobs(batch["topk_ids"][:, :-1][keep],
                                     batch["topk_logprobs"][:, :-1][keep],
                                     batch["rest_mass"][:, :-1][keep],
                                     z_s.shape[-1], self.cfg.topk_rest)
        return soft_label_loss(self.cfg, z_s, z_t, y, taid), z_s, y


class EmbeddingTask(TextTask):
    """Teacher sentence embeddings -> a smaller encoder."""

    losses = ("cosine", "mse", "cosine_mse")
    @property
    def signal_columns(self):
        return {"embedding": torch.float32}

    def build(self, where: str = "student") -> nn.Module:
        from stages.train.kd_text_nets import EmbeddingStudent
        return EmbeddingStudent(self.student(where), self.meta["hidden_size"])

    def loss(self, model, batch, taid):
        e_s, e_t = model(batch["input_ids"], batch["attention_mask"]), batch["embedding"]
        cos = (1 - F.cosine_similarity(e_s, e_t, dim=-1)).mean()
        mse = F.mse_loss(e_s, e_t)
        loss = {"cosine": cos, "mse": mse, "cosine_mse": cos + mse}[self.cfg.loss]
        return loss, None, e_t

    def backbone(self, model):
        return model.encoder

    def save(self, model, out: str) -> dict:
        info = super().save(model, out)
        if model.proj is not None:
            from safetensors.torch import save_file
            save_file(model.proj.state_dict(), os.path.join(out, PROJECTION_FILE))
        return info


class FeatureTask(TextTask):
    """Teacher hidden states of chosen layers -> a smaller encoder (student layer l_s
    matched to teacher layer l_t in proportion, l_s = round(l_t * n_s / n_t))."""

    losses = ("feature_mse",)
    @property
    def signal_columns(self):
        return {"hidden_states": torch.float32}

    def build(self, where: str = "student") -> nn.Module:
        encoder = self.student(where)
        n_s, n_t = encoder.config.num_hidden_layers, self.meta["num_layers"]
        layers = [round(l_t * n_s / n_t) for l_t in self.meta["layers"]]
        from stages.train.kd_text_nets import FeatureStudent
        return FeatureStudent(encoder, layers, self.meta["hidden_size"])

    def loss(self, model, batch, taid):
        mask = batch["attention_mask"].unsqueeze(1).unsqueeze(-1).float()
        err = (model(batch["input_ids"], batch["attention_mask"]) - batch["hidden_states"]) ** 2
        # the mean over real tokens, matched layers and features
        loss = (err * mask).sum() / (mask.sum() * err.shape[1] * err.shape[-1])
        return loss, None, batch["input_ids"]

    def backbone(self, model):
        return model.encoder


TASKS = {"logits": ClassifierTask, "probabilities": ClassifierTask,
         "topk_logprobs": CausalLMTask, "embeddings": EmbeddingTask,
         "hidden_states": FeatureTask}

"""``generate-responses``: a causal LM teacher writes a response to every prompt, by Ray
Data batch inference; the responses are the data of sequence-level knowledge
distillation (Kim & Rush 2016, "Sequence-Level Knowledge Distillation", arXiv
1606.07947: the student is trained on the teacher's outputs y ~ p_t(. | x) instead of
the references), and with ``top_k`` also the token-level signal: each generated token's
top-k log-probabilities under the teacher's temperature-1 distribution, log p_t(v | x,
y_<i) for the k most likely v, so one pass gives both.

Inputs: ``model`` (a causal LM folder, e.g. ``pretrained-model`` of a GGUF file) and
``prompts`` (``load-prompts`` or ``load-instructions``: ``id``, ``prompt`` or
``messages``, ``split``, optional ``reference``). Steps:

1. checks before any generation: the prompt column, a chat template when chat is asked
   or the prompts are messages, ``engine``;
2. a pool of ``actors`` Ray Data actors each loads the teacher once (a GPU each when the
   cluster has them) and writes responses for batches of ``batch_size`` prompts with
   ``stages.models.lm_generate``: the chat template, left padding, greedy by default;
   with ``temperature`` > 0, sampling on the ``top_p`` nucleus, each row from its own
   generator seeded by (stage seed, row id), so rows are the same for any batching and
   any number of actors;
3. shard-level resume: shards are written as the pass goes; a re-run of the same key
   after a kill generates only the prompts no complete shard holds (``rows_resumed``).

Output ``responses``: the prompt rows (``id``, the prompt column, ``split``,
``reference``) plus ``response`` (text), ``prompt_ids`` and ``response_ids`` (the
tokens the model saw and wrote; the end-of-sequence token included when generated),
``finish`` (``stop`` or ``length``) and, with ``top_k``, ``topk_ids`` and
``topk_logprobs`` (flattened, ``top_k`` per response token).

``engine: vllm`` hands the pass to vLLM through ``ray.data.llm``; it needs vLLM
importable and a GPU reported by Ray, and is otherwise a clear error before any work.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from pipelines.errors import bad_value
from pipelines.stage import Dataset, Model, Resources, Stage
from stages.data.tables import parquet, require_columns
from stages.models.device import device as torch_device
from stages.models.lm_generate import generate, prompt_text, wants_chat
from stages.models.text import load_text_model
from stages.teacher.signals import (InferenceConfig, describe, resumable, with_teacher,
                                    write_rows)

ENGINES = ("transformers", "vllm")


class ResponseActor:
    """Ray Data actor: one teacher in memory; a batch of prompt rows -> responses."""

    def __init__(self, model: Model, cfg: dict, seed: int, text_column: str, where: str):
        self.model, self.tokenizer = load_text_model(model.path, "causal-lm", where)
        self.model.to(torch_device())
        self.cfg, self.seed, self.column = cfg, seed, text_column
        self.messages = text_column == "messages"
        self.chat = wants_chat(self.tokenizer, cfg["chat"], self.messages, where)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cfg = self.cfg
        order = np.argsort(batch["id"], kind="stable")  # the same rows, the same order
        batch = {k: np.asarray(v)[order] for k, v in batch.items()}
        texts = [prompt_text(self.tokenizer, str(p), self.chat, self.messages,
                             cfg["system_prompt"]) for p in batch[self.column]]
        rows = generate(self.model, self.tokenizer, texts, max_new_tokens=cfg["max_new_tokens"],
                        temperature=cfg["temperature"], top_p=cfg["top_p"], seed=self.seed,
                        ids=batch["id"].tolist(), top_k=cfg["top_k"],
                        max_prompt_tokens=cfg["max_prompt_tokens"])
        out = {k: pa.array(list(v)) for k, v in batch.items()}
        out["response"] = pa.array([self.tokenizer.decode(r["response_ids"],
                                                          skip_special_tokens=True).strip()
                                    for r in rows], pa.string())
        for key in ("prompt_ids", "response_ids") + (("topk_ids", "topk_logprobs")
                                                     if cfg["top_k"] else ()):
            kind = pa.float32() if key == "topk_logprobs" else pa.int32()
            out[key] = pa.array([r[key].reshape(-1).tolist() for r in rows], pa.list_(kind))
        out["finish"] = pa.array([r["finish"] for r in rows], pa.string())
        return pa.table(out)


def check_engine(engine: str, gpus: float, where: str) -> None:
    if engine != "vllm":
        return
    import importlib.util
    missing = [why for ok, why in ((importlib.util.find_spec("vllm") is not None,
                                    "vLLM is not installed"),
                                   (gpus > 0, "Ray reports no GPU")) if not ok]
    if missing:
        raise bad_value(where, "engine", engine, f"{ENGINES[0]} here "
                        f"({' and '.join(missing)}; vllm needs both)")


class GenerateResponses(Stage):
    kind = "generate-responses"
    version = "1"

    class Config(InferenceConfig):
        max_new_tokens: int = Field(128, ge=1)
        temperature: float = Field(0.0, ge=0)      # 0: greedy
        top_p: float = Field(1.0, gt=0, le=1)      # sampling only
        top_k: int = Field(0, ge=0)                # >0: per-token top-k log-probabilities
        chat: bool | None = None                   # None: the chat template when there is one
        system_prompt: str | None = None
        max_prompt_tokens: int = Field(1024, ge=1)
        prompt_column: str | None = None           # default: the prompts' text column
        engine: Literal[ENGINES] = "transformers"
        batch_size: int = Field(16, ge=1)
        shard_rows: int = Field(256, ge=1)         # rows per shard at most: the unit of resume
        execution = ("shard_rows",)  # with InferenceConfig's actors and batch_size

    inputs = {"model": Model, "prompts": Dataset}
    outputs = {"responses": Dataset}
    metrics = ("rows", "rows_resumed", "response_tokens", "stopped")
    resources = Resources(num_cpus=0)  # only launches Ray Data work

    def run(self, ctx, model, prompts):
        cfg = self.config
        where = f"stage '{ctx.name}' ({self.kind})"
        check_engine(cfg.engine, ctx.num_gpus_available, f"{where} field 'engine'")  # 1.
        column = cfg.prompt_column or prompts.info.get("text_column") or "prompt"
        table = require_columns(prompts, ["id", column], f"{where} input 'prompts'")
        teacher, tokenizer = load_text_model(model.path, "causal-lm", f"{where} input 'model'")
        wants_chat(tokenizer, cfg.chat, column == "messages", f"{where} field 'chat'")
        if cfg.top_k > teacher.config.vocab_size:
            raise bad_value(f"{where} field 'top_k'", "top_k", cfg.top_k,
                            f"at most the vocabulary size {teacher.config.vocab_size}")
        keep = [c for c in ("id", column, "split", "reference") if c in table.schema.names]
        rows, shards = resumable(ctx, prompts, cfg.shard_rows, output="responses")  # 3.
        rows = rows.select_columns(keep)
        settings = {k: getattr(cfg, k) for k in ("max_new_tokens", "temperature", "top_p",
                                                 "top_k", "chat", "system_prompt",
                                                 "max_prompt_tokens")}
        kwargs = {"model": model, "cfg": settings, "seed": ctx.seed, "text_column": column,
                  "where": f"{where} input 'model'"}
        ds = with_teacher(rows, ResponseActor, kwargs, cfg, ctx, table.count_rows())  # 2.
        c = teacher.config
        info = {"signal": "responses", "text_column": column, "model_type": c.model_type,
                "vocab_size": int(c.vocab_size), "num_layers": int(c.num_hidden_layers),
                "teacher_params": sum(p.numel() for p in teacher.parameters()),
                "chat_template": bool(getattr(tokenizer, "chat_template", None)),
                "seed": ctx.seed, **settings, **describe(model)}
        del teacher
        out = write_rows(ctx, ds, info, shards, output="responses")
        table = parquet(out).to_table(columns=["response_ids", "finish"])
        lengths = [len(v) for v in table.column("response_ids").to_pylist()]
        ctx.log_metrics({"response_tokens": int(sum(lengths)),
                         "stopped": int(sum(f == "stop" for f in
                                            table.column("finish").to_pylist()))})
        return {"responses": out}


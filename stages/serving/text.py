"""Text students of ``kd-student`` as MLflow pyfunc models: a causal LM answers each
``text`` (through its chat template when it has one, greedy, ``max_new_tokens``); an
encoder gives each ``text`` its mean-pooled embedding (projected to the teacher's width
when the student learned a projection)."""

from __future__ import annotations

import os

from pipelines.mlmodel import PyFunc, read_metadata

GENERATE, EMBED = "text-generation", "feature-extraction"


def spec(task: str, metadata: dict) -> PyFunc:
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array
    out = ColSpec("string", "text") if task == GENERATE else ColSpec(Array("float"), "embedding")
    params = ParamSchema([ParamSpec("max_new_tokens", "long", 64)]) if task == GENERATE else None
    signature = ModelSignature(inputs=Schema([ColSpec("string", "text")]),
                               outputs=Schema([out]), params=params)
    example = pd.DataFrame({"text": ["Explain what `json.dumps` does."]})
    return PyFunc(__name__, signature, example, "transformers", task,
                  ("transformers", "tokenizers", "safetensors"), {"task": task, **metadata})


class TextModel:
    def __init__(self, path: str):
        from stages.models.text import PROJECTION_FILE, load_text_model
        self.task = read_metadata(path)["task"]
        use = "causal-lm" if self.task == GENERATE else "encoder"
        self.model, self.tokenizer = load_text_model(path, use, f"MLflow model {path}")
        self.proj = None
        if os.path.isfile(os.path.join(path, PROJECTION_FILE)):
            import torch
            from safetensors.torch import load_file
            weights = load_file(os.path.join(path, PROJECTION_FILE))
            self.proj = torch.nn.Linear(weights["weight"].shape[1], weights["weight"].shape[0])
            self.proj.load_state_dict(weights)

    def predict(self, data, params=None):
        import pandas as pd
        texts = [str(t) for t in data["text"]]
        if self.task == GENERATE:
            return pd.DataFrame({"text": self.generate(texts, (params or {}).get("max_new_tokens", 64))})
        return pd.DataFrame({"embedding": list(self.embed(texts))})

    def generate(self, texts: list[str], max_new_tokens: int) -> list[str]:
        from stages.models.lm_generate import generate, prompt_text
        chat = bool(getattr(self.tokenizer, "chat_template", None))
        prompts = [prompt_text(self.tokenizer, t, chat, False) for t in texts]
        out = generate(self.model, self.tokenizer, prompts, max_new_tokens=int(max_new_tokens))
        return [self.tokenizer.decode(r["response_ids"], skip_special_tokens=True) for r in out]

    def embed(self, texts: list[str]):
        import torch
        from stages.models.text import mean_pool
        enc = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        with torch.inference_mode():
            h = self.model(**enc).last_hidden_state
            e = mean_pool(h, enc["attention_mask"])
            e = self.proj(e) if self.proj is not None else e
        return e.float().numpy()


def _load_pyfunc(path: str) -> TextModel:
    return TextModel(path)

"""The Ray Data actor that runs a ``transformers`` teacher over a text column for the
``teacher-outputs`` stage. Per row (tokens padded to ``max_length``, mask m):

- ``topk_logprobs`` (causal LM): for every position i, the k largest teacher
  log-probabilities log p(w_{i+1} = v | w_{<=i}) (``topk_ids`` [L, k] int32 and
  ``topk_logprobs`` [L, k]) and ``rest_mass`` [L] = 1 - sum_k p_k, the probability left
  outside the top k (Hinton KD from sparse logits; students either renormalise over the
  top k or spread ``rest_mass`` uniformly over the other tokens).
- ``hidden_states``: the hidden states of the chosen layers ([len(layers), L, d]; layer
  0 is the embedding output, -1 the last layer), for feature matching (FitNets,
  Romero et al. 2015; DistilBERT's hidden-state loss).
- ``embeddings``: the mean-pooled last hidden state (Sentence-BERT pooling), [d].

Every row also gets its ``input_ids`` and ``attention_mask``, so students train on the
teacher's exact tokens. Values are stored in ``precision``; ids as int32.
"""

from __future__ import annotations

import numpy as np

from stages.models.text import load_text_model, mean_pool, tokenize
from stages.models.device import device as torch_device

# the text signals -> which kind of transformers model produces them
TEXT_SIGNALS = {"topk_logprobs": "causal-lm", "hidden_states": "encoder",
                "embeddings": "encoder"}
DTYPES = {"float32": np.float32, "float16": np.float16}


class TextTeacherActor:
    """Gets the teacher's artifact (``model``), never a path: ``model.path`` here is a
    verified copy on the actor's own node."""

    def __init__(self, model, signal: str, precision: str, top_k: int,
                 layers: list[int], max_length: int, text_column: str, where: str):
        import torch
        self.torch, self.signal, self.top_k, self.layers = torch, signal, top_k, layers
        self.max_length, self.text_column = max_length, text_column
        self.device = torch_device()
        self.model, self.tokenizer = load_text_model(model.path, TEXT_SIGNALS[signal], where)
        self.model.to(self.device)
        self.dtype = DTYPES[precision]
        # a causal LM learned to end sentences: give it the end token it was trained with
        self.suffix = (self.tokenizer.eos_token or "") if signal == "topk_logprobs" else ""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        enc = tokenize(self.tokenizer, [str(t) + self.suffix for t in batch[self.text_column]],
                       self.max_length)
        ids = torch.tensor(enc["input_ids"], dtype=torch.int64, device=self.device)
        mask = torch.tensor(enc["attention_mask"], dtype=torch.int64, device=self.device)
        with torch.inference_mode():
            out = self.model(input_ids=ids, attention_mask=mask,
                             output_hidden_states=self.signal == "hidden_states")
            if self.signal == "topk_logprobs":
                logp = torch.log_softmax(out.logits.float(), dim=-1)
                values, indices = logp.topk(self.top_k, dim=-1)
                rest = (1 - values.exp().sum(-1)).clamp(min=0)
                cols = {"topk_ids": indices.int(), "topk_logprobs": values, "rest_mass": rest}
            elif self.signal == "hidden_states":
                cols = {"hidden_states": torch.stack([out.hidden_states[i] for i in self.layers], 1)}
            else:
                cols = {"embedding": mean_pool(out.last_hidden_state.float(), mask)}
        cols = {k: v.cpu().numpy() for k, v in cols.items()}
        cols = {k: v if v.dtype.kind == "i" else v.astype(self.dtype) for k, v in cols.items()}
        return {**batch, **enc, **cols}

"""Generation with a ``transformers`` causal LM, shared by the stages that make a model
write (``generate-responses``, the on-policy student of ``kd-student``, ``evaluate-lm``).

- Prompts: plain text, or chat messages (JSON text, ``load-prompts``' ``messages``) put
  through the tokenizer's chat template with the generation prompt; plain text goes
  through the template too when ``chat`` is on (default: when the tokenizer has one).
- Batches are left-padded (the last position of every row is its last prompt token).
- Decoding: greedy (``temperature`` 0), or sampling from softmax(z / T) restricted to the
  top-p nucleus (Holtzman et al. 2020), each row drawing from its own generator seeded
  by (seed, row id): a row's draws do not depend on the rows batched with it, so the
  output is the same for any batching and any number of actors. ``transformers``'
  ``generate`` runs greedy; the sampling is a logits processor (``RowSampler``) that
  leaves only the row's draw finite.
- Optionally each generated token's top-k log-probabilities under the raw
  (temperature-1) distribution: log softmax(z)[top-k], from ``output_logits``.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from pipelines.errors import bad_value


def wants_chat(tokenizer, chat: bool | None, messages: bool, where: str) -> bool:
    """Whether prompts go through the chat template; chat asked of a tokenizer without
    one (or messages without one) is a clear error."""
    has = bool(getattr(tokenizer, "chat_template", None))
    use = has if chat is None else chat
    if (use or messages) and not has:
        raise bad_value(where, "chat", True if use else "messages column",
                        "a tokenizer with a chat template (this one has none); plain-text "
                        "prompts with chat: false")
    return use or messages


def prompt_text(tokenizer, prompt: str, chat: bool, messages: bool,
                system: str | None = None) -> str:
    """One prompt as the text the model continues."""
    if not chat:
        return prompt
    turns = json.loads(prompt) if messages else [{"role": "user", "content": prompt}]
    if system and not any(t["role"] == "system" for t in turns):
        turns = [{"role": "system", "content": system}] + turns
    return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)


def pad_id(tokenizer) -> int:
    """The tokenizer's padding id; its end-of-sequence token (set as its pad token) when
    it has none."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer.pad_token_id


def encode_prompts(tokenizer, texts: list[str], max_prompt_tokens: int):
    """Left-padded ids and mask; a prompt longer than ``max_prompt_tokens`` keeps its end
    (the generation prompt)."""
    pad_id(tokenizer)
    tokenizer.padding_side, tokenizer.truncation_side = "left", "left"
    return tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                     max_length=max_prompt_tokens, add_special_tokens=False)


class RowSampler:
    """A logits processor drawing each row's next token from softmax(z / T) on the top-p
    nucleus with that row's own generator; the returned scores are -inf but at the draw,
    so greedy decoding takes it."""

    def __init__(self, generators: list, temperature: float, top_p: float):
        self.generators, self.temperature, self.top_p = generators, temperature, top_p

    def __call__(self, input_ids, scores):
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            outside = sorted_p.cumsum(-1) - sorted_p >= self.top_p  # the first token stays
            sorted_p[outside] = 0.0
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        out = torch.full_like(scores, float("-inf"))
        for i, gen in enumerate(self.generators):
            token = torch.multinomial(probs[i].cpu(), 1, generator=gen)
            out[i, token.to(out.device)] = 0.0
        return out


def row_generators(seed: int, ids) -> list:
    return [torch.Generator().manual_seed((int(seed) * 1_000_003 + int(i)) % (1 << 63))
            for i in ids]


def left_padded(id_lists: list, pad_id: int) -> dict:
    """Token id lists as a left-padded batch (``input_ids``, ``attention_mask``)."""
    width = max(len(ids) for ids in id_lists)
    ids = torch.full((len(id_lists), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(id_lists), width), dtype=torch.long)
    for i, row in enumerate(id_lists):
        if len(row):
            ids[i, width - len(row):] = torch.as_tensor(list(row), dtype=torch.long)
            mask[i, width - len(row):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def generate(model, tokenizer, texts: list[str], *, max_prompt_tokens: int = 1024, **kwargs):
    """Responses to ``texts`` (already formatted); see ``generate_ids``."""
    enc = encode_prompts(tokenizer, texts, max_prompt_tokens)
    return generate_ids(model, tokenizer, enc["input_ids"], enc["attention_mask"], **kwargs)


def generate_ids(model, tokenizer, input_ids, attention_mask, *, max_new_tokens: int,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, ids=None,
                 top_k: int = 0, synced: bool = False):
    """Responses to a left-padded batch of prompts: a list of dicts with ``prompt_ids``,
    ``response_ids`` (up to and including the end-of-sequence token when generated),
    ``finish`` ("stop" or "length") and, with ``top_k``, ``topk_ids`` / ``topk_logprobs``
    of shape (response tokens, top_k). ``ids``: the rows' ids, for their generators.
    ``synced``: a model sharded across workers (FSDP) steps until every worker is done
    (under ``no_grad``: parameters FSDP gathers in inference mode could not be trained)."""
    with torch.no_grad() if synced else torch.inference_mode():
        return _generate_ids(model, tokenizer, input_ids, attention_mask,
                             max_new_tokens=max_new_tokens, temperature=temperature,
                             top_p=top_p, seed=seed, ids=ids, top_k=top_k, synced=synced)


def _generate_ids(model, tokenizer, input_ids, attention_mask, *, max_new_tokens, temperature,
                  top_p, seed, ids, top_k, synced):
    from transformers import LogitsProcessorList
    device = next(model.parameters()).device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    eos = model.generation_config.eos_token_id
    eos = set([eos] if isinstance(eos, int) else (eos or [])) | {tokenizer.eos_token_id}
    eos.discard(None)
    kwargs = {}
    if temperature > 0:
        ids = range(len(input_ids)) if ids is None else ids
        kwargs["logits_processor"] = LogitsProcessorList(
            [RowSampler(row_generators(seed, ids), temperature, top_p)])
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                         max_new_tokens=max_new_tokens, do_sample=False,
                         num_beams=1, pad_token_id=pad_id(tokenizer),
                         eos_token_id=sorted(eos), return_dict_in_generate=True,
                         output_logits=top_k > 0, temperature=None, top_p=None, top_k=None,
                         synced_gpus=synced, **kwargs)
    width = input_ids.shape[1]
    new = out.sequences[:, width:].cpu()
    if top_k > 0:
        logp = torch.stack(out.logits, dim=1).float().log_softmax(-1)  # (B, T, V)
        top = logp.topk(top_k, dim=-1)
        top_ids, top_lp = top.indices.cpu(), top.values.cpu()
    rows = []
    for r in range(len(input_ids)):
        tokens = new[r].tolist()
        stop = next((i for i, t in enumerate(tokens) if t in eos), None)
        n = len(tokens) if stop is None else stop + 1
        mask = attention_mask[r].bool().cpu()
        row = {"prompt_ids": input_ids[r].cpu()[mask].numpy().astype(np.int32),
               "response_ids": np.asarray(tokens[:n], dtype=np.int32),
               "finish": "length" if stop is None else "stop"}
        if top_k > 0:
            row["topk_ids"] = top_ids[r, :n].numpy().astype(np.int32)
            row["topk_logprobs"] = top_lp[r, :n].numpy()
        rows.append(row)
    return rows

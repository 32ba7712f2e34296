"""The student networks of ``kd-student``'s text signals that wrap a transformers encoder
(``stages.train.kd_tasks`` builds them at run time: naming a kind imports no torch)."""

from __future__ import annotations

import torch
from torch import nn

from stages.models.text import mean_pool


class EmbeddingStudent(nn.Module):
    """An encoder, mean pooling, and a projection to the teacher's width if they differ."""

    def __init__(self, encoder, teacher_width: int):
        super().__init__()
        self.encoder = encoder
        width = encoder.config.hidden_size
        self.proj = nn.Linear(width, teacher_width) if width != teacher_width else None

    def forward(self, input_ids, attention_mask):
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        e = mean_pool(h, attention_mask)
        return self.proj(e) if self.proj is not None else e


class FeatureStudent(nn.Module):
    """An encoder returning the hidden states of chosen layers, projected per layer."""

    def __init__(self, encoder, layers: list[int], teacher_width: int):
        super().__init__()
        self.encoder, self.layers = encoder, layers
        width = encoder.config.hidden_size
        self.proj = nn.ModuleList(nn.Linear(width, teacher_width) if width != teacher_width
                                  else nn.Identity() for _ in layers)

    def forward(self, input_ids, attention_mask):
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                           output_hidden_states=True)
        return torch.stack([p(out.hidden_states[i]) for p, i in zip(self.proj, self.layers)], 1)

"""``datadam``: Dataset Distillation with Attention Matching (Sajedi et al. 2023, ICCV,
arXiv 2310.00093). Like ``dm``, the synthetic images S_c of every class are learned
against randomly initialised ConvNets (never trained), but what is matched is the
network's spatial attention at every block, plus DM's mean embedding at the last one.

For a feature map f_l(x) of block l (C channels, after the block's conv-norm-ReLU-pool),
the spatial attention map is the channel-wise power sum, flattened and L2-normalised:

    a_l(x) = vec( sum_{i=1}^{C} |f_{l,i}(x)|^p ) / || vec( sum_i |f_{l,i}(x)|^p ) ||_2

and the loss over classes c, with T_c a random real batch of ``batch_real`` images and the
same differentiable siamese augmentation A(., omega) for the real and synthetic batch:

    L_SAM = sum_c sum_{l < L} || mean_{x in T_c} a_l(A(x)) - mean_{s in S_c} a_l(A(s)) ||^2
    L_MMD = sum_c || mean_{x in T_c} psi(A(x)) - mean_{s in S_c} psi(A(s)) ||^2
    L     = L_SAM + lambda_mmd * L_MMD

psi the flattened output of the last block (the embedding; its attention is not matched,
as in the paper, where the last layer's features enter through the MMD term), p =
``power`` (4 in the paper), lambda_mmd = ``mmd_weight`` (0.01 in the paper). S is
initialised from ``ipc`` random real images per class and updated with SGD (``lr_img``,
momentum 0.5), one fresh network per iteration. Checkpoints go to ``ctx.work_files``
every ``checkpoint_every`` iterations; a re-run resumes from the last one.
"""

from __future__ import annotations

import torch
from pydantic import Field

from pipelines.stage import Dataset, Stage
from stages.distill.matching import MatchingConfig, match_images

CHECKPOINT = "datadam_checkpoint.pt"


def block_outputs(net, x: torch.Tensor) -> list[torch.Tensor]:
    """The feature map after every conv block (conv, norm, ReLU, pool) of a ConvNet."""
    outs, layers = [], list(net.features)
    for i in range(0, len(layers), 4):
        for layer in layers[i:i + 4]:
            x = layer(x)
        outs.append(x)
    return outs


def attention(f: torch.Tensor, power: float) -> torch.Tensor:
    """a(f): the channel-wise sum of |f|^p per position, flattened, L2-normalised [N, HW]."""
    a = f.abs().pow(power).sum(1).flatten(1)
    return a / a.norm(dim=1, keepdim=True).clamp(min=1e-12)


def attention_loss(net, real: torch.Tensor, syn: torch.Tensor,
                   power: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_SAM, L_MMD) of one class (no graph through the real batch)."""
    with torch.no_grad():
        fr = block_outputs(net, real)
    fs = block_outputs(net, syn)
    mmd = ((fr[-1].flatten(1).mean(0) - fs[-1].flatten(1).mean(0)) ** 2).sum()
    sam = torch.zeros_like(mmd)
    for r, s in zip(fr[:-1], fs[:-1]):
        sam = sam + ((attention(r, power).mean(0) - attention(s, power).mean(0)) ** 2).sum()
    return sam, mmd


class AttentionMatching(Stage):
    kind = "datadam"
    version = "1"

    class Config(MatchingConfig):
        batch_real: int = Field(128, ge=1)           # real images per class per iteration
        power: float = Field(4.0, gt=0)              # p of the attention map
        mmd_weight: float = Field(0.01, ge=0)        # lambda of the last block's MMD term

    inputs = {"data": Dataset}
    outputs = {"synthetic": Dataset}

    def run(self, ctx, data):
        cfg = self.config

        def class_loss(net, real, syn):
            sam, mmd = attention_loss(net, real, syn, cfg.power)
            return sam + cfg.mmd_weight * mmd, {"sam_loss": sam.item(), "mmd_loss": mmd.item()}

        return {"synthetic": match_images(ctx, cfg, data, self.kind, "DataDAM", class_loss,
                                          CHECKPOINT)}

"""``dm``: Dataset Condensation with Distribution Matching (Zhao & Bilen 2023, WACV,
arXiv 2110.04181). The synthetic images S_c of every class c are learned so that their mean
embedding matches that of the real images T_c under randomly initialised networks:

    L(S) = E_{psi ~ P_psi, omega ~ Omega} sum_c || mean_{x in T_c} psi(A(x, omega))
                                                 - mean_{s in S_c} psi(A(s, omega)) ||^2

psi is the feature extractor of a freshly initialised ConvNet at every iteration (never
trained), A a differentiable siamese augmentation with the same parameters omega for the
real and synthetic batch of a class (DSA), T_c a random real batch of ``batch_real``
images. S is initialised from real images and updated with SGD (lr ``lr_img``, momentum
0.5 as in the paper). Checkpoints go to ``ctx.work_files`` every ``checkpoint_every``
iterations; a re-run resumes from the last one.
"""

from __future__ import annotations

import torch
from pipelines.stage import Dataset, Stage
from stages.distill.matching import MatchingConfig, match_images

CHECKPOINT = "dm_checkpoint.pt"


def mean_embedding_loss(net, real: torch.Tensor, syn: torch.Tensor):
    """|| mean psi(real) - mean psi(syn) ||^2 of one class (no graph through the real)."""
    with torch.no_grad():
        mu_real = net.features(real).flatten(1).mean(0)
    mu_syn = net.features(syn).flatten(1).mean(0)
    return ((mu_real - mu_syn) ** 2).sum(), {}


class DistributionMatching(Stage):
    kind = "dm"
    version = "1"

    class Config(MatchingConfig):
        pass

    inputs = {"data": Dataset}
    outputs = {"synthetic": Dataset}

    def run(self, ctx, data):
        return {"synthetic": match_images(ctx, self.config, data, self.kind, "DM",
                                          mean_embedding_loss, CHECKPOINT)}

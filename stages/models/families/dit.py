"""DiT (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers"): a class-
conditional ``DiTTransformer2DModel`` (adaLN-Zero) over 4-channel KL latents; epsilon
prediction on linear betas (VP, model time = the discrete timestep) with a learned
variance (only the first half of the output channels, epsilon, is kept).

Conditioning: a "prompt" is a class label name, mapped to its id through the pipeline's
``id2label`` (``DiTPipeline.get_label_ids``); the stored column is ``class_labels`` (int64,
one per prompt). The empty prompt is the null class, id = the number of classes
(``num_embeds_ada_norm``, 1000 for ImageNet, the id ``DiTPipeline`` feeds its unconditional
branch), so classifier-free guidance needs nothing else. No embedded guidance slot.
"""

from __future__ import annotations

import numpy as np

from pipelines.errors import bad_value, did_you_mean
from stages.models.families.base import Family
from stages.models.families.pixart import drop_learned_sigma


class DiT(Family):
    name = "dit"
    pipelines = ("DiTPipeline",)
    denoiser = "transformer"
    not_for_encoding = ("transformer", "vae", "scheduler")

    def num_classes(self, model) -> int:
        return int(model.denoiser_config.get("num_embeds_ada_norm") or 1000)

    def labels(self, model, pipe) -> dict[str, int]:
        labels = dict(getattr(pipe, "labels", None) or {})
        if not labels:  # the folder's own id2label, read as DiTPipeline does
            for key, value in (model.index.get("id2label") or {}).items():
                for label in str(value).split(","):
                    labels[label.strip()] = int(key)
        return labels

    def encode(self, model, pipe, prompts):
        labels = self.labels(model, pipe)
        null = self.num_classes(model)
        names = [str(p).strip() for p in prompts]
        unknown = sorted({n for n in names if n and n not in labels})
        if unknown:
            some = sorted(labels)[:20]
            more = f" ... ({len(labels)} in all)" if len(labels) > len(some) else ""
            raise bad_value(model.where, "prompt (a class label name of the DiT pipeline)",
                            unknown[0] if len(unknown) == 1 else unknown,
                            (f"a label of its id2label, e.g. {', '.join(some)}{more}; or '' "
                             "for the unconditional (null) class"
                             f"{did_you_mean(unknown[0], labels)}") if labels else
                            "a DiT folder whose model_index.json has id2label (it has none)")
        named = [n for n in names if n]
        if named and getattr(pipe, "labels", None):
            found = iter(pipe.get_label_ids(named))   # the pipeline's own mapping
        else:
            found = iter(labels[n] for n in named)
        ids = [next(found) if n else null for n in names]
        return {"class_labels": np.asarray(ids, dtype=np.int64)}

    def denoise(self, model, net, x, t, cond, w):
        labels = cond["class_labels"].to(x.device).long().reshape(-1)
        out = net(x, timestep=t, class_labels=labels).sample
        return drop_learned_sigma(out, x)

"""A student saved as a pipeline folder any diffusers user loads with
``DiffusionPipeline.from_pretrained``: every component of the teacher's folder (VAE,
text encoders, tokenizers ...) copied, the student denoiser written with
``save_pretrained``, the scheduler that runs it, and ``student.json`` (what the student
is, the steps its training covered). A LoRA student (Hu et al. 2022; LCM-LoRA, Luo et al.
2023, arXiv 2311.05556) also writes ``pytorch_lora_weights.safetensors`` in the diffusers
format (``save_lora_weights``), which ``pipe.load_lora_weights`` puts onto the teacher
pipeline; its folder's denoiser is the teacher's with the adapter fused in."""

from __future__ import annotations

import json
import os
import shutil

from stages.models.families.base import LatentModel

STUDENT_FILE, LORA_FILE = "student.json", "pytorch_lora_weights.safetensors"


def lora_layers(net) -> dict:
    """The adapter's weights in the diffusers LoRA format."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    return convert_state_dict_to_diffusers(get_peft_model_state_dict(net))


def save_student(model: LatentModel, net, scheduler, path: str, student: dict,
                 lora: bool = False) -> str:
    """Write the student pipeline folder at ``path`` (see the module docstring)."""
    import diffusers
    denoiser = model.family.denoiser
    skip = {denoiser, "scheduler", STUDENT_FILE, LORA_FILE, "model_index.json"}
    for name in os.listdir(model.path):                      # 1. the teacher's other parts
        if name in skip or name.startswith("."):
            continue
        src, dst = os.path.join(model.path, name), os.path.join(path, name)
        (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, dst)
    net = getattr(net, "module", net)
    if lora:                                                 # 2. LoRA weights, then fused
        pipeline_cls = getattr(diffusers, model.pipeline_class)
        pipeline_cls.save_lora_weights(path, **{f"{denoiser}_lora_layers": lora_layers(net)},
                                       safe_serialization=True)
        net.fuse_lora()
        net.unload_lora()
    net.save_pretrained(os.path.join(path, denoiser))        # 3. denoiser, scheduler, index
    scheduler.save_pretrained(os.path.join(path, "scheduler"))
    index = dict(model.index)
    index["scheduler"] = ["diffusers", type(scheduler).__name__]
    index[denoiser] = ["diffusers", type(net).__name__]
    with open(os.path.join(path, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
    with open(os.path.join(path, STUDENT_FILE), "w") as f:
        json.dump(student, f, indent=2)
    return path

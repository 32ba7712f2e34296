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


def fuse_lora(net):
    """Merge every LoRA layer into its base layer and put the base layer back: the plain
    denoiser, with W + (alpha / r) B A as its weights."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    for name, module in list(net.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent) if parent else net, child, module.get_base_layer())
    if "peft_config" in vars(net):
        del net.peft_config
    if hasattr(net, "_hf_peft_config_loaded"):
        net._hf_peft_config_loaded = False
    return net


def save_lora(model: LatentModel, net, path: str) -> None:
    """``pytorch_lora_weights.safetensors`` in the diffusers format, through the pipeline
    class's own ``save_lora_weights`` where it has one (keys ``<denoiser>.…``)."""
    import diffusers
    from safetensors.torch import save_file
    layers = lora_layers(net)
    pipeline_cls = getattr(diffusers, model.pipeline_class)
    if hasattr(pipeline_cls, "save_lora_weights"):
        pipeline_cls.save_lora_weights(path, **{f"{model.family.denoiser}_lora_layers": layers},
                                       safe_serialization=True)
    else:
        save_file({f"{model.family.denoiser}.{k}": v.contiguous() for k, v in layers.items()},
                  os.path.join(path, LORA_FILE))


def save_student(model: LatentModel, net, scheduler, path: str, student: dict,
                 lora: bool = False) -> str:
    """Write the student pipeline folder at ``path`` (see the module docstring)."""
    denoiser = model.family.denoiser
    skip = {denoiser, "scheduler", STUDENT_FILE, LORA_FILE, "model_index.json"}
    for name in os.listdir(model.path):                      # 1. the teacher's other parts
        if name in skip or name.startswith("."):
            continue
        src, dst = os.path.join(model.path, name), os.path.join(path, name)
        (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, dst)
    net = getattr(net, "module", net)
    if lora:                                                 # 2. LoRA weights, then fused
        save_lora(model, net, path)
        fuse_lora(net)
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

"""GGUF model files (llama.cpp's format) as ``transformers`` folders: the file is found
(named, or the one ``.gguf`` in a folder), its architecture read from the header
(``general.architecture``) and checked against the ones this transformers can
dequantise, then loaded with ``from_pretrained(folder, gguf_file=name)`` (quantised
tensors dequantised to float32, the tokenizer and chat template rebuilt from the header's
``tokenizer.*`` keys) and saved as a plain safetensors folder that later stages load in
seconds. Needs the ``gguf`` package (installed by ``make install``).
"""

from __future__ import annotations

import os

from pipelines.errors import UserError, allowed_list, bad_value

GGUF = ".gguf"


def gguf_files(folder: str) -> list[str]:
    return sorted(f for f in os.listdir(folder) if f.endswith(GGUF)) if os.path.isdir(folder) else []


def find_gguf(folder: str, name: str | None, where: str) -> str:
    """The GGUF file ``name`` in ``folder``, or its only ``.gguf`` file when ``name`` is
    None; anything else is one clear error listing what the folder holds."""
    found = gguf_files(folder)
    if name is not None:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise bad_value(where, "gguf_file", name, f"a GGUF file in {folder}: "
                            f"{allowed_list(found) or '(it holds none)'}")
        return path
    if len(found) != 1:
        have = allowed_list(found) if found else "none"
        raise bad_value(where, "gguf_file", None, f"the name of one GGUF file: {folder} holds "
                        f"{len(found)} .gguf files ({have}); give gguf_file")
    return os.path.join(folder, found[0])


def supported_architectures() -> list[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    return [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]


def architecture(path: str, where: str) -> str:
    """``general.architecture`` of the GGUF header; a file that is not GGUF, or of an
    architecture transformers cannot dequantise, is a clear error."""
    from gguf import GGUFReader
    try:
        reader = GGUFReader(path)
        arch = reader.fields["general.architecture"].contents()
    except (ValueError, KeyError, OSError) as e:
        raise bad_value(where, "GGUF file", path, f"a GGUF file with a "
                        f"general.architecture key ({type(e).__name__}: {e})") from None
    if arch not in supported_architectures():
        raise bad_value(where, "GGUF architecture", arch, "one transformers can dequantise: "
                        + allowed_list(supported_architectures()))
    return str(arch)


def dequantise(path: str, out: str, auto_class: str, where: str):
    """The GGUF file at ``path`` loaded with ``auto_class`` in float32 and saved to
    ``out`` (safetensors, config, tokenizer with its chat template); returns (model,
    tokenizer)."""
    import torch
    import transformers
    folder, name = os.path.split(path)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = getattr(transformers, auto_class).from_pretrained(
            folder, gguf_file=name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"{where}: the GGUF file {path} did not load with {auto_class} "
                        f"({type(e).__name__}: {e})") from None
    # transformers marks a GGUF-loaded model as quantised and refuses to save it: the same
    # (already float32) weights in a plain model of the same config
    config = model.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    plain = getattr(transformers, auto_class).from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    model = plain.eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return model, tokenizer

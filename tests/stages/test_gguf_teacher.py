"""pretrained-model with a GGUF file: dequantised once into a safetensors transformers
folder that reproduces the model's logits, with its tokenizer and chat template."""

import json
import os

import pytest
import torch

from pipelines.errors import UserError
from stages.teacher.pretrained_model import PretrainedModel
from tests.stages import lm_tiny
from tests.stages.conftest import run_stage


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM
    root = tmp_path_factory.mktemp("tiny")
    folder = lm_tiny.build("llama", str(root / "hf"))
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    return {"folder": folder, "model": model,
            "gguf": lm_tiny.gguf_package(str(root / "pkg"), model)}


def test_gguf_file_is_stored_as_a_plain_folder_with_the_same_logits(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out, _ = run_stage(PretrainedModel, {"path": tiny["gguf"]}, tmp_path, "teacher")
    model = out["model"]
    assert model.info["use"] == "causal-lm" and model.info["gguf_architecture"] == "llama"
    assert model.info["gguf_file"] == "tiny.Q.gguf" and model.info["num_layers"] == 4
    assert os.path.isfile(os.path.join(model.path, "model.safetensors"))
    assert not [f for f in os.listdir(model.path) if f.endswith(".gguf")]
    loaded = AutoModelForCausalLM.from_pretrained(model.path).eval()  # plain, no gguf_file
    tok = AutoTokenizer.from_pretrained(model.path)
    ids = tok(["the cat sat on the mat"], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(loaded(**ids).logits, tiny["model"](**ids).logits, atol=1e-5)
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # the same file named in its folder gives the same model
    named, _ = run_stage(PretrainedModel, {"path": os.path.dirname(tiny["gguf"]),
                                           "gguf_file": "tiny.Q.gguf"}, tmp_path / "b", "t")
    assert named["model"].info["params"] == model.info["params"]


def package(root, name: str, files: dict):
    """An importable package ``name`` under ``root`` holding ``files`` (name -> source)."""
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text("")
    for file, src in files.items():
        os.symlink(src, folder / file)
    return str(root)


def test_gguf_from_a_package_root(tiny, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(package(tmp_path / "p", "tiny_gguf_pkg",
                                        {"tiny.Q.gguf": tiny["gguf"]}))
    out, _ = run_stage(PretrainedModel, {"package": "tiny_gguf_pkg"}, tmp_path / "o", "t")
    assert out["model"].info["gguf_file"] == "tiny.Q.gguf"
    assert out["model"].info["use"] == "causal-lm"


def test_gguf_bad_input(tiny, tmp_path, monkeypatch):
    pkg = os.path.dirname(tiny["gguf"])
    with pytest.raises(UserError, match=r"field 'gguf_file'.*'nope.gguf'.*tiny\.Q\.gguf"):
        run_stage(PretrainedModel, {"path": pkg, "gguf_file": "nope.gguf"}, tmp_path, "t")
    monkeypatch.syspath_prepend(package(tmp_path / "p", "two_gguf_pkg",
                                        {"a.gguf": tiny["gguf"], "b.gguf": tiny["gguf"]}))
    with pytest.raises(UserError, match=r"stage 't' \(pretrained-model\) field 'gguf_file'.*"
                                        r"holds 2 \.gguf files \(a\.gguf, b\.gguf\); give gguf_file"):
        run_stage(PretrainedModel, {"package": "two_gguf_pkg"}, tmp_path / "o", "t")
    monkeypatch.syspath_prepend(package(tmp_path / "q", "no_gguf_pkg", {}))
    with pytest.raises(UserError, match=r"field 'package'.*'no_gguf_pkg'.*a model folder "
                                        r"'model' or one \.gguf file"):
        run_stage(PretrainedModel, {"package": "no_gguf_pkg"}, tmp_path / "o2", "t")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(UserError, match=r"field 'path'.*GGUF file.*junk\.gguf"):
        run_stage(PretrainedModel, {"path": str(junk)}, tmp_path / "j", "t")


def test_gguf_architecture_transformers_cannot_dequantise(tmp_path):
    import gguf
    f = str(tmp_path / "rwkv.gguf")
    w = gguf.GGUFWriter(f, "rwkv6")
    w.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UserError, match=r"GGUF architecture.*'rwkv6'.*llama.*qwen2"):
        run_stage(PretrainedModel, {"path": f}, tmp_path, "t")


def test_tiny_instruct_folders_have_chat_templates(tmp_path):
    from transformers import AutoTokenizer
    for arch in ("llama", "qwen2", "gpt2"):
        folder = lm_tiny.build(arch, str(tmp_path / arch))
        tok = AutoTokenizer.from_pretrained(folder)
        assert tok.chat_template and json.load(open(os.path.join(folder, "config.json")))[
            "model_type"] == arch

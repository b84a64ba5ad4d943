"""Drafter kinds and the checkpoint formats they load from, in one place.

A kind is what ``EngineConfig.drafter`` names (and the CLI's ``--drafter``, a request's
``speculation``); a format is a directory layout a kind is read from. ``detect_format``
tells the formats apart by their files:

| format     | kind   | config.json                                | weights (tensor names)                                   |
|------------|--------|--------------------------------------------|----------------------------------------------------------|
| `treespec` | any    | a `kind` key (this project's trainers)     | model.safetensors                                        |
| `eagle`    | eagle  | a Llama config (EAGLE-1/2, yuhuili/EAGLE-*) | model.safetensors or pytorch_model.bin: `fc.*`, `layers.*` |
| `eagle3`   | eagle3 | `draft_vocab_size` (EAGLE-3)               | model.safetensors or pytorch_model.bin: `fc.*`, `midlayer.*`, `d2t` |
| `medusa1`  | medusa | `medusa_num_heads` (FasterDecoding Medusa-1) | medusa_lm_head.pt, medusa_lm_head.safetensors or model.safetensors: `{head}.{block}.linear.*`, `{head}.{blocks}.weight` |

``check_target`` then checks the drafter's sizes against the target's. Converting a
published format's tensors to this project's modules is engine/drafters/published.py.

No torch at import: engine/config.py takes ``KINDS`` from here.
"""
from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass, field

KINDS = ("eagle", "eagle3", "medusa")  # drafter kinds, without "off" / "auto"

# Weight file names per format, preferred first.
FORMAT_FILES = {
    "treespec": ("model.safetensors",),
    "eagle": ("model.safetensors", "pytorch_model.bin"),
    "eagle3": ("model.safetensors", "pytorch_model.bin"),
    "medusa1": ("medusa_lm_head.safetensors", "medusa_lm_head.pt", "model.safetensors"),
}
FORMAT_KIND = {"eagle": "eagle", "eagle3": "eagle3", "medusa1": "medusa"}  # treespec: its config's kind
WEIGHT_FILES = tuple(dict.fromkeys(f for files in FORMAT_FILES.values() for f in files))
LLAMA_KEYS = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size")
# EAGLE-1/2's one decoder layer under its published names; layer 0 has no input_layernorm.
EAGLE_LAYER_KEYS = tuple(f"layers.0.self_attn.{p}_proj.weight" for p in "qkvo") + tuple(
    f"layers.0.mlp.{p}_proj.weight" for p in ("gate", "up", "down")) + ("layers.0.post_attention_layernorm.weight",)
MEDUSA_BLOCK = re.compile(r"^(\d+)\.(\d+)\.linear\.weight$")


@dataclass(frozen=True)
class DrafterFormat:
    """What a drafter directory holds.

    kind: the drafter kind it serves ("eagle", "eagle3", "medusa"); name: its format
    ("treespec", "eagle", "eagle3", "medusa1"); files: its weight file(s) (paths);
    config: config.json; shapes: tensor name -> shape as stored (read without the data).
    """

    kind: str
    name: str
    path: str
    files: tuple[str, ...]
    config: dict = field(repr=False)
    shapes: dict = field(repr=False)

    @property
    def published(self) -> bool:
        """A format as its authors ship it (converted on load), not this project's own."""
        return self.name != "treespec"


def detect_format(path: str) -> DrafterFormat:
    """The format of the drafter directory ``path``, from config.json and the weight files'
    tensor names. FileNotFoundError when ``path`` is not a directory; ValueError naming what
    was found and what is missing when it holds no drafter this project loads."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"drafter directory {path!r} does not exist")
    present = [f for f in WEIGHT_FILES if os.path.isfile(os.path.join(path, f))]
    config = _read_config(path)
    if config is None:
        raise ValueError(f"{path}: no drafter found: no config.json; weight files: {_listed(present)}")
    arch = " ".join(config.get("architectures") or [])
    if "kind" in config:
        if config["kind"] not in KINDS:
            raise ValueError(f"{path}/config.json names an unknown drafter kind {config['kind']!r} "
                             f"(one of {', '.join(KINDS)})")
        name = "treespec"
    elif "medusa_num_heads" in config:
        name = "medusa1"
    elif "draft_vocab_size" in config or "eagle3" in arch.lower():
        name = "eagle3"
    elif all(k in config for k in LLAMA_KEYS):
        name = "eagle"
    else:
        raise ValueError(f"{path}: no drafter found: config.json has neither 'kind', 'medusa_num_heads', "
                         f"'draft_vocab_size' nor a Llama decoder's sizes ({', '.join(LLAMA_KEYS)}); "
                         f"weight files: {_listed(present)}")
    file = next((f for f in FORMAT_FILES[name] if f in present), None)
    if file is None:
        raise ValueError(f"{path}: a {_DESCRIBED[name]} config.json but no weight file: none of "
                         f"{', '.join(FORMAT_FILES[name])}")
    shapes = tensor_shapes(os.path.join(path, file))
    if name == "eagle" and any(k.startswith("midlayer.") for k in shapes):
        name = "eagle3"  # an EAGLE-3 layer under a plain Llama config
    _check_names(path, name, file, shapes)
    kind = config["kind"] if name == "treespec" else FORMAT_KIND[name]
    return DrafterFormat(kind, name, path, (os.path.join(path, file),), config, shapes)


_DESCRIBED = {"treespec": "drafter", "eagle": "Llama (EAGLE-1/2)", "eagle3": "EAGLE-3", "medusa1": "Medusa-1"}


def _listed(files: list[str]) -> str:
    return ", ".join(files) if files else f"none of {', '.join(WEIGHT_FILES)}"


def _read_config(path: str) -> dict | None:
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        return None
    try:
        with open(file) as f:
            config = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file} is not a JSON object")
    return config


def _check_names(path: str, name: str, file: str, shapes: dict) -> None:
    """ValueError unless the weight file holds the tensors its format needs."""
    if name == "eagle":
        missing = [k for k in ("fc.weight",) + EAGLE_LAYER_KEYS if k not in shapes]
        if missing:
            raise ValueError(f"{path}: a Llama config.json, but {file} is no EAGLE-1/2 drafter: it lacks "
                             f"{', '.join(missing)}")
    elif name == "eagle3":  # the layer's names vary by exporter; engine/drafters/eagle3.py checks them
        if _eagle3_fc(shapes) is None:
            raise ValueError(f"{path}: an EAGLE-3 config.json, but {file} has no fc.weight")
    elif name == "medusa1":
        if not any(MEDUSA_BLOCK.match(k) for k in shapes):
            raise ValueError(f"{path}: a Medusa config.json, but {file} holds no head blocks "
                             f"('<head>.<block>.linear.weight')")


def _eagle3_fc(shapes: dict) -> tuple | None:
    return shapes.get("fc.weight", shapes.get("model.fc.weight"))


def medusa_layout(shapes: dict) -> tuple[int, int]:
    """(heads, residual blocks per head) of a published Medusa-1 file, counted from its tensor
    names: head i has blocks ``i.j.linear.*`` for j < blocks and its lm_head ``i.blocks.weight``."""
    blocks: dict[int, set[int]] = {}
    for k in shapes:
        m = MEDUSA_BLOCK.match(k)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    return len(blocks), max(len(b) for b in blocks.values())


def check_target(fmt: DrafterFormat, target) -> None:
    """ValueError unless the drafter fits the target (an engine.config.ModelConfig): its hidden
    size, its vocabulary (the target's embedding and lm_head are shared) and, for EAGLE-3,
    the target layers it reads."""
    c, s, where = fmt.config, fmt.shapes, fmt.path
    H, V = target.hidden_size, target.vocab_size
    if fmt.name == "treespec":
        hidden, vocab, what = c.get("hidden_size"), c.get("vocab_size"), "config.json"
    elif fmt.name == "eagle":
        hidden, vocab, what = s["fc.weight"][0], c.get("vocab_size", V), "fc.weight"
        if tuple(s["fc.weight"]) != (hidden, 2 * hidden):
            raise ValueError(f"{where}: fc.weight is {list(s['fc.weight'])}, not [H, 2H] (embedding ; feature)")
        if "embed_tokens.weight" in s:
            vocab = s["embed_tokens.weight"][0]
    elif fmt.name == "eagle3":
        # Its own hidden size may differ from the target's (it then ships its embedding); fc
        # reads the target's features: n layers x the target's hidden size.
        from engine.drafters.eagle3 import eagle3_feature_layers  # the layer-id conventions

        layers = eagle3_feature_layers(c, target)  # ValueError: ids outside the target's layers
        fc = _eagle3_fc(s)
        if fc[1] != len(layers) * H:
            raise ValueError(f"{where}: fc.weight is {list(fc)}: it reads {fc[1]} features, not "
                             f"{len(layers)} target layers x {H} (the target's hidden size)")
        hidden, vocab, what = H, c.get("vocab_size", V), "fc.weight"
    else:  # medusa1
        heads, blocks = medusa_layout(s)
        head = s.get(f"0.{blocks}.weight")
        if head is None:
            raise ValueError(f"{where}: Medusa head 0 has {blocks} block(s) but no lm_head '0.{blocks}.weight'")
        vocab, hidden, what = head[0], head[1], f"0.{blocks}.weight"
    if hidden != H:
        raise ValueError(f"{where}: the drafter's hidden size is {hidden} ({what}), the target's {H}")
    if vocab != V:
        raise ValueError(f"{where}: the drafter's vocabulary has {vocab} tokens, the target's {V}")


def tensor_shapes(file: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a weight file, without reading the tensors: a safetensors
    header, or a torch pickle (pytorch_model.bin, medusa_lm_head.pt) memory-mapped."""
    if file.endswith(".safetensors"):
        try:
            with open(file, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        except (struct.error, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{file}: not a safetensors file ({exc})") from None
        return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    state = load_pickle(file, mmap=True)
    return {k: tuple(v.shape) for k, v in state.items()}


def load_pickle(file: str, mmap: bool = False) -> dict:
    """A torch state dict saved with torch.save, tensors only (``weights_only``: no code runs)."""
    import pickle

    import torch

    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError:
            if not mmap:
                raise
            state = torch.load(file, map_location="cpu", weights_only=True)  # a pre-zip pickle cannot be mapped
    except (RuntimeError, pickle.UnpicklingError, EOFError) as exc:  # keep the reason on one line
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{file}: not a torch state dict of tensors ({reason})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{file}: not a flat state dict of tensors")
    return state

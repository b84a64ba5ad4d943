"""What EAGLE and Medusa training share: the data in memory, the draft vocabulary, the schedule, the CLI."""
from __future__ import annotations

import json
import math
import os
import random
import sys
from dataclasses import dataclass

import torch

from train.data import load_dataset


@dataclass
class Example:
    tokens: torch.Tensor  # [L] int64, prompt + response
    feats: torch.Tensor  # [L, H] bfloat16, target final hidden state of each token
    prompt_len: int
    category: str


def load_examples(data_dir: str, limit: int | None = None) -> list[Example]:
    return [Example(torch.tensor(r["token_ids"], dtype=torch.long), r["features"], r["prompt_len"], r["category"])
            for r in load_dataset(data_dir, limit)]


def split(examples: list[Example], val_frac: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A deterministic train/validation split of whole sequences."""
    idx = list(range(len(examples)))
    random.Random(seed).shuffle(idx)
    n_val = int(round(len(idx) * val_frac)) if len(idx) > 1 else 0
    return [examples[i] for i in idx[n_val:]], [examples[i] for i in idx[:n_val]]


def draft_vocab(examples: list[Example], size: int, vocab_size: int, always=()) -> torch.Tensor | None:
    """The ``size`` most frequent ids of the responses (plus ``always``, e.g. EOS), most frequent
    first, so that every prefix is a smaller draft vocabulary (``EngineConfig.draft_vocab_size``);
    None = full vocab."""
    if not size or size >= vocab_size:
        return None
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for ex in examples:
        counts += torch.bincount(ex.tokens[ex.prompt_len:], minlength=vocab_size)
    for t in always:
        counts[t] = counts.max() + 1
    # Ties (unseen ids) break by id, so the set is deterministic.
    order = torch.argsort(counts * vocab_size + (vocab_size - 1 - torch.arange(vocab_size)), descending=True)
    return order[:size]


def choose_draft_vocab(examples: list[Example], size: int | None, target, init_cfg: dict | None,
                       init_ids: torch.Tensor | None) -> tuple[torch.Tensor | None, str]:
    """(draft vocabulary ids, their order) for a training run: the --init-from drafter's unless
    ``size`` is given (its weights do not depend on the vocabulary, so a continued run may
    re-select it), else the 8192 most frequent. Order is "frequency" for ids chosen here."""
    if init_cfg is not None and size is None:
        return init_ids, (init_cfg.get("draft_vocab_order", "id") if init_ids is not None else "id")
    ids = draft_vocab(examples, 8192 if size is None else size, target.vocab_size, target.eos_token_id)
    return ids, ("frequency" if ids is not None else "id")


def vocab_coverage(examples: list[Example], ids: torch.Tensor | None) -> float:
    if ids is None:
        return 1.0
    keep = torch.zeros(int(max(int(ids.max()), max(int(e.tokens.max()) for e in examples))) + 1, dtype=torch.bool)
    keep[ids] = True
    hit = sum(int(keep[e.tokens[e.prompt_len:]].sum()) for e in examples)
    return hit / max(1, sum(len(e.tokens) - e.prompt_len for e in examples))


def target_map(ids: torch.Tensor | None, vocab_size: int) -> torch.Tensor:
    """target id -> draft row (-100 where the id is outside the draft vocabulary)."""
    m = torch.full((vocab_size,), -100, dtype=torch.long)
    if ids is None:
        return torch.arange(vocab_size)
    m[ids] = torch.arange(len(ids))
    return m


def batches(examples: list[Example], max_tokens: int, rng: random.Random) -> list[list[Example]]:
    """Length-bucketed batches of whole sequences, at most ~max_tokens padded tokens each, shuffled."""
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i].tokens), rng.random()))
    out, cur, longest = [], [], 0
    for i in order:
        n = len(examples[i].tokens)
        if cur and max(longest, n) * (len(cur) + 1) > max_tokens:
            out.append(cur)
            cur, longest = [], 0
        cur.append(examples[i])
        longest = max(longest, n)
    if cur:
        out.append(cur)
    rng.shuffle(out)
    return out


def pad_batch(batch: list[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> tokens [B, n] (0-padded), feats [B, n, H] bf16, valid [B, n] bool, prompt_len [B]."""
    n = max(len(e.tokens) for e in batch)
    h = batch[0].feats.shape[1]
    toks = torch.zeros(len(batch), n, dtype=torch.long)
    feats = torch.zeros(len(batch), n, h, dtype=torch.bfloat16)
    valid = torch.zeros(len(batch), n, dtype=torch.bool)
    for b, e in enumerate(batch):
        L = len(e.tokens)
        toks[b, :L], feats[b, :L], valid[b, :L] = e.tokens, e.feats, True
    return toks, feats, valid, torch.tensor([e.prompt_len for e in batch])


class Schedule:
    """How many steps to run and the learning rate of each: 3% linear warm-up, then cosine to 10%.

    With a time budget (minutes) the step count is re-fitted every 10 steps to the
    measured step time (shared CPUs change speed), never above the epoch count.
    """

    def __init__(self, total: int, lr: float, time_budget_min: float = 0.0):
        self.total = self.max_total = total
        self.peak, self.budget_s = lr, time_budget_min * 60

    def lr(self, step: int) -> float:
        warm = max(1, int(0.03 * self.total))
        if step < warm:
            return self.peak * (step + 1) / warm
        return self.peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, self.total - warm))))

    def refit(self, step: int, elapsed_s: float, bar=None) -> bool:
        """Re-fit total to the budget after `step` steps took elapsed_s (and a tqdm bar's total); True on change."""
        if not self.budget_s or step < 10 or step % 10:
            return False
        old = self.total
        self.total = max(step + 1, min(self.max_total, int(self.budget_s * step / max(elapsed_s, 1e-9))))
        if bar is not None and self.total != old:
            bar.total = self.total
            bar.refresh()
        return self.total != old


def init_state(path: str | None, kind: str) -> tuple[dict | None, dict | None, torch.Tensor | None]:
    """(config, float32 state, draft vocabulary ids) of a drafter to continue training from.

    ``--init-from DIR`` fine-tunes an existing drafter (the shipped one, or a checkpoint)
    on new data or for more steps: the architecture and draft vocabulary come from DIR.
    Returns (None, None, None) without a path.
    """
    if not path:
        return None, None, None
    from engine.drafters.common import read_drafter

    config, state = read_drafter(path)
    if config.get("kind") != kind:
        raise ValueError(f"--init-from {path} holds a {config.get('kind')} drafter, not {kind}")
    ids = state.pop("draft_vocab_ids", None)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    return config, state, (None if ids is None else ids.long())


def layer_counts(requested: int | None, init_cfg: dict | None, init_path: str | None) -> tuple[int, int]:
    """(layers of the --init-from drafter, layers to train): ``requested`` (0/None: as the init
    drafter, else 1); growing is allowed (appended layers start as the identity), shrinking not."""
    init_layers = init_cfg.get("num_layers", 1) if init_cfg else 1
    layers = requested or init_layers
    if init_cfg and layers < init_layers:
        raise ValueError(f"--layers {layers} is fewer than the {init_layers} layers (blocks per head) of --init-from {init_path}")
    return init_layers, layers


def prior_training(config: dict | None, path: str | None) -> dict | None:
    """What the --init-from drafter had been trained for (kept in the new card)."""
    if not config:
        return None
    t = config.get("train") or {}
    return {"path": path, "steps": t.get("steps", 0) + ((t.get("init_from") or {}).get("steps", 0)),
            "seconds": round(t.get("seconds", 0) + ((t.get("init_from") or {}).get("seconds", 0)), 1)}


def optimizer_step(opt, model, loss, max_grad_norm: float = 1.0) -> None:
    """Backward, clip the global gradient norm, update: one training step of either trainer."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    opt.step()


def drafter_state(model, draft_vocab_ids: torch.Tensor | None) -> dict:
    """The tensors a drafter checkpoint holds: the model's, and its draft vocabulary if any."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if draft_vocab_ids is not None:
        state["draft_vocab_ids"] = draft_vocab_ids.to(torch.int32)
    return state


def finish_training(out: str, columns: list[str], log: list[list[float]], info: dict, **extra) -> dict:
    """Write train_log.json (at most ~500 of the per-step rows) beside the drafter; the run's summary."""
    with open(os.path.join(out, "train_log.json"), "w") as f:
        json.dump({"columns": columns, "rows": log[:: max(1, len(log) // 500)], **extra}, f)
    return {"first_loss": log[0][1] if log else None, "last_loss": log[-1][1] if log else None, **info}


def cli(train, parse_args, argv=None) -> int:
    """Shared ``main`` of the trainers: bad data or flags are one-line errors, exit status 2."""
    args = parse_args(argv)
    try:
        train(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0

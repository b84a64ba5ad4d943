"""Train Medusa heads: ``python -m train.medusa --data DIR --out DIR``.

Head i reads the target feature f[t] and predicts token t+2+i (the lm_head of
f[t] itself gives t+1, the pending token at serve time). Loss: per-head
cross-entropy against the target's tokens over the draft vocabulary, head i
weighted decay**i. After training, each head's top-k rank accuracy on held-out
sequences is stored as ``rank_acc`` in the config: it shapes the static tree.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from train.common import (
    Schedule, cli, choose_draft_vocab, drafter_state, finish_training, optimizer_step, init_state, layer_counts,
    prior_training, load_examples, split, target_map, vocab_coverage,
)

RANKS = 10


def flatten(examples, num_heads: int, vmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> features [N, H] bf16 and draft-row labels [N, K] (-100: past the end or outside the draft vocab).

    One row per position t whose next-next token t+2 is a response token.
    """
    xs, ys = [], []
    for e in examples:
        L = len(e.tokens)
        start = max(0, e.prompt_len - 2)
        if L - 2 <= start:
            continue
        t = torch.arange(start, L - 2)
        lab = torch.full((len(t), num_heads), -100, dtype=torch.long)
        for i in range(num_heads):
            j = t + 2 + i
            ok = j < L
            lab[ok, i] = vmap[e.tokens[j[ok]]]
        xs.append(e.feats[start: L - 2])
        ys.append(lab)
    return torch.cat(xs), torch.cat(ys)


def medusa_loss(model, head_w, x, y, decay=0.8):
    """x [N, H], y [N, K] -> (loss, per-head top-1 accuracy)."""
    feats = model(x)  # [K, N, H]
    loss, accs = 0.0, []
    for i in range(feats.shape[0]):
        logits = (feats[i].to(head_w.dtype) @ head_w.T).float()
        ok = y[:, i] >= 0
        if ok.any():
            loss = loss + decay ** i * F.cross_entropy(logits[ok], y[ok, i])
            accs.append(float((logits[ok].argmax(-1) == y[ok, i]).float().mean()))
        else:
            accs.append(0.0)
    return loss, accs


@torch.no_grad()
def rank_accuracy(model, head_w, x, y, ranks: int = RANKS, chunk: int = 4096) -> list[list[float]]:
    """rank_acc[i][r]: fraction of positions where head i's rank-r candidate is the true token."""
    k = y.shape[1]
    hits = torch.zeros(k, ranks)
    count = torch.zeros(k)
    for s in range(0, len(x), chunk):
        feats = model(x[s: s + chunk].float())
        for i in range(k):
            yy = y[s: s + chunk, i]
            top = (feats[i].to(head_w.dtype) @ head_w.T).float().topk(ranks, dim=-1).indices
            valid = yy >= 0
            hits[i] += (top[valid] == yy[valid].unsqueeze(1)).float().sum(0)
            count[i] += (y[s: s + chunk, i] != -100).sum()  # out-of-vocab labels count as misses
    return (hits / count.clamp_min(1).unsqueeze(1)).round(decimals=4).tolist()


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m train.medusa", description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=".cache/drafter-data/smollm2-135m",
                    help="Parquet shards from train.data (DIR, or DIR1,DIR2 to train on several)")
    ap.add_argument("--model", default="default")
    ap.add_argument("--out", default="assets/medusa-smollm2-135m")
    ap.add_argument("--init-from", default=None, help="drafter directory to continue training (e.g. the shipped one)")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=None,
                    help="residual blocks per head (default 1, or the --init-from drafter's; more than it "
                         "has appends identity blocks)")
    ap.add_argument("--draft-vocab", type=int, default=None,
                    help="draft vocabulary size (0: full; default: 8192, or --init-from's, which this re-selects)")
    ap.add_argument("--epochs", type=float, default=10)
    ap.add_argument("--max-steps", type=int, default=0)
    ap.add_argument("--time-budget", type=float, default=0, help="minutes; fit the step count into it")
    ap.add_argument("--batch", type=int, default=1024, help="positions per step")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--decay", type=float, default=0.8, help="head i loss weight decay**i")
    ap.add_argument("--val-frac", type=float, default=0.05)
    ap.add_argument("--save-every", type=int, default=200)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None)
    return ap.parse_args(argv)


def train(args) -> dict:
    from engine.config import ModelConfig
    from engine.drafters.common import save_drafter
    from engine.drafters.loading import target_embed_and_head
    from engine.drafters.medusa import MedusaConfig, MedusaModel
    from engine.weights import resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    model_dir = resolve_model(args.model)
    target = ModelConfig.from_path(model_dir)
    train_ex, val_ex = split(load_examples(args.data, args.limit), args.val_frac, args.seed)
    init_cfg, init, ids = init_state(args.init_from, "medusa")
    ids, order = choose_draft_vocab(train_ex, args.draft_vocab, target, init_cfg, ids)
    vmap = target_map(ids, target.vocab_size)
    _, lm_head = target_embed_and_head(model_dir, torch.bfloat16)
    head_w = (lm_head if ids is None else lm_head[ids]).to(dev)
    heads = init_cfg["num_heads"] if init_cfg else args.heads
    x, y = flatten(train_ex, heads, vmap)
    xv, yv = flatten(val_ex, heads, vmap) if val_ex else (x[:0], y[:0])
    x, y = x.to(dev), y.to(dev)
    init_layers, layers = layer_counts(args.layers, init_cfg, args.init_from)
    cfg = MedusaConfig(target.hidden_size, target.vocab_size, heads, layers, None if ids is None else len(ids),
                       order)
    model = MedusaModel(cfg, torch.float32)
    if init is not None:
        # Blocks beyond the init drafter's keep their identity initialisation.
        missing, unexpected = model.load_state_dict(init, strict=False)
        if unexpected or any(not re.match(rf"heads\.\d+\.({'|'.join(map(str, range(init_layers, layers)))})\.", k)
                             for k in missing):
            raise ValueError(f"--init-from {args.init_from} does not match a {heads}-head Medusa drafter")
    model = model.to(dev).train()
    per_epoch = max(1, len(x) // args.batch)
    total = args.max_steps or max(1, int(args.epochs * per_epoch))
    sched = Schedule(total, args.lr, args.time_budget)
    print(f"medusa: {len(x)} train / {len(xv)} val positions, draft vocab {cfg.draft_vocab_size or target.vocab_size}"
          f" (covers {vocab_coverage(train_ex, ids):.3f}), {per_epoch} steps/epoch", file=sys.stderr)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    t0, step, log = time.time(), 0, []

    def save(final=False):
        if final and len(xv):
            cfg.rank_acc = rank_accuracy(model, head_w, xv.to(dev), yv.to(dev))
        state = drafter_state(model, ids)
        info = {"steps": step, "epochs": round(step / per_epoch, 2), "positions": len(x),
                "seconds": round(time.time() - t0, 1), "lr": args.lr, "seed": args.seed,
                "init_from": prior_training(init_cfg, args.init_from)}
        save_drafter(args.out, {**cfg.to_dict(), "train": info}, state)
        return info

    bar = tqdm(total=total, desc="medusa")
    while step < sched.total:
        perm = torch.randperm(len(x), generator=gen).to(dev)
        for s in range(0, len(perm) - args.batch + 1 if len(perm) >= args.batch else 1, args.batch):
            if step >= sched.total:
                break
            idx = perm[s: s + args.batch]
            for g in opt.param_groups:
                g["lr"] = sched.lr(step)
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                loss, accs = medusa_loss(model, head_w, x[idx].float(), y[idx], args.decay)
            optimizer_step(opt, model, loss)
            step += 1
            log.append([step, float(loss.detach())] + accs)
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", acc=",".join(f"{a:.2f}" for a in accs))
            sched.refit(step, time.time() - t0, bar)
            if args.save_every and step % args.save_every == 0 and step < sched.total:
                save()
    bar.close()
    info = save(final=True)
    print(json.dumps({**info, "rank_acc_top1": [r[0] for r in (cfg.rank_acc or [])]}), file=sys.stderr)
    columns = ["step", "loss"] + [f"head{i}_acc" for i in range(heads)]
    return finish_training(args.out, columns, log, info, rank_acc=cfg.rank_acc)


def main(argv=None) -> int:
    return cli(train, parse_args, argv)


if __name__ == "__main__":
    sys.exit(main())

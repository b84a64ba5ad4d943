"""Train an EAGLE drafter: ``python -m train.eagle --data DIR --out DIR``.

Per position p of a sequence (tokens t, target features f) the drafter reads
(f[p], t[p+1]) and predicts f[p+1]; loss = SmoothL1(feature) + ce_weight * soft
cross-entropy against the target's distribution lm_head(f[p+1]) over the draft
vocabulary. Input features get uniform noise (EAGLE's augmentation).

``--unroll K`` adds K-1 "training-time test" passes (as in EAGLE-3): pass k feeds
the drafter its own pass-(k-1) prediction at p-1 instead of the true f[p],
attending to true pairs before p-k+2 and to its own earlier predictions, which is
exactly what drafting depth k sees at serve time.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from train.common import (
    Schedule, cli, choose_draft_vocab, drafter_state, finish_training, optimizer_step, batches, init_state,
    layer_counts, prior_training, load_examples, pad_batch, split, vocab_coverage,
)


def unroll_mask(n: int, k: int, device=None) -> torch.Tensor:
    """Keys visible to pass-k queries, over the concatenated keys of passes 1..k: bool [n, k*n].

    Query p sees pass-1 keys q <= p-k+1 (true features) and the pass-j key at q = p-(k-j).
    """
    full = torch.ones(n, n, dtype=torch.bool, device=device)
    parts = [full.tril(-(k - 1))]
    for j in range(2, k + 1):
        s = k - j
        parts.append(full.tril(-s).triu(-s))
    return torch.cat(parts, dim=1)


def load_target_layer(model, model_dir: str) -> int:
    """Copy the target's last decoder layer into the drafter where shapes match; returns tensors copied."""
    from safetensors import safe_open

    from engine.config import ModelConfig
    from engine.weights import checkpoint_files

    last = ModelConfig.from_path(model_dir).num_hidden_layers - 1
    pre = f"model.layers.{last}."
    found = {}
    for file in checkpoint_files(model_dir):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if name.startswith(pre):
                    found[name[len(pre):]] = f.get_tensor(name)
    if "mlp.gate_proj.weight" in found and "mlp.up_proj.weight" in found:
        found["mlp.gate_up_proj.weight"] = torch.cat([found.pop("mlp.gate_proj.weight"),
                                                      found.pop("mlp.up_proj.weight")])
    own = model.state_dict()
    copied = 0
    with torch.no_grad():
        for name, t in found.items():
            key = "layers.0." + name.replace("self_attn.", "")
            if key in own and own[key].shape == t.shape:
                own[key].copy_(t.to(own[key].dtype))
                copied += 1
    return copied


def eagle_loss(model, embed, head_w, toks, feats, valid, prompt_len, *, unroll=1, noise=0.0, feat_std=1.0,
               ce_weight=0.1, decay=0.8, generator=None):
    """Loss over a padded batch. toks [B, n], feats [B, n, H], valid [B, n], prompt_len [B].

    Returns (loss, stats: per pass [l1, ce, top-1 agreement]).
    """
    b, n, _ = feats.shape
    dev = feats.device
    pos = torch.arange(n, device=dev)
    length = valid.sum(1, keepdim=True)
    nxt_tok = F.pad(toks[:, 1:], (0, 1))
    tgt = F.pad(feats[:, 1:], (0, 0, 0, 1)).float()  # f[p+1]
    with torch.no_grad():
        tgt_p = torch.softmax((tgt.to(head_w.dtype) @ head_w.T).float(), dim=-1)
        tgt_top = tgt_p.argmax(-1)
    tok_emb = F.embedding(nxt_tok, embed)
    positions = pos.expand(b, n)
    x = feats.float()
    if noise:
        u = torch.rand(x.shape, generator=generator, device=dev if generator is None else generator.device)
        x = x + (u.to(dev) - 0.5) * noise * feat_std
    loss, stats, k_all, v_all, prev = 0.0, [], None, None, None
    for k in range(1, unroll + 1):
        inp = x if k == 1 else F.pad(prev[:, :-1], (0, 0, 1, 0))
        mask = unroll_mask(n, k, dev).expand(b, n, k * n)
        out, k_all, v_all = model(tok_emb, inp, positions, mask, k_all, v_all)
        m = (pos >= k - 1) & (pos + 1 < length) & (pos + 2 >= prompt_len.unsqueeze(1).to(dev))
        w = m.float()
        denom = w.sum().clamp_min(1)
        l1 = (F.smooth_l1_loss(out.float(), tgt, reduction="none").mean(-1) * w).sum() / denom
        logp = torch.log_softmax((out.to(head_w.dtype) @ head_w.T).float(), dim=-1)
        ce = (-(tgt_p * logp).sum(-1) * w).sum() / denom
        acc = ((logp.argmax(-1) == tgt_top).float() * w).sum() / denom
        loss = loss + decay ** (k - 1) * (l1 + ce_weight * ce)
        stats.append([float(l1.detach()), float(ce.detach()), float(acc)])
        prev = out
    return loss, stats


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m train.eagle", description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=".cache/drafter-data/smollm2-135m", help="Parquet shards from train.data (DIR, or DIR1,DIR2 to train on several)")
    ap.add_argument("--model", default="default", help="target checkpoint directory, or 'default'")
    ap.add_argument("--out", default="assets/eagle-smollm2-135m", help="drafter directory to write")
    ap.add_argument("--draft-vocab", type=int, default=None,
                    help="draft vocabulary size (0: full; default: 8192, or --init-from's, which this re-selects)")
    ap.add_argument("--epochs", type=float, default=20)
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: by epochs)")
    ap.add_argument("--time-budget", type=float, default=0, help="minutes; fit the step count into it")
    ap.add_argument("--batch-tokens", type=int, default=4096, help="padded tokens per batch")
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--unroll", type=int, default=2, help="training-time-test passes (1: plain EAGLE)")
    ap.add_argument("--noise", type=float, default=0.2, help="uniform input-feature noise, x feature std")
    ap.add_argument("--ce-weight", type=float, default=0.1)
    ap.add_argument("--val-frac", type=float, default=0.05)
    ap.add_argument("--init-from-target", type=int, default=0, help="1: start from the target's last layer")
    ap.add_argument("--init-from", default=None, help="drafter directory to continue training (e.g. the shipped one)")
    ap.add_argument("--layers", type=int, default=0,
                    help="decoder layers (0: as --init-from, else 1); more than --init-from's appends identity layers")
    ap.add_argument("--save-every", type=int, default=200)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="use at most this many sequences")
    return ap.parse_args(argv)


@torch.no_grad()
def evaluate(model, embed, head_w, examples, args, dev) -> list[list[float]]:
    model.eval()
    tot, n = None, 0
    for batch in batches(examples, args.batch_tokens, random.Random(0)):
        toks, feats, valid, plen = (t.to(dev) for t in pad_batch(batch))
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            _, st = eagle_loss(model, embed, head_w, toks, feats, valid, plen, unroll=args.unroll,
                               ce_weight=args.ce_weight)
        tot = st if tot is None else [[a + b for a, b in zip(x, y)] for x, y in zip(tot, st)]
        n += 1
    model.train()
    return [[round(v / max(n, 1), 4) for v in row] for row in (tot or [])]


def train(args) -> dict:
    from engine.config import ModelConfig
    from engine.drafters.common import save_drafter
    from engine.drafters.eagle import EagleConfig, EagleModel
    from engine.drafters.loading import target_embed_and_head
    from engine.weights import resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    dev = torch.device(args.device)
    model_dir = resolve_model(args.model)
    target = ModelConfig.from_path(model_dir)
    examples = load_examples(args.data, args.limit)
    train_ex, val_ex = split(examples, args.val_frac, args.seed)
    init_cfg, init, ids = init_state(args.init_from, "eagle")
    ids, order = choose_draft_vocab(train_ex, args.draft_vocab, target, init_cfg, ids)
    embed, lm_head = target_embed_and_head(model_dir, torch.bfloat16)
    embed = embed.to(dev)
    head_w = (lm_head if ids is None else lm_head[ids]).to(dev)
    init_layers, layers = layer_counts(args.layers, init_cfg, args.init_from)
    cfg = EagleConfig.from_target(target, None if ids is None else len(ids), layers)
    cfg.draft_vocab_order = order
    model = EagleModel(cfg, torch.float32)
    if init is not None:
        missing, unexpected = model.load_state_dict(init, strict=False)
        new = tuple(f"layers.{i}." for i in range(init_layers, layers))
        if unexpected or any(not k.startswith(new) for k in missing):
            raise ValueError(f"--init-from {args.init_from} does not match this EAGLE drafter's shapes")
        for layer in model.layers[init_layers:]:
            layer.make_identity()  # training starts from the init drafter's predictions
    copied = load_target_layer(model, model_dir) if (args.init_from_target and init is None) else 0
    model.to(dev).train()
    feat_std = float(torch.cat([e.feats[e.prompt_len:].float().flatten() for e in train_ex[:64]]).std())
    n_tokens = sum(len(e.tokens) for e in train_ex)
    per_epoch = len(batches(train_ex, args.batch_tokens, random.Random(0)))
    total = args.max_steps or max(1, int(args.epochs * per_epoch))
    sched = Schedule(total, args.lr, args.time_budget)
    print(f"eagle: {len(train_ex)} train / {len(val_ex)} val sequences, {n_tokens} tokens, "
          f"draft vocab {cfg.draft_vocab_size or target.vocab_size} (covers {vocab_coverage(train_ex, ids):.3f} "
          f"of response tokens), {copied} tensors from the target's last layer, {per_epoch} steps/epoch",
          file=sys.stderr)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    step, log = 0, []
    bar = tqdm(total=total, desc="eagle")

    def save(final=False):
        state = drafter_state(model, ids)
        info = {"steps": step, "epochs": round(step / per_epoch, 2), "sequences": len(train_ex),
                "tokens": n_tokens, "seconds": round(time.time() - t0, 1), "unroll": args.unroll,
                "noise": args.noise, "ce_weight": args.ce_weight, "lr": args.lr, "seed": args.seed,
                "init_from": prior_training(init_cfg, args.init_from),
                "val": evaluate(model, embed, head_w, val_ex, args, dev) if (final and val_ex) else None}
        save_drafter(args.out, {**cfg.to_dict(), "train": info}, state)
        return info

    while step < sched.total:
        for batch in batches(train_ex, args.batch_tokens, rng):
            if step >= sched.total:
                break
            toks, feats, valid, plen = (t.to(dev) for t in pad_batch(batch))
            for g in opt.param_groups:
                g["lr"] = sched.lr(step)
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                loss, st = eagle_loss(model, embed, head_w, toks, feats, valid, plen, unroll=args.unroll,
                                      noise=args.noise, feat_std=feat_std, ce_weight=args.ce_weight, generator=gen)
            optimizer_step(opt, model, loss)
            step += 1
            log.append([step, float(loss.detach())] + [v for row in st for v in row])
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", acc1=f"{st[0][2]:.3f}", accK=f"{st[-1][2]:.3f}")
            sched.refit(step, time.time() - t0, bar)
            if args.save_every and step % args.save_every == 0 and step < sched.total:
                save()
    bar.close()
    info = save(final=True)
    print(json.dumps(info), file=sys.stderr)
    columns = ["step", "loss"] + [f"pass{k}_{m}" for k in range(1, args.unroll + 1) for m in ("l1", "ce", "acc")]
    return finish_training(args.out, columns, log, info)


def main(argv=None) -> int:
    return cli(train, parse_args, argv)


if __name__ == "__main__":
    sys.exit(main())

"""Train a small GPT with BTT-MoE in every linear layer next to the same GPT with dense layers."""
import argparse
import time

import torch
from torch import nn
from torch.nn import functional as F

import einc
from einc.experiments.flops import model_flops
from einc.experiments.tasks import GPT, load_corpus  # byte-level GPT; Python's own sources


def flops_per_token(model, context: int) -> int:
    """Forward FLOPs per token: every linear layer (the active experts and the router for
    BTT-MoE, the unembedding included) plus the attention scores and their weighted sum
    (2 maps of context x width per layer, causal masking not subtracted)."""
    width, layers = model.tok.embedding_dim, len(model.blocks)
    return model_flops(model).forward + layers * 2 * (2 * context * width)


def train(name, model, train_data, val_data, args, lr):
    groups = [{"params": list(model.parameters())}] if args.plain_lr else \
        einc.param_groups(model, lr)
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)

    def batch(src, gen=g):
        i = torch.randint(0, len(src) - args.context - 1, (args.batch,), generator=gen)
        x = torch.stack([src[j:j + args.context] for j in i])
        return x, torch.stack([src[j + 1:j + args.context + 1] for j in i])

    val_batches = [batch(val_data, torch.Generator().manual_seed(1000 + i))
                   for i in range(args.val_batches)]
    t0 = time.time()
    print(f"\n== {name}: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{flops_per_token(model, args.context):,} FLOPs per token")
    for step in range(1, args.steps + 1):
        x, y = batch(train_data)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        aux = einc.moe_aux_loss(model)
        opt.zero_grad()
        (loss + args.aux_weight * aux).backward()
        opt.step()
        if step % args.log_every == 0 or step == args.steps:
            # expert loads of this training batch (the forward that gave aux), averaged
            # over the layers, before the validation forward replaces them
            loads = [m.router_stats()["load"] for m in model.modules()
                     if isinstance(m, einc.BTTMoE)]
            load = ""
            if loads:
                mean = torch.stack(loads).mean(0)
                load = " load " + " ".join(f"{v:.2f}" for v in mean.tolist())
            with torch.no_grad():  # the same validation batches at every step and model
                val = sum(F.cross_entropy(model(vx).flatten(0, 1), vy.flatten()).item()
                          for vx, vy in val_batches) / len(val_batches)
            print(f"step {step:4d}  loss {loss.item():.3f}  val {val:.3f}  aux {aux.item():.3f}"
                  f"{load}  ({time.time() - t0:.0f}s)", flush=True)
    return val


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    # the best of 2.5e-4 ... 8e-3 for each model in a sweep (docs/benchmarks.md)
    ap.add_argument("--lr", type=float, default=5e-4, help="BTT-MoE model's learning rate")
    ap.add_argument("--dense-lr", type=float, default=4e-3, help="dense model's learning rate")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--aux-weight", type=float, default=0.01)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--val-batches", type=int, default=16, help="validation batches (fixed)")
    ap.add_argument("--plain-lr", action="store_true",
                    help="one learning rate for every parameter, without einc.param_groups' "
                         "per-factor multipliers")
    args = ap.parse_args()
    for name in ("steps", "d", "layers", "heads", "context", "batch", "experts", "k",
                 "log_every", "val_batches"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.d % args.heads:
        ap.error(f"--d ({args.d}) must be a multiple of --heads ({args.heads})")
    if args.k > args.experts:
        ap.error(f"--k ({args.k}) must be at most --experts ({args.experts})")
    torch.manual_seed(0)
    train_data, val_data = load_corpus(400_000, 40_000)
    vocab = 256
    spec = f"bttmoe(experts={args.experts}, k={args.k})"

    moe = GPT(args.d, args.layers, args.heads, args.context, vocab=vocab)
    report = einc.replace_linear(moe, spec)  # all but the unembedding
    # The dense baseline: the width (a multiple of the head count) whose FLOPs per token,
    # unembedding and attention included, come closest to the BTT-MoE model's.
    target = flops_per_token(moe, args.context)
    dense_flops = lambda w: flops_per_token(
        GPT(w, args.layers, args.heads, args.context, vocab=vocab), args.context)
    width = min(range(args.heads, 2 * args.d + 1, args.heads),
                key=lambda w: abs(2 * args.layers * 12 * w * w + 2 * w * vocab
                                  + 4 * args.layers * args.context * w - target))
    dense = GPT(width, args.layers, args.heads, args.context, vocab=vocab)
    print(f"corpus: {len(train_data):,} training and {len(val_data):,} validation bytes of "
          f"Python's standard library")
    print(f"BTT-MoE {spec} replaced {len(report)} layers at d = {args.d} "
          f"({report.kept[0][0] if report.kept else 'nothing'} kept dense); dense baseline at "
          f"d = {width}: {dense_flops(width) / target:.3f}x the FLOPs per token")
    val_moe = train(f"BTT-MoE {spec}, d = {args.d}, lr {args.lr:g}", moe, train_data,
                    val_data, args, args.lr)
    val_dense = train(f"dense, d = {width}, lr {args.dense_lr:g}", dense, train_data,
                      val_data, args, args.dense_lr)
    print(f"\nvalidation loss after {args.steps} steps: BTT-MoE {val_moe:.3f}, dense "
          f"{val_dense:.3f}")


if __name__ == "__main__":
    main()

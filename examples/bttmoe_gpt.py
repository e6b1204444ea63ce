"""Train a small GPT with BTT-MoE in every linear layer next to the same GPT with dense layers."""
import argparse
import math
import time

import torch
from torch import nn
from torch.nn import functional as F

import einc
from einc.experiments.tasks import GPT, load_corpus  # byte-level GPT; Python's own sources


def linear_flops_per_token(model) -> int:
    """Forward FLOPs per token of the linear layers (the active experts for BTT-MoE)."""
    total = 0
    for m in model.modules():
        if isinstance(m, einc.BTTMoE):
            total += m.flops_per_token()
        elif isinstance(m, einc.StructuredLinear):
            total += m.lowered.flops
        elif type(m) is nn.Linear:
            total += 2 * m.in_features * m.out_features
    return total


def train(name, model, train_data, val_data, args):
    opt = torch.optim.AdamW(einc.param_groups(model, args.lr), weight_decay=0.0)
    g = torch.Generator().manual_seed(0)

    def batch(src):
        i = torch.randint(0, len(src) - args.context - 1, (args.batch,), generator=g)
        x = torch.stack([src[j:j + args.context] for j in i])
        return x, torch.stack([src[j + 1:j + args.context + 1] for j in i])

    t0 = time.time()
    print(f"\n== {name}: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{linear_flops_per_token(model):,} linear FLOPs per token")
    for step in range(1, args.steps + 1):
        x, y = batch(train_data)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        aux = einc.moe_aux_loss(model)
        opt.zero_grad()
        (loss + args.aux_weight * aux).backward()
        opt.step()
        if step % args.log_every == 0 or step == args.steps:
            with torch.no_grad():
                vx, vy = batch(val_data)
                val = F.cross_entropy(model(vx).flatten(0, 1), vy.flatten()).item()
            loads = [m.router_stats()["load"] for m in model.modules()
                     if isinstance(m, einc.BTTMoE)]
            load = ""
            if loads:
                mean = torch.stack(loads).mean(0)
                load = " load " + " ".join(f"{v:.2f}" for v in mean.tolist())
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
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--aux-weight", type=float, default=0.01)
    ap.add_argument("--log-every", type=int, default=50)
    args = ap.parse_args()
    torch.manual_seed(0)
    train_data, val_data = load_corpus(400_000, 40_000)
    vocab = 256
    spec = f"bttmoe(experts={args.experts}, k={args.k})"

    moe = GPT(args.d, args.layers, args.heads, args.context, vocab=vocab)
    report = einc.replace_linear(moe, spec)  # all but the unembedding
    # The dense baseline gets the width whose linear layers cost the same FLOPs per token.
    target = linear_flops_per_token(moe) - 2 * args.d * vocab
    per_width = lambda w: 2 * 12 * w * w * args.layers
    width = max(args.heads, int(round(math.sqrt(target / per_width(1)) / args.heads)) * args.heads)
    dense = GPT(width, args.layers, args.heads, args.context, vocab=vocab)
    print(f"corpus: {len(train_data):,} training and {len(val_data):,} validation bytes of "
          f"Python's standard library; BTT-MoE {spec} replaced {len(report)} layers at "
          f"d = {args.d}; dense baseline at d = {width} (equal linear FLOPs per token)")
    val_moe = train(f"BTT-MoE {spec}, d = {args.d}", moe, train_data, val_data, args)
    val_dense = train(f"dense, d = {width}", dense, train_data, val_data, args)
    print(f"\nvalidation loss after {args.steps} steps: BTT-MoE {val_moe:.3f}, dense "
          f"{val_dense:.3f}")


if __name__ == "__main__":
    main()

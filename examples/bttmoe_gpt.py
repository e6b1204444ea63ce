"""Train a small GPT with BTT-MoE in every linear layer next to the same GPT with dense layers."""
import argparse
import math
import sysconfig
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import einc


def corpus(limit=600_000):
    """Text that ships with Python: the standard library's own source files."""
    root = Path(sysconfig.get_paths()["stdlib"])
    text, total = [], 0
    for path in sorted(root.glob("*.py")):
        chunk = path.read_text(errors="ignore")
        text.append(chunk)
        total += len(chunk)
        if total >= limit:
            break
    return "".join(text)


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc, self.proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        h = self.ln1(x)
        split = lambda z: z.view(b, t, self.heads, d // self.heads).transpose(1, 2)
        att = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)),
                                             split(self.v(h)), is_causal=True)
        x = x + self.o(att.transpose(1, 2).reshape(b, t, d))
        return x + self.proj(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab, d, layers, heads, context):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for blk in self.blocks:
            x = blk(x)
        return self.lm_head(self.ln(x))


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


def train(name, model, data, args):
    opt = torch.optim.AdamW(einc.param_groups(model, args.lr), weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    split = int(0.9 * len(data))
    train_data, val_data = data[:split], data[split:]

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
    text = corpus()
    vocab = sorted(set(text))
    data = torch.tensor([vocab.index(c) for c in text[:400_000]], dtype=torch.long)
    spec = f"bttmoe(experts={args.experts}, k={args.k})"

    moe = GPT(len(vocab), args.d, args.layers, args.heads, args.context)
    report = einc.replace_linear(moe, spec, exclude="lm_head")
    # The dense baseline gets the width whose linear layers cost the same FLOPs per token.
    target = linear_flops_per_token(moe) - 2 * args.d * len(vocab)
    per_width = lambda w: 2 * 12 * w * w * args.layers
    width = max(args.heads, int(round(math.sqrt(target / per_width(1)) / args.heads)) * args.heads)
    dense = GPT(len(vocab), width, args.layers, args.heads, args.context)
    print(f"corpus: {len(text):,} characters, vocabulary {len(vocab)}; BTT-MoE {spec} replaced "
          f"{len(report)} layers at d = {args.d}; dense baseline at d = {width} "
          "(equal linear FLOPs per token)")
    val_moe = train(f"BTT-MoE {spec}, d = {args.d}", moe, data, args)
    val_dense = train(f"dense, d = {width}", dense, data, args)
    print(f"\nvalidation loss after {args.steps} steps: BTT-MoE {val_moe:.3f}, dense "
          f"{val_dense:.3f}")


if __name__ == "__main__":
    main()

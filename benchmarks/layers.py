"""CPU speed of compiled structured layers next to nn.Linear and the two naive routes."""
import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import einc  # noqa: E402
from _timing import header, interleaved_ms, table  # noqa: E402
from einc.analysis import plan as analysed_chain  # noqa: E402

STRUCTURES = ["dense", "btt", "btt(rank=4)", "monarch", "lowrank(rank=d/4)", "kron",
              "tt(cores=3)", "(0.5|0.25|0.25|0.25|0.5|0.25|0)",
              "(0.5|0.25|0.25|0.25|0.5|0.25|0.25)"]


def einsum_route(m):
    """One torch.einsum per step of the analysed chain (the 'two einsum calls' route)."""
    s, sizes = m.structure, m.lowered.sizes
    steps = analysed_chain(s, sizes)
    letters = dict(s.letters())
    tok = next(c for c in "ZYXWVUTSQPONM" if c not in letters.values())
    term = lambda idx: tok + "".join(letters[i] for i in idx)

    def run(x):
        z = pad(x, m).reshape(-1, *m.input_sizes)
        facs = m.factors()
        for st in steps:
            f = s.factors[st.factor]
            z = torch.einsum(f"{term(st.left)},{''.join(letters[i] for i in f.indices)}"
                             f"->{term(st.out)}", z, facs[st.factor])
        order = steps[-1].out
        z = z.permute(0, *[1 + order.index(i) for i in s.output.indices])
        return z.reshape(x.shape[0], -1)[:, :m.out_features] + m.bias
    return run


def pad(x, m):
    extra = m.lowered.padded_in - m.in_features
    return torch.nn.functional.pad(x, (0, extra)) if extra else x


def naive_bmm_route(m):
    """Per step: permute the running tensor to [B, M, K] and copy it, bmm, keep [B][M][N]
    (the 'transposed view -> bmm -> permute+copy -> bmm' route, for any structure)."""
    s, sizes = m.structure, m.lowered.sizes
    steps = analysed_chain(s, sizes)

    def run(x):
        n = x.shape[0]
        z, order = pad(x, m).reshape(n, *m.input_sizes), ("#", *s.input.indices)
        facs = m.factors()
        sz = dict(sizes, **{"#": n})
        for st in steps:
            f = s.factors[st.factor]
            b = [i for i in st.left if i in st.right and i in st.out]
            k = [i for i in st.left if i in st.right and i not in st.out]
            ml = [i for i in order if i not in st.right]
            nr = [i for i in f.indices if i not in st.left]
            dim = lambda g: math.prod(sz[i] for i in g)
            lhs = z.permute([order.index(i) for i in b + ml + k]).reshape(dim(b), dim(ml), dim(k))
            rhs = facs[st.factor].permute([f.indices.index(i) for i in b + k + nr])
            z = torch.bmm(lhs, rhs.reshape(dim(b), dim(k), dim(nr)))
            order = tuple(b + ml + nr)
            z = z.view([sz[i] for i in order])
        z = z.permute([order.index(i) for i in ("#", *s.output.indices)])
        return z.reshape(n, -1)[:, :m.out_features] + m.bias
    return run


def _with_route(m, route):
    def run(x):
        m.route = route
        return m(x)
    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--d", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--structures", nargs="+", default=STRUCTURES)
    args = ap.parse_args()
    print(header("einc structured layers vs nn.Linear, fp32, forward and forward+backward (ms)"))
    rows = []
    for d in args.d:
        x = torch.randn(args.tokens, d, requires_grad=True)
        dense = torch.nn.Linear(d, d)
        for spec in args.structures:
            spec_d = spec.replace("d/4", str(d // 4))
            m = einc.compile(spec_d, d)
            m(x).sum().backward()  # the auto route measures its choice once, outside the timing
            routes = {"nn.Linear": dense, "einsum x2": einsum_route(m),
                      "naive bmm": naive_bmm_route(m)}
            for route in ("fused", "plain", "auto"):
                routes[route] = _with_route(m, route)
            fns = {}
            for name, fn in routes.items():
                fns[name, "f"] = lambda fn=fn: fn(x)
                fns[name, "fb"] = lambda fn=fn: fn(x).sum().backward()
            ms = interleaved_ms(fns, args.reps)
            times = {name: (ms[name, "f"], ms[name, "fb"]) for name in routes}
            t_dense = times["nn.Linear"]
            best_naive = min(times["einsum x2"][1], times["naive bmm"][1])
            einc_best = times["auto"][1]
            rows.append([spec_d, d, f"{2 * d * d / m.lowered.flops:.1f}",
                         f"{t_dense[0]:.1f} / {t_dense[1]:.1f}",
                         *(f"{times[r][0]:.1f} / {times[r][1]:.1f}"
                           for r in ("einsum x2", "naive bmm", "plain", "fused", "auto")),
                         f"{t_dense[1] / times['auto'][1]:.1f}x",
                         f"{best_naive / einc_best:.2f}x"])
            print(rows[-1], file=sys.stderr, flush=True)
    print(table(rows, ["structure", "d", "FLOP ratio", "nn.Linear", "einsum x2", "naive bmm",
                       "einc plain", "einc fused", "einc auto", "auto vs Linear (f+b)",
                       "auto vs best naive (f+b)"]))
    print(f"# {args.tokens} tokens; cells are forward / forward+backward medians of "
          f"{args.reps}, taken round-robin over a row's routes; 'auto' is einc's default route (measured choice among fused, plain, "
          "one einsum and one einsum per step); ratios compare forward+backward; every "
          "route adds the bias, as nn.Linear does")


if __name__ == "__main__":
    main()

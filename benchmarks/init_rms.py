"""Output RMS at initialisation for every point of the 1/4 theta lattice and every preset."""
import argparse
import itertools
import platform
import sys
import time
from fractions import Fraction

import torch

import einc
from einc.errors import SizeError

PRESETS = ["dense", "lowrank(rank=d^(1/2))", "kron", "monarch", "btt", "btt(rank=4)",
           "btt(rank=2, cores=3)", "tt(rank=4)", "tt(rank=2, cores=3)"]


def lattice(k=4):
    q = [Fraction(i, k) for i in range(k + 1)]
    for a, b, dl, e, r in itertools.product(q, q, q, q, q):
        if a + b <= 1 and dl + e <= 1:
            yield (a, b, 1 - a - b, dl, e, 1 - dl - e, r)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--d", type=int, nargs="+", default=[256, 4096])
    ap.add_argument("--max-params", type=float, default=2 ** 27,
                    help="skip points holding more parameters than this (memory)")
    ap.add_argument("--tokens", type=int, default=16)
    args = ap.parse_args()
    print(f"# {platform.machine()} {platform.processor() or ''} python {sys.version.split()[0]}"
          f" torch {torch.__version__} einc {einc.__version__} {time.strftime('%Y-%m-%d')}")
    specs = PRESETS + ["(" + "|".join(str(v) for v in t) + ")" for t in lattice()]
    for d in args.d:
        lo, hi, worst, checked, skipped = 9.0, 0.0, None, 0, 0
        for spec in specs:
            try:
                rep = einc.analyze(spec, d=d)
            except SizeError:
                skipped += 1
                continue
            if rep.params > args.max_params or rep.largest_intermediate * args.tokens > 2 ** 28:
                skipped += 1
                continue
            torch.manual_seed(0)
            m = einc.compile(spec, d, bias=False)
            x = torch.randn(args.tokens, d)
            with torch.no_grad():
                rms = (m(x).square().mean().sqrt() / x.square().mean().sqrt()).item()
            checked += 1
            if not 0.5 <= rms <= 2:
                worst = (spec, rms)
            lo, hi = min(lo, rms), max(hi, rms)
        print(f"d={d}: {checked} structures checked, {skipped} skipped (padding or size), "
              f"output RMS / input RMS in [{lo:.3f}, {hi:.3f}]"
              + (f"; OUT OF RANGE: {worst}" if worst else "; all within [0.5, 2]"))


if __name__ == "__main__":
    main()

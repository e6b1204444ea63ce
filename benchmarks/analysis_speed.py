"""Time of a first and a repeated einc.analyze for a few structures and widths."""
import platform
import sys
import time

import lark
import sympy
import torch

import einc

SPECS = ["dense", "btt", "btt(rank=4)", "kron", "tt(rank=4, cores=3)",
         "(1/4|1/4|1/2|1/4|1/4|1/2|1/4)"]
WIDTHS = [256, 1024, 4096]


def main():
    print(f"machine  {platform.machine()} {platform.processor() or ''} "
          f"{platform.system()} {platform.release()}")
    print(f"python   {sys.version.split()[0]}  einc {einc.__version__}  sympy {sympy.__version__}"
          f"  lark {lark.__version__}  torch {torch.__version__}")
    print(f"{'spec':<32} {'d':>5} {'first ms':>9} {'repeat ms':>10}")
    for spec in SPECS:
        for k, d in enumerate(WIDTHS):
            start = time.perf_counter()
            einc.analyze(spec, d=d)
            first = time.perf_counter() - start
            runs = 20
            start = time.perf_counter()
            for _ in range(runs):
                einc.analyze(spec, d=d)
            repeat = (time.perf_counter() - start) / runs
            print(f"{spec:<32} {d:>5} {first * 1e3:>9.2f} {repeat * 1e3:>10.3f}")


if __name__ == "__main__":
    main()

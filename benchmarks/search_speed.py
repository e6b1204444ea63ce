"""Search speed: enumerate, score and rank the two-factor 1/12 lattice and the three-factor
1/4 lattice at d = 1024, reporting wall time and peak memory (run: python benchmarks/search_speed.py)."""
import resource
import sys
import time



def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def run(label, **kw):
    from einc.space import search

    start = time.perf_counter()
    res = search(d=1024, max_flops=None, top=20, **kw)
    elapsed = time.perf_counter() - start
    n = res.counts
    print(f"{label}: {elapsed:6.2f} s  {n['lattice']:>11,} points  {n['distinct']:>10,} families"
          f"  {n['passed']:>10,} scored  peak RSS {peak_rss_mb():7.1f} MB")
    return elapsed, res


if __name__ == "__main__":
    start = time.perf_counter()
    import einc.analysis.symbolic  # noqa: F401  (sympy import, counted separately)
    from einc.space import table
    print(f"import einc + sympy: {time.perf_counter() - start:.2f} s")
    t2, res2 = run("two factors, k = 12 ", factors=2, k=12)
    t3, res3 = run("three factors, k = 4", factors=3, k=4)
    if "-v" in sys.argv:
        print(table(res2))
        print(table(res3))
    ok = t2 < 5 and t3 < 60 and peak_rss_mb() < 2048
    print("within targets (5 s, 60 s, 2 GB):", "yes" if ok else "NO")

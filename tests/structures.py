"""Random valid structures for the tests (a seeded generator, not a fixture)."""
from __future__ import annotations

import math
import random
import string


def random_spec(rng: random.Random, factors: int, max_size: int = 4) -> tuple[str, int, int]:
    """A random valid einsum spec with integer sizes, and d_in, d_out that it covers with at
    most 15% padding (sometimes exactly)."""
    tensors = ["x", *[f"F{k}" for k in range(factors)], "y"]
    while True:
        letters = iter(string.ascii_lowercase)
        indices = []
        for _ in range(rng.randint(factors + 1, factors + 4)):
            while True:
                members = {t for t in tensors if rng.random() < 0.45}
                if len(members) < 2:
                    continue
                if members & {"x", "y"} and not members - {"x", "y"}:
                    continue  # x/y indices must meet a factor
                break
            indices.append((next(letters), members))
        ops = {t: [i for i, m in indices if t in m] for t in tensors}
        if all(ops.values()):
            break
    sizes = {i: rng.randint(1, max_size) for i, _ in indices}
    term = lambda t: "".join(ops[t])
    spec = ",".join(term(t) for t in tensors[:-1]) + "->" + term("y")
    spec += " with " + ", ".join(f"{i} = {s}" for i, s in sizes.items())
    pin = math.prod(sizes[i] for i in ops["x"])
    pout = math.prod(sizes[i] for i in ops["y"])
    shrink = lambda p: p if rng.random() < 0.5 else max(1, math.ceil(p / 1.15))
    return spec, shrink(pin), shrink(pout)

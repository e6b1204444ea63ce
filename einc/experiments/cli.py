"""``einc experiment scaling``: train structures and compare their compute-optimal frontiers."""
from __future__ import annotations

import sys

from ..cli import command


def _options(pairs) -> dict:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"einc: error: --option takes KEY=VALUE, got {pair!r}")
        try:
            out[key] = int(value)
        except ValueError:
            try:
                out[key] = float(value)
            except ValueError:
                out[key] = value
    return out


def add_training_arguments(p, *, prefix: str = "") -> None:
    """The arguments ``einc experiment scaling`` and ``einc search --train`` share."""
    p.add_argument(f"--{prefix}seeds", default="0", help="seeds: a list (0,1,2) or a count "
                   "(3) (default 0)")
    p.add_argument(f"--{prefix}batch", type=int, help="global batch size (default: the "
                   "task's: 512 examples for regression, 32 sequences for charlm)")
    p.add_argument(f"--{prefix}lr", type=float, help="one base learning rate for every "
                   "structure (skips the sweep)")
    p.add_argument(f"--{prefix}lr-sweep", help="base rates tried at the smallest width, "
                   "comma-separated (default: 1e-3,3e-3,1e-2)")
    p.add_argument(f"--{prefix}workers", type=int, default=1, help="runs at a time (default 1)")
    p.add_argument(f"--{prefix}executor", default="local", choices=["local", "ray"],
                   help="local: this process or a process pool; ray: a Ray cluster")
    p.add_argument(f"--{prefix}ray-address", help="Ray cluster address (default: start a "
                   "local one)")
    p.add_argument(f"--{prefix}option", action="append", metavar="KEY=VALUE",
                   help="task option, repeatable (context=64, layers=2, hidden=2, ...)")
    p.add_argument(f"--{prefix}eval-points", type=int, default=24,
                   help="evaluations per run, log-spaced (default 24)")


def _common(args, prefix=""):
    get = lambda name: getattr(args, prefix + name)
    seeds = get("seeds")
    seeds = int(seeds) if seeds.isdigit() and "," not in seeds and int(seeds) > 1 else [
        int(s) for s in seeds.split(",")]
    return dict(seeds=seeds, batch=get("batch"), lr=get("lr"), lr_sweep=get("lr_sweep"),
                workers=get("workers"), executor=get("executor"),
                ray_address=get("ray_address"), options=_options(get("option")),
                eval_points=get("eval_points"))


@command
def _register(sub):
    p = sub.add_parser("experiment", help="training experiments (scaling laws)")
    inner = p.add_subparsers(dest="experiment", parser_class=sub._parser_class)
    s = inner.add_parser(
        "scaling", help="train structures over widths and fit compute-optimal frontiers",
        description="Train each structure at each width (and seed) with one protocol, log "
        "held-out loss against training FLOPs counted by einc's analysis, and fit each "
        "structure's frontier with a power law. Finished runs in --out are not redone.")
    s.add_argument("--task", default="regression", help="regression or charlm")
    s.add_argument("--structures", default="dense,btt", help='comma-separated specs, e.g. '
                   'dense,btt,kron,"lowrank(rank=d^(1/2))","bttmoe(experts=8,k=2)"')
    s.add_argument("--widths", default="64,128,256", help="comma-separated widths")
    s.add_argument("--steps", type=int, default=1000, help="training steps per run")
    s.add_argument("--out", help="folder for runs, tables and the plot (and for resuming)")
    s.add_argument("--irreducible", action="store_true", help="fit loss = a C^-b + c")
    s.add_argument("--no-progress", action="store_true", help="never draw a progress bar")
    add_training_arguments(s)
    s.set_defaults(run=_scaling)
    p.set_defaults(run=lambda args: p.print_help() or 0)


def _scaling(args) -> int:
    from .harness import scaling, split_specs

    result = scaling(task=args.task, structures=split_specs(args.structures),
                     widths=[int(w) for w in args.widths.split(",")], steps=args.steps,
                     out=args.out, irreducible=args.irreducible,
                     progress=False if args.no_progress else None, **_common(args))
    print(result.table())
    print("\nbase learning rates: " + ", ".join(f"{s}: {v:.3g}" for s, v in result.lrs.items()))
    for path in result.files:
        print(f"wrote {path}", file=sys.stderr)
    return 0


def train_rerank(args, records) -> int:
    """The ``einc search --train TASK`` step: print the analytic and trained rankings."""
    from .harness import format_rerank, rerank

    ranks = rerank(records, task=args.train,
                   widths=[int(w) for w in args.train_widths.split(",")],
                   steps=args.train_steps, out=args.train_out,
                   progress=False if args.no_progress else None,
                   **_common(args, prefix="train_"))
    print(format_rerank(ranks))
    return 0

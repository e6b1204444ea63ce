"""``einc experiment scaling``: train structures and compare their compute-optimal frontiers."""
from __future__ import annotations

import argparse
import sys

from ..cli import command
from ..space.checks import (MAX_BATCH, MAX_EVAL_POINTS, MAX_SEED, MAX_SEEDS, MAX_STEPS,
                            MAX_TRAIN_WIDTH, bounds_text, int_at_least, int_list,
                            positive_float, positive_float_list, shown)


def _option_pair(text: str) -> tuple:
    """An argparse ``type`` for ``--option KEY=VALUE``: the value as an int, else a float,
    else the text."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"takes KEY=VALUE (for example hidden=3), got {text!r}")
    value = value.strip()
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, value


def _options(pairs) -> dict:
    return dict(pairs or [])


def _seeds(text: str):
    """An argparse ``type`` for ``--seeds``: a count n >= 1 (seeds 0..n-1, as an int ``seeds``
    of the Python API) or a comma-separated list of seeds (one seed: ``7,``)."""
    text = text.strip()
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if "," not in text and len(seeds) == 1:  # a count
        if 1 <= seeds[0] <= MAX_SEEDS:
            return seeds[0]
        seeds = []
    if not seeds or len(seeds) > MAX_SEEDS or any(not 0 <= s <= MAX_SEED for s in seeds):
        raise argparse.ArgumentTypeError(
            f"takes a count from 1 to {MAX_SEEDS:,} (3: seeds 0,1,2) or up to {MAX_SEEDS:,} "
            f"comma-separated seeds {bounds_text(0, MAX_SEED)} (0,1,2; one seed: 7,), "
            f"got {shown(text)}")
    return seeds


def add_training_arguments(p, *, prefix: str = "") -> None:
    """The arguments ``einc experiment scaling`` and ``einc search --train`` share."""
    p.add_argument(f"--{prefix}seeds", type=_seeds, default="1", help="seeds: a count (3: "
                   f"seeds 0,1,2) or a list (0,1,2; one seed: 7,), at most {MAX_SEEDS:,} "
                   "(default 1: seed 0)")
    p.add_argument(f"--{prefix}batch", type=int_at_least(1, MAX_BATCH), help="global batch "
                   f"size, at most {MAX_BATCH:,} (default: the task's: 512 examples for "
                   "regression, 32 sequences for charlm)")
    p.add_argument(f"--{prefix}lr", type=positive_float, help="one base learning rate for "
                   "every structure (skips the sweep; default: none, the sweep picks)")
    p.add_argument(f"--{prefix}lr-sweep", type=positive_float_list, help="base rates tried at "
                   "the smallest width, comma-separated (default: 1e-3,3e-3,1e-2)")
    p.add_argument(f"--{prefix}workers", type=int_at_least(1), default=1,
                   help="runs at a time (default 1)")
    p.add_argument(f"--{prefix}executor", default="local", choices=["local", "ray"],
                   help="local: this process or a process pool; ray: a Ray cluster "
                   "(default local)")
    p.add_argument(f"--{prefix}ray-address", help="Ray cluster address (default: start a "
                   "local one)")
    p.add_argument(f"--{prefix}option", type=_option_pair, action="append",
                   metavar="KEY=VALUE", help="task option, repeatable (context=64, layers=2, "
                   "hidden=2, ...); an unknown option lists the task's options (default: "
                   "the task's own values)")
    p.add_argument(f"--{prefix}eval-points", type=int_at_least(1, MAX_EVAL_POINTS),
                   default=24, help="evaluations per run, log-spaced, at most "
                   f"{MAX_EVAL_POINTS:,} (default 24)")


def _common(args, prefix=""):
    get = lambda name: getattr(args, prefix + name)
    return dict(seeds=get("seeds"), batch=get("batch"), lr=get("lr"), lr_sweep=get("lr_sweep"),
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
        "structure's frontier with a power law. Finished runs in --out are not redone. "
        "Without arguments: task regression, structures dense,btt, widths 64,128,256, 1000 "
        "steps per run, after a learning-rate sweep at the smallest width.")
    s.add_argument("--task", default="regression", help="regression or charlm (default "
                   "regression)")
    s.add_argument("--structures", default="dense,btt", help="comma-separated specs, e.g. "
                   'dense,btt,kron,"lowrank(rank=d^(1/2))","bttmoe(experts=8,k=2)"; commas '
                   "inside parentheses stay in their spec, and a spec in quotes is one item, "
                   "so an einsum with commas goes in quotes: \"dense,'i,io->o'\" "
                   "(default dense,btt)")
    s.add_argument("--widths", type=int_list(1, MAX_TRAIN_WIDTH), default="64,128,256",
                   help=f"comma-separated widths, each at most {MAX_TRAIN_WIDTH:,} "
                   "(default 64,128,256)")
    s.add_argument("--steps", type=int_at_least(1, MAX_STEPS), default=1000,
                   help=f"training steps per run, at most {MAX_STEPS:,} (default 1000)")
    s.add_argument("--out", help="folder for runs, tables and the plot (and for resuming); "
                   "checked, and created, before any run (default: none, nothing is written)")
    s.add_argument("--irreducible", action="store_true", help="fit loss = a C^-b + c "
                   "(default: loss = a C^-b)")
    s.add_argument("--no-progress", action="store_true", help="never draw a progress bar "
                   "(default: drawn on a terminal)")
    add_training_arguments(s)
    s.set_defaults(run=_scaling)
    p.set_defaults(run=lambda args: _no_experiment(p))


def _no_experiment(parser) -> int:
    """``einc experiment`` without one: a usage error, as ``einc`` without a command."""
    parser.print_help(sys.stderr)
    return 2


def _scaling(args) -> int:
    from .executors import dist_env
    from .harness import check_scaling, prepare_out, scaling, split_specs

    structures = split_specs(args.structures)
    common = _common(args)
    # Without arguments this starts a long run on defaults: say what, once the arguments
    # are known to be good and before the first step.
    plan = check_scaling(task=args.task, structures=structures, widths=args.widths,
                         steps=args.steps, **common)
    prepare_out(args.out)
    if dist_env()[0] == 0:  # under torchrun, once
        print(f"training: task {plan['task']}; structures {', '.join(plan['structures'])}; "
              f"widths {', '.join(map(str, plan['widths']))}; {plan['steps']:,} steps per run "
              "(--help lists every option and its default)", file=sys.stderr)
    result = scaling(task=args.task, structures=structures,
                     widths=args.widths, steps=args.steps, out=args.out,
                     irreducible=args.irreducible,
                     progress=False if args.no_progress else None, **common)
    print(result.table())
    print("\nbase learning rates: " + ", ".join(f"{s}: {v:.3g}" for s, v in result.lrs.items()))
    for path in result.files:
        print(f"wrote {path}", file=sys.stderr)
    return 0


def check_training(args) -> tuple[dict, list[str]]:
    """Check the ``einc search --train`` arguments before the search runs. Returns the
    keyword arguments of :func:`~einc.experiments.harness.rerank` and the folders made for
    ``--train-out``."""
    from .harness import check_scaling, prepare_out

    kw = dict(task=args.train, widths=args.train_widths, steps=args.train_steps,
              **_common(args, prefix="train_"))
    check_scaling(**kw)
    created = prepare_out(args.train_out)
    kw.update(out=args.train_out, progress=False if args.no_progress else None)
    return kw, created


def train_rerank(training: dict, records, show: bool = True) -> dict:
    """The ``einc search --train TASK`` step: train the records and return
    :func:`~einc.experiments.harness.rerank`'s rankings, printing both side by side when
    ``show``. ``training``: the keyword arguments :func:`check_training` returned."""
    from .harness import format_rerank, rerank

    ranks = rerank(records, **training)
    if show:
        print(format_rerank(ranks))
    return ranks

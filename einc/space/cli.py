"""``einc search``: rank structures for a layer width and a budget."""
from __future__ import annotations

import json

from ..cli import _add_width, command
from ..errors import EincError
from .checks import MAX_BATCH, MAX_STEPS, MAX_TRAIN_WIDTH, int_at_least, int_list, remove_folders


@command
def _register(sub):
    from .rank import DEFAULT_D, DEFAULT_MAX_FLOPS, DEFAULT_TOP, SORT_KEYS

    p = sub.add_parser(
        "search", help="enumerate, deduplicate and rank structures for a width and a budget",
        description=f"Enumerate the structure space, keep one structure per family, score "
        f"each exactly at the width and rank them. Without arguments: d = {DEFAULT_D}, the "
        "two-factor space on a 1/12 lattice, FLOPs at most dense, top 20.")
    _add_width(p)
    p.add_argument("--factors", type=int, default=2, help="weight factors: 2 (the paper's "
                   "space) or 3 (default 2)")
    p.add_argument("--k", type=int, default=12, help="lattice step 1/k of the exponents "
                   "(default 12)")
    p.add_argument("--max-flops", default=DEFAULT_MAX_FLOPS, help="forward FLOPs per vector "
                   "at most: a number (1e6) or a multiple of dense (0.1x); 'none' for no "
                   f"budget (default {DEFAULT_MAX_FLOPS})")
    p.add_argument("--max-params", help="parameters at most: a number or a multiple of "
                   "dense (0.1x)")
    p.add_argument("--min-psi", help="rank exponent psi at least (for example 1)")
    p.add_argument("--max-omega", help="parameter-sharing exponent omega at most (e.g. 0)")
    p.add_argument("--exclude-degenerate", action="store_true",
                   help="leave out points the paper calls degenerate (flagged otherwise)")
    p.add_argument("--keep-absorbable", action="store_true", help="also list points with a "
                   "factor that could be multiplied into another (the matrices of a point "
                   "with one factor fewer, at more parameters), flagged; left out otherwise")
    p.add_argument("--transpose", action="store_true", help="also identify a structure with "
                   "its transpose (needs d_in = d_out)")
    p.add_argument("--sort", default="paper", help="sort key: " + ", ".join(SORT_KEYS)
                   + " (default paper; measured needs --measure)")
    p.add_argument("--top", type=int_at_least(0), default=None, help=f"rows to show "
                   f"(default {DEFAULT_TOP}; 0 for all)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print a JSON list of records")
    out.add_argument("--csv", action="store_true", help="print CSV")
    p.add_argument("--plot", metavar="DIR", help="write cube.png and pareto.png (with "
                   "--measure also pareto_time.png) to DIR (needs matplotlib; DIR is checked, "
                   "and created, before searching)")
    p.add_argument("--measure", action="store_true", help="time forward+backward of the "
                   "compiled top N candidates (refused with --top 0)")
    p.add_argument("--batch", type=int_at_least(1, MAX_BATCH), default=64,
                   help=f"batch size for --measure, 1 to {MAX_BATCH:,} (default 64)")
    p.add_argument("--all-roundings", action="store_true", help="also list points whose "
                   "layer at this width is one listed above (their sizes round alike, e.g. "
                   "r = d^(1/12) is 1 at d = 64); by default each layer is listed once")
    p.add_argument("--no-progress", action="store_true", help="never draw a progress bar")
    p.add_argument("--train", metavar="TASK", help="re-rank the shown candidates by training "
                   "them (einc experiment scaling on TASK: regression or charlm)")
    p.add_argument("--train-widths", type=int_list(1, MAX_TRAIN_WIDTH), default="32,64,128",
                   help=f"comma-separated widths for --train, each at most "
                   f"{MAX_TRAIN_WIDTH:,} (default 32,64,128)")
    p.add_argument("--train-steps", type=int_at_least(1, MAX_STEPS), default=300,
                   help=f"steps per run for --train, at most {MAX_STEPS:,} (default 300)")
    p.add_argument("--train-out", metavar="DIR", help="folder for --train's runs (resumable)")
    try:
        from ..experiments.cli import add_training_arguments
        add_training_arguments(p, prefix="train-")
    except ImportError:  # torch missing: no --train
        pass
    # what --train-* options default to (argparse converts string defaults by their type),
    # to tell the ones given without --train
    p.set_defaults(run=_search, train_defaults={
        a.dest: a.type(a.default) if isinstance(a.default, str) and a.type else a.default
        for a in p._actions if a.dest.startswith("train_")})


def _search(args) -> int:
    import sys

    from .rank import DEFAULT_TOP, search, table, to_csv

    top = DEFAULT_TOP if args.top is None else args.top  # 0: all, in search() too
    # Everything that can be checked is checked before the search: the plot folder and the
    # --train arguments (folders made here are taken back if the search refuses its options).
    created, training, made = [], None, []
    given = sorted("--" + dest.replace("_", "-") for dest, default in args.train_defaults.items()
                   if getattr(args, dest) != default)
    if given and not args.train:
        raise EincError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} only "
                        "with --train TASK, which was not given")
    if args.train and top == 0:  # training thousands of candidates is never meant
        raise EincError("--train trains every row shown, and --top 0 would show every "
                        "candidate: give --top N, for example --top 8")
    try:
        if args.plot is not None:  # "" too, which prepare refuses by name
            from .plot import prepare
            created += prepare(args.plot)
        if args.train:
            try:
                from ..experiments.cli import check_training
            except ImportError as e:
                raise EincError(f"--train needs torch, which could not be imported: {e}"
                                ) from None
            training, made = check_training(args)
            created += made
        result = search(args.d, d_in=args.d_in, d_out=args.d_out, factors=args.factors,
                        k=args.k, max_flops=args.max_flops, max_params=args.max_params,
                        min_psi=args.min_psi, max_omega=args.max_omega, sort=args.sort,
                        top=top, transpose=args.transpose,
                        exclude_degenerate=args.exclude_degenerate, tolerance=args.tolerance,
                        measure=args.measure, batch=args.batch,
                        distinct=not args.all_roundings, keep_absorbable=args.keep_absorbable,
                        progress=False if args.no_progress else None)
    except BaseException:
        remove_folders(created)
        raise
    records = list(result)
    ranks = None
    if args.train and not result:  # nothing to train: the folders made for the runs go again
        remove_folders(made)
    if args.train and result:
        from ..experiments.cli import train_rerank
        if not (args.json or args.csv):
            print(table(result) + "\n")
        ranks = train_rerank(training, records, show=not (args.json or args.csv))
    if args.json or args.csv:
        if ranks is not None:  # the trained ranking goes into the records, not beside them
            trained = {spec: (i, loss) for i, spec, _, loss in ranks["trained"]}
            records = [dict(r, trained_rank=trained[r["spec"]][0],
                            trained_loss=trained[r["spec"]][1]) for r in records]
        print(json.dumps(records, indent=2) if args.json else to_csv(records).rstrip("\n"))
    elif ranks is None:
        print(table(result))
    if not result and result.message and (args.json or args.csv):
        print(f"einc: {result.message}", file=sys.stderr)
    if args.plot is not None:
        from .plot import plot

        try:
            paths = plot(result, args.plot)
        except BaseException:  # nothing to plot: the folders made for it go again
            remove_folders(created)
            raise
        for path in paths:
            print(f"wrote {path}", file=sys.stderr)
    return 0

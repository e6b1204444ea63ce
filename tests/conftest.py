"""Without a GPU the Triton kernels run under the Triton interpreter. Triton reads
TRITON_INTERPRET when it is imported (its library functions are decorated then), and torch
may import it early, so the variable is set here, before any test module imports einc."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def run_einc(capsys):
    """``einc ARGS`` in this process: run_einc(*args) -> (exit status, stdout, stderr)."""
    from einc.cli import main

    def run(*args):
        try:
            rc = main(list(args))
        except SystemExit as e:  # argparse's own errors
            rc = e.code
        out = capsys.readouterr()
        return rc, out.out, out.err
    return run

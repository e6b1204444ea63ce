"""A pytest plugin for runs that may be cut short (a device session's time limit): each
test's start, outcome, duration and failure text go to a file as they happen, where
pytest's own summary comes only at the end.

    PYTHONPATH=benchmarks LIVE_LOG=tests.log pytest -p _pytest_live_log ...
"""
import os
import time

_START = time.time()


def _write(line: str) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):  # with xdist the controller writes
        return
    with open(os.environ.get("LIVE_LOG", "tests.log"), "a") as fh:
        fh.write(line + "\n")


def pytest_runtest_logstart(nodeid, location):
    _write(f"START {time.time() - _START:7.1f} {nodeid}")


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":
        _write(f"{report.outcome.upper()} {time.time() - _START:7.1f} "
               f"{report.duration:7.2f}s {report.when} {report.nodeid}")
    if report.failed:
        _write(report.longreprtext[-4000:] + "\n" + "-" * 60)

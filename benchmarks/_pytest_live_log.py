"""A pytest plugin for runs that may be cut short (a device session's time limit): each
test's start, outcome, duration and failure text go to a file as they happen, where
pytest's own summary comes only at the end. The file is started afresh by each run.

    PYTHONPATH=benchmarks LIVE_LOG=tests.log pytest -p _pytest_live_log ...

Lines: START, PASSED, FAILED (the test's call), ERROR (collection, setup or teardown),
SKIPPED, each with seconds since the start.
"""
import os
import time

_START = time.time()


def _controller() -> bool:
    return not os.environ.get("PYTEST_XDIST_WORKER")  # with xdist the controller writes


def _write(line: str) -> None:
    if _controller():
        with open(os.environ.get("LIVE_LOG", "tests.log"), "a") as fh:
            fh.write(line + "\n")


def pytest_sessionstart(session):
    if _controller():
        open(os.environ.get("LIVE_LOG", "tests.log"), "w").close()


def _failure(report) -> None:
    _write(report.longreprtext[-4000:] + "\n" + "-" * 60)


def pytest_collectreport(report):
    if report.failed:
        _write(f"ERROR {time.time() - _START:7.1f} collect {report.nodeid}")
        _failure(report)


def pytest_runtest_logstart(nodeid, location):
    _write(f"START {time.time() - _START:7.1f} {nodeid}")


def pytest_runtest_logreport(report):
    if report.when != "call" and report.outcome == "passed":
        return
    outcome = "ERROR" if report.failed and report.when != "call" else report.outcome.upper()
    _write(f"{outcome} {time.time() - _START:7.1f} {report.duration:7.2f}s {report.when} "
           f"{report.nodeid}")
    if report.failed:
        _failure(report)

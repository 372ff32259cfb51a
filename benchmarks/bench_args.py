"""Argument types the benchmarks share: a bad value is argparse's usage error (status 2)."""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import tempfile

__all__ = ["check_output", "check_space", "nonnegative_int", "positive_float", "positive_int",
           "remove_on_signal"]


def _int_at_least(text: str, low: int) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if n < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, not {n}")
    return n


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    return _int_at_least(text, 1)


def nonnegative_int(text: str) -> int:
    """An argparse type: an integer of at least 0."""
    return _int_at_least(text, 0)


def positive_float(text: str) -> float:
    """An argparse type: a finite number above 0."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(x) or x <= 0:
        raise argparse.ArgumentTypeError(f"must be a number above 0, not {text}")
    return x


def check_space(ap: argparse.ArgumentParser, what: str, nbytes: int,
                where: str | None = None) -> None:
    """Refuse (usage error, status 2) images of ``nbytes`` that the file system of the
    temporary directory cannot hold: the benchmarks write every byte of them."""
    where = where if where is not None else tempfile.gettempdir()
    free = shutil.disk_usage(where).free
    if nbytes > free:
        ap.error(f"{what}: {nbytes >> 20} MiB of images do not fit in the "
                 f"{free >> 20} MiB free in {where}")


def check_output(ap: argparse.ArgumentParser, what: str, path: str) -> None:
    """Refuse (usage error, status 2) an output file whose directory is not there."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        ap.error(f"{what}: no directory {parent}")
    if os.path.isdir(path):
        ap.error(f"{what}: {path} is a directory")


def remove_on_signal(path: str) -> None:
    """On SIGINT or SIGTERM remove ``path`` (the run's temporary directory) and end
    at once with 128 + the signal, as a run ends when signalled: nothing left behind."""
    def handler(signum: int, _frame: object) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        shutil.rmtree(path, ignore_errors=True)
        os._exit(128 + signum)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)

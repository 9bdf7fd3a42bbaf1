"""One exception type per kind of bad input, and the CLI wrapper that turns them into a
single clear message and a non-zero exit."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class StepError(Exception):
    """Bad input that the user must fix; the message names the file/field."""


class ConfigError(StepError):
    pass


class DataError(StepError):
    pass


def run_cli(main: Callable[[], T]) -> T:
    try:
        return main()
    except StepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)

"""User-facing errors.

A ``UserError`` is a mistake in what the user gave us (config, data, model folder, CLI
flag). The CLI prints its message alone, without a traceback, and exits non-zero. Every
message names where the problem is (stage, field), the bad value, and what is allowed;
the allowed values always come from the code (a registry, a config model), never from
a hand-written list.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """A mistake in user input. Printed without a traceback; exit code 2."""

    exit_code = 2


class StageFailed(Exception):
    """A stage raised while running. Printed with what finished and how to resume."""

    exit_code = 1

    def __init__(self, stage: str, cause: str, finished: list[str], resume: str,
                 user_error: bool = False, result=None):
        self.stage, self.cause, self.finished, self.resume = stage, cause, finished, resume
        self.user_error = user_error
        self.result = result  # the RunResult: what ran, what was cached, what failed
        done = ", ".join(finished) if finished else "none"
        super().__init__(
            f"stage '{stage}' failed: {cause}\n"
            f"  finished (committed, will be reused): {done}\n"
            f"  resume with: {resume}")


def did_you_mean(value: str, allowed: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest allowed value, or ''."""
    close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def allowed_list(allowed: Iterable[str]) -> str:
    items = sorted(str(a) for a in allowed)
    return ", ".join(items) if items else "(none)"


def bad_value(where: str, field: str, value: object, allowed: Iterable[str] | str) -> UserError:
    """``where: field 'f' is 'v'; allowed: a, b (did you mean 'a'?)``."""
    if isinstance(allowed, str):
        return UserError(f"{where}: {field} {value!r} is not valid; expected {allowed}")
    allowed = list(allowed)
    return UserError(f"{where}: {field} {value!r} is not valid; allowed: "
                     f"{allowed_list(allowed)}{did_you_mean(str(value), allowed)}")

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


class CorruptArtifact(Exception):
    """A committed artifact's file does not match its manifest (bytes or sha256), or is
    missing: the store was damaged after the commit. Not the user's mistake, and never
    retried (the bytes stay wrong); a stage that meets one fails with its message alone,
    without a traceback, exit code 1. The message names the artifact, the file, what was
    expected and found, and what to do (``distill verify --repair``, then run again)."""

    exit_code = 1


def find_corrupt(exc: BaseException | None) -> CorruptArtifact | None:
    """The ``CorruptArtifact`` behind ``exc``, however Ray wrapped it on the way (a task's
    ``RayTaskError``, Ray Data's ``UserCodeException``, a Ray Train worker group's
    failures): the original exception, whose message is the one to show."""
    seen, todo, found = set(), [exc], None
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen or not isinstance(e, BaseException):
            continue
        seen.add(id(e))
        if isinstance(e, CorruptArtifact):
            if type(e) is CorruptArtifact:  # not Ray's RayTaskError(CorruptArtifact)
                return e
            found = found or e
        failures = getattr(e, "worker_failures", None)
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__,
                 *(failures.values() if isinstance(failures, dict) else ())]
    return found


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

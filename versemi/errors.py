"""Errors for bad user input: each problem names the file, what is wrong and how to fix it."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the user's input."""

    file: str
    problem: str
    fix: str

    def __str__(self) -> str:
        return f"{self.file}: {self.problem}\n    fix: {self.fix}"


class InputError(Exception):
    """Bad input found at a boundary of the pipeline; carries every problem found in one pass."""

    def __init__(self, problems: Iterable[Problem] | Problem):
        if isinstance(problems, Problem):
            problems = [problems]
        self.problems = list(problems)
        count = len(self.problems)
        header = f"{count} problem{'s' if count != 1 else ''} found:"
        super().__init__("\n".join([header] + [f"  - {p}" for p in self.problems]))

    def __reduce__(self):
        # rebuilt from the problems, not the message, so that it crosses worker-process boundaries intact
        return InputError, (self.problems,)


def input_error(file: str | Path, problem: str, fix: str) -> InputError:
    """Shorthand for an InputError with a single problem."""
    return InputError(Problem(str(file), problem, fix))


def warn(problem: Problem) -> None:
    """Report something suspicious that does not stop the run, on stderr, in the same form as an error."""
    print(f"warning: {problem}", file=sys.stderr, flush=True)

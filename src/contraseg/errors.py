"""The one exception type that the command line turns into a one-line error and exit status 2."""

from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """Bad user input: a missing or malformed file, an inconsistent dataset, a bad config.

    The message always names the offending file (or config key) so that the command line can
    print it on one line without a traceback.
    """

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        # a file name may hold a newline or other control character: escaped, it stays one line
        shown = self.path if self.path is None or self.path.isprintable() else ascii(self.path)
        super().__init__(f"{shown}: {problem}" if self.path else problem)


class TrainingError(Exception):
    """A run that cannot go on (a loss that became NaN, say); the last good checkpoint is kept.

    The command line prints it on one line and exits with status 1.
    """

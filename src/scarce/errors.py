"""Errors that mean "the user's input or request is wrong", all under one base, :class:`ScarceError`.

The command line prints a :class:`ScarceError` as one line (``scarce VERB: error: ...``) and
exits with its ``exit_code`` (2 unless a class says otherwise); any other exception is a bug in
Scarce and keeps its traceback. Every
message says what was expected, what arrived (file, shape, dtype, value) and how to fix it.

Each class also derives from the built-in exception a Python caller would expect for that
kind of problem (``ValueError`` for a bad value, ``FileNotFoundError`` for a missing input,
``FileExistsError`` for an output that would be overwritten, ``RuntimeError`` for a failed
reader process), so ``except ValueError`` in a notebook keeps working.
"""

from __future__ import annotations

import os
from pathlib import Path


class ScarceError(Exception):
    """Base of every error caused by the user's input, files, settings or environment.

    Attributes
    ----------
    exit_code : int
        What the command line exits with (2: a problem with the input or settings).
    """

    exit_code = 2


class ConfigError(ScarceError, ValueError):
    """A configuration file or override is invalid (unknown key, wrong type, bad value)."""


class InputError(ScarceError, ValueError):
    """An argument or input value cannot be used (the message says which and why)."""


class MissingInputError(ScarceError, FileNotFoundError):
    """An input file or folder does not exist or holds nothing usable."""


class OutputExistsError(ScarceError, FileExistsError):
    """An output (database folder, run folder) exists and would be overwritten."""


class ImageFileError(ScarceError, ValueError):
    """A file cannot be used: unreadable, wrong dtype, wrong shape, bad values.

    Parameters
    ----------
    path : path-like
        The file the problem is in.
    problem : str
        What is wrong with it.

    Attributes
    ----------
    path : pathlib.Path
    problem : str
    """

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class StoreError(ScarceError, ValueError):
    """A database is missing, unreadable, or not a Scarce database (names the path)."""


class _Problems(ScarceError, ValueError):
    """Several problems reported at once, one line each (each naming its file)."""

    headline = "problem(s) found"

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} {self.headline}:\n{lines}")


class IngestError(_Problems):
    """Validation of an ingest failed; nothing was written. ``problems``: one line per problem."""

    headline = "problem(s) found, nothing was written"


class CheckpointError(ScarceError, ValueError):
    """A checkpoint is missing, unsafe, corrupt or not a Scarce checkpoint (names the file)."""


class EvaluationError(_Problems):
    """Prediction and truth do not fit together; ``problems`` lists one line per file."""

    headline = "problem(s) with the evaluation files"


class ReaderError(ScarceError, RuntimeError):
    """A reader worker died, was killed or hung; training cannot continue."""


class DeviceError(ScarceError, ValueError):
    """The requested device (e.g. ``cuda``) is not available or not supported here."""


class WriteError(ScarceError, OSError):
    """An output could not be written (no space left, quota, read-only or size-limited file
    system, no permission); names the path and the space needed. The previous state is intact.
    """


class PeerLostError(ScarceError, RuntimeError):
    """Another process of a distributed (DDP) run died or stopped answering; names the rank.

    The command line exits with status 3; ``--resume`` continues from the last checkpoint.
    """

    exit_code = 3


__all__ = [
    "CheckpointError",
    "ConfigError",
    "DeviceError",
    "EvaluationError",
    "ImageFileError",
    "IngestError",
    "InputError",
    "MissingInputError",
    "OutputExistsError",
    "PeerLostError",
    "ReaderError",
    "ScarceError",
    "StoreError",
    "WriteError",
]

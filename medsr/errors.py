"""The exception hierarchy: every error medsr raises on purpose is a MedsrError.

The command line turns a MedsrError into one line on stderr and a non-zero exit code; anything else is a bug.
"""


class MedsrError(Exception):
    """Base class of the errors medsr raises for bad input, bad bundles and unavailable backends."""


class InputError(MedsrError, ValueError):
    """An input file or value that cannot be used (missing, corrupt, wrong shape, NaN, ...)."""


class OutputError(MedsrError, OSError):
    """An output that cannot or must not be written (exists without --overwrite, unwritable directory, disk full)."""


class OutputExistsError(OutputError):
    """An output that exists, and ``--overwrite`` was not given (``path``: that output)."""

    def __init__(self, path, message: str):
        super().__init__(message)
        self.path = path


class BundleError(MedsrError, ValueError):
    """A model bundle that fails validation (manifest version, missing graph, sha256 mismatch, bad field)."""


class ShapeError(MedsrError, ValueError):
    """An array whose shape does not fit what a graph or operator expects."""


class BackendError(MedsrError, RuntimeError):
    """A runtime backend that is missing or did not start as asked (provider not active, TensorRT absent)."""


class CheckpointError(MedsrError, ValueError):
    """A checkpoint whose format, keys or shapes do not match what its loader expects."""


class NonFiniteError(MedsrError, ArithmeticError):
    """NaN or Inf appeared in a pipeline stage (the message names the stage), e.g. an fp16 overflow."""

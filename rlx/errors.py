"""User-facing errors.

An `RlxError` is bad input or an impossible setting: the CLI prints its message as one line,
`rlx: error: ...`, and exits with status 2, with no traceback. Anything else is a bug and keeps its
traceback.
"""


class RlxError(Exception):
    """Bad input named in one line; raised before any work starts wherever it can be."""


class NonFiniteError(RlxError):
    """A loss or gradient became NaN or inf; the run stops after saving a checkpoint."""


def require(ok: bool, message: str) -> None:
    """Raise `RlxError(message)` unless ``ok``: the config checks read as a list of rules."""
    if not ok:
        raise RlxError(message)

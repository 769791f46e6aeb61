"""User-facing errors.

An `RlxError` is bad input or an impossible setting: the CLI prints its message as one line,
`rlx: error: ...`, and exits with status 2, with no traceback. Anything else is a bug and keeps its
traceback.
"""


class RlxError(Exception):
    """Bad input named in one line; raised before any work starts wherever it can be."""


class NonFiniteError(RlxError):
    """A loss or gradient became NaN or inf; the run stops after saving a checkpoint."""


class StopRequested(Exception):
    """SIGINT/SIGTERM arrived: the current step finished and a checkpoint was saved."""

    def __init__(self, signum: int, step: int, checkpoint: str) -> None:
        import signal

        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        super().__init__(
            f"stopped by {name} after step {step}; checkpoint {checkpoint}; "
            f"continue with trainer.resume={checkpoint}"
        )


def require(ok: bool, message: str) -> None:
    """Raise `RlxError(message)` unless ``ok``: the config checks read as a list of rules."""
    if not ok:
        raise RlxError(message)


class StopNow(BaseException):
    """A signal after the last training step (final evaluation, final model): stop at once (one
    process), or at the ranks' next agreement under torchrun (`rlx.distributed.signal_everywhere`).

    A `BaseException`, as `KeyboardInterrupt` is: the signal handler raises it at whatever bytecode is
    running, often inside a library whose ``except Exception`` would turn it into something else
    (transformers' ``BatchEncoding.convert_to_tensors`` wraps any Exception in a ValueError, which
    rlx then read as "no pad token"; MLflow logging's guard would have read it as a lost server)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

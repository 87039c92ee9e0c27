"""Every error vitslim raises on purpose, in one place.

`UserError` and its subclasses are `ValueError`s: what was asked cannot be done as asked (a model, plan, file,
target or flag the library refuses). Their message is one line that names the bad value and what is accepted;
the command line prints it and exits with status 2. `NonFiniteLossError` (exit 1) and `Interrupted` (exit 130 or
143) end a training run after its last good checkpoint; `NoisyTableError` is a latency measurement too noisy to
keep.
"""
from __future__ import annotations


class UserError(ValueError):
    """A problem with what the user asked for; the command line prints it as one line and exits with status 2."""


class UnsupportedModelError(UserError):
    """The model is not one vitslim can search or slim (the message says what is supported)."""


class PlanMismatchError(UserError):
    """A plan does not fit the model it is applied to."""


class SlimFileError(UserError):
    """A saved slim model is missing, corrupted, or does not match its own plan."""


class TargetError(UserError):
    """A target, mix or alignment that cannot be met or is not well formed."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


class Interrupted(Exception):
    """SIGINT or SIGTERM during training; the message says what was saved. exit_code: 130 or 143."""

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class NoisyTableError(LookupError):
    """The timings were too noisy to fit: the latency table is not cached (and no plan is made from it)."""

"""Errors the training job reports as bad input (exit code 2) rather than as a crash (exit code 1)."""

from __future__ import annotations


class TrainingInputError(ValueError):
    """The spec, the data or the machine cannot run this job; the message names the value and the fix.

    Raised before training starts (or at its first step, for running out of memory), so that a caller can
    tell a retry-worthy crash from a spec that will fail the same way every time.
    """

    exit_code = 2

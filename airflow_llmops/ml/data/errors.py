"""Errors of the data stage, each saying what is wrong and what to do."""

from __future__ import annotations


class DatasetError(ValueError):
    """The dataset cannot be read or prepared; the message names the source and the fix."""

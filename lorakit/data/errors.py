"""The one error type of the data pipeline: bad input, with the file or option it came from in the message."""

from __future__ import annotations

__all__ = ["DatasetError", "NoValidationImages"]


class DatasetError(ValueError):
    """A dataset cannot be built or read as given. The message names the file, folder or option and says what
    was expected, so that a user can fix their data without reading our code."""


class NoValidationImages(DatasetError):
    """validation_split holds out no image (too few images for the split): sd-scripts then trains without
    validation, so the trainer tells this case from a dataset that cannot be built."""

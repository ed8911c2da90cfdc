"""The one error class of data preparation: something in the user's data or data config."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data or data settings; the message names the file and line/row (or config key) and the fix."""

    user_error = True

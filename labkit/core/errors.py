"""The one exception labkit raises for bad input.

Every message is a full sentence that names the fix, so a notebook cell or the command line can show
it as it is, without a traceback from deep inside transformers.
"""


class LabkitError(ValueError):
    """Bad input or an unusable model: the message says what to do about it."""

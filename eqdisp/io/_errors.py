"""The one error of `eqdisp.io`."""


class WeightsError(ValueError):
    """A weight file is missing, unreadable, of an unknown format, or lacks the entry asked for.

    The message is one line that names the file; command-line tools print it without a traceback.
    """

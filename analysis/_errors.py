"""The analysis's own "bad input" error (a one-line message for the user)."""


class AnalysisError(ValueError):
    """Bad analysis input: a block out of range, an empty t grid, runs that cannot be compared...

    The message is one line, meant to be printed without a traceback.
    """


__all__ = ["AnalysisError"]

"""The ``if __name__ == "__main__"`` of every command: bad input is one line, never a traceback."""

import sys
from collections.abc import Callable


def run(main: Callable[[], object]) -> None:
    """Call ``main()``; an error in ``eqdisp.errors.USER_ERRORS``, or an ``OSError`` (a full disk,
    a file that cannot be written: the machine's state, not a bug), exits with ``error: <message>``."""
    from eqdisp.errors import USER_ERRORS

    try:
        main()
    except (*USER_ERRORS, OSError) as error:
        sys.exit(f"error: {error}")

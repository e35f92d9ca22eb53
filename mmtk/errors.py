"""The one exception type users see.

Raise :class:`MmtkError` for anything caused by the user's input (a wrong path, a corrupt file, a
bad shape, an unknown recipe key). The message is one line naming the problem and the fix; the CLI
prints it without a traceback and exits with status 2.
"""


class MmtkError(Exception):
    """A problem with the user's input, explained in one line (what is wrong and how to fix it)."""

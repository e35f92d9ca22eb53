"""The one exception type users see.

Raise :class:`MmtkError` for anything caused by the user's input (a wrong path, a corrupt file, a
bad shape, an unknown recipe key). The message is one line naming the problem and the fix; the CLI
prints it without a traceback and exits with status 2.
"""


class MmtkError(Exception):
    """A problem with the user's input, explained in one line (what is wrong and how to fix it)."""

    def __init__(self, message: object = "", *args: object) -> None:
        # torch's DataLoader re-raises a worker's error as MmtkError("Caught MmtkError in DataLoader worker
        # process N.\nOriginal Traceback ...\nmmtk.errors.MmtkError: LINE"); keep the one line the user needs.
        text = str(message)
        if text.startswith("Caught MmtkError in DataLoader worker"):
            message = text.rstrip().splitlines()[-1].removeprefix("mmtk.errors.MmtkError: ")
        super().__init__(message, *args)


class CorruptCheckpoint(MmtkError):
    """A checkpoint file (``path``) that cannot be read, or whose content no longer matches its recorded SHA-256;
    the CLI adds the older intact checkpoint of the same run to the message, when there is one."""

    def __init__(self, message: object = "", path: object = None) -> None:
        super().__init__(message)
        self.path = path

"""The exception type for mistakes a user can fix (config, paths, checkpoints, data), and its one
kind that needs its own wording: an image file that cannot be decoded. No torch here: the entry
points report a mistake before they import it."""

COMMAND = "\n$ "  # in an error message: what follows is a command, printed on its own line (cli.fail)


class UserError(Exception):
    """A problem the user can fix; entry points print its message as one paragraph and exit 2.

    The message names the bad value and says what would be valid.
    """


# Starts the message of UnreadableImage; a loader worker's copy is found again by it.
UNREADABLE = "unreadable image file "


class UnreadableImage(UserError):
    """An image file PIL cannot decode. One message argument, so that a loader worker can re-raise
    it in the main process (with its traceback folded into the message: see :func:`unreadable_message`)."""


def unreadable_message(e: BaseException) -> str:
    """``unreadable image file <path> (<reason>)``, also out of a worker's re-raised copy."""
    lines = [line for line in str(e).splitlines() if UNREADABLE in line]
    return lines[-1][lines[-1].index(UNREADABLE):] if lines else str(e)

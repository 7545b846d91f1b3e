"""The one exception type for mistakes a user can fix (config, paths, checkpoints, data)."""

COMMAND = "\n$ "  # in an error message: what follows is a command, printed on its own line (cli.fail)


class UserError(Exception):
    """A problem the user can fix; entry points print its message as one paragraph and exit 2.

    The message names the bad value and says what would be valid.
    """

"""The one exception type for bad input: the CLI prints its message as one line and exits non-zero."""


class LorakitError(Exception):
    """Bad input from the user (a flag, a file, a config key). The message is the whole explanation."""

"""The one exception type users see: a bad input or file, said in one line."""


class FedfheError(ValueError):
    """A user-facing error; the CLI prints its message alone and exits non-zero."""

"""The one exception type that the CLI turns into a single clear line on stderr."""


class IgptError(ValueError):
    """A user-facing error: bad input or an impossible option. The CLI prints `igpt: error: <message>`
    and exits non-zero, without a traceback (unless `--debug`); a Python caller gets the exception (a
    ValueError, so code that catches bad arguments the usual way catches it too)."""

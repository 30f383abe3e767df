"""Errors that mean "the user asked for something that cannot be done", reported as one line, exit status 2."""


class InputError(ValueError):
    """Bad input from the user: a path, a parameter, a prompt, a file."""


class UnsupportedModelError(InputError):
    """A model specdec cannot verify trees with exactly; raised instead of producing different output."""


class ContextLengthError(InputError):
    """The prompt plus the tokens asked for do not fit in the model's context (the server's
    `context_length_exceeded`)."""

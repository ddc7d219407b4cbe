"""One exception type for every mistake a user can make.

The CLI prints these as a single line (no traceback) and exits with status 2; anything else is a bug and keeps
its traceback.
"""


class PersonalizeError(Exception):
    """A problem with the user's input or environment, with a message that says what to do about it."""


class PlaceholderTaken(PersonalizeError):
    """A placeholder the tokenizer already knows: a word of its vocabulary, or an earlier concept's placeholder."""

    def __init__(self, message: str, placeholder: str):
        super().__init__(message)
        self.placeholder = placeholder

"""The one error every checkpoint reader raises, kept apart so the readers need not import each other."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong with it."""

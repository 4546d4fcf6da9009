"""One exception type for every user-facing failure, so the CLI can report it in one line."""


class LarosaError(ValueError):
    """Bad input: an unsupported model, a bad sparsity, a rotations file that does not fit, unreadable data."""

"""One exception type for problems the user can fix; the CLI prints it as a single line."""


class UserError(ValueError):
    """Bad input, missing file, unreachable registry, ...: the message says what and what to do."""

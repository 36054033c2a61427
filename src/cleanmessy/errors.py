"""The one exception type for user mistakes: the CLI prints it as a message, never a traceback."""


class UserError(Exception):
    """Bad input or configuration that the user can fix; the message says what and how."""

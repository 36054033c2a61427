"""The project's exceptions: `UserError` for user mistakes (the CLI prints it as one line, never a
traceback), `UndeclaredInput` for a stage that reads what its dvc.yaml entry does not declare."""


class UserError(Exception):
    """Bad input or configuration that the user can fix; the message says what and how."""


class UndeclaredInput(RuntimeError):
    """A stage read a param or file that its dvc.yaml entry does not declare (a bug in dvc.yaml
    or in the stage, not a user mistake)."""

"""The one exception type for problems a user can cause (bad data, flags, paths): main.py prints its message as
one line and exits with code 2. Nothing here imports anything of the project: every floor can raise it."""


class DataError(Exception):
    """A problem with the user's data or arguments: reported as one line, exit code 2."""

"""The one kind of error a user fixes without reading code: a bad parameter, a missing file or folder, a
malformed line. Its message names the parameter, file, line or field and what to do; the project's
`kedro run` (cli.py) prints it in a few lines instead of a traceback, which stays for bugs."""


class UserInputError(ValueError):
    """An input the user gave cannot be used; the message says which one, where, and what to change."""

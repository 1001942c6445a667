"""The one error type for bad input from the user, which data, IO and CLI code all raise."""


class UserError(Exception):
    """Bad input from the user (missing file, unknown task, malformed data...).

    Entry scripts report it as one line on stderr and exit with status 2, without a traceback.
    """


def not_utf8(path, err):
    """The UserError for a data file that fails to decode (err: its UnicodeDecodeError)."""
    return UserError(f"{path} is not UTF-8 text ({err.reason})")

"""Errors that reach the user as one line and an exit code (BIDS execution-spec codes)."""

EX_USAGE = 64  # bad command line
EX_DATAERR = 65  # input data unusable
EX_NOINPUT = 66  # required input missing
EX_CANTCREAT = 73  # cannot create output


def one_line(err: BaseException) -> str:
    """An exception as one line of text (for ``bids_ctp: error: ...``)."""
    return " ".join(str(err).split()) or type(err).__name__


class BidsCtpError(Exception):
    """Base class: ``str(err)`` is the one-line message, ``exit_code`` the process exit code."""

    exit_code = 1


class UsageError(BidsCtpError):
    exit_code = EX_USAGE


class DataError(BidsCtpError):
    exit_code = EX_DATAERR


class InputMissingError(BidsCtpError):
    exit_code = EX_NOINPUT


class OutputError(BidsCtpError):
    exit_code = EX_CANTCREAT

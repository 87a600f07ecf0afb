"""Errors a user can cause, and the exit codes the CLI maps them to.

The CLI prints these as one line naming the input and the fix, and exits with the error's `exit_code`:

    0   ok
    1   a stage failed (a bug, a crash, bad data a stage could not handle)
    2   bad usage or input: a wrong option, path or schema (`UserError`)
    3   held: the run finished but the nightly quality gate kept `latest` where it was (`EXIT_HELD`)
    75  busy: another run holds the work folder's lock; try again later (`Busy`, EX_TEMPFAIL in sysexits.h)
"""

EXIT_OK = 0
EXIT_STAGE_FAILED = 1
EXIT_USAGE = 2
EXIT_HELD = 3  # nightly's quality gate kept `latest` where it was
EXIT_BUSY = 75


class UserError(Exception):
    """Bad path, bad option, wrong schema, missing package: the message says what and how to fix it."""

    exit_code = EXIT_USAGE


class Busy(UserError):
    """Another run holds what this one needs (the work folder's lock): nothing is wrong, run again later."""

    exit_code = EXIT_BUSY

"""Errors a user can cause. The CLI prints these as one line naming the input and the fix."""


class UserError(Exception):
    """Bad path, bad option, wrong schema, missing package: the message says what and how to fix it."""

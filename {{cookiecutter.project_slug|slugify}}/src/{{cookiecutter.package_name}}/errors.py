class UserError(Exception):
    """A mistake the user can fix (bad data, path or option).

    The command line prints it as one ``ERROR:`` line, without a traceback; the message
    says what is wrong, where, and how to fix it.
    """

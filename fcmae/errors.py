class UserError(Exception):
    """A mistake in the user's input or files: `fcmae` prints it as one line and exits with 2."""

"""Errors the user can act on; the CLI prints them as one line, without a traceback."""


class BoneHealthError(Exception):
    """Bad input or configuration: the message names the file or key and what was expected."""


class DataError(BoneHealthError):
    """A dataset, image or annotation that cannot be used as given."""

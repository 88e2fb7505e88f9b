"""The one exception type users see for bad input."""


class LossFreeConfigError(ValueError):
    """Bad input: the message names the field (or flag), its value, and how to fix it.

    Entry points print ``str(err)`` on one line without a traceback (``--debug`` shows it).
    """

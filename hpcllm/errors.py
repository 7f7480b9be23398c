"""The one error type for failures caused by user input or the environment.

Library code raises ``HpcllmError("file:line: what is wrong")``; the CLI prints the message
on one line without a traceback (``hpcllm --debug ...`` shows it) and exits with status 2.
"""


class HpcllmError(Exception):
    """A failure the user can fix: bad input, missing file, impossible request."""

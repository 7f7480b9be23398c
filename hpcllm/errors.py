"""The one error type for failures caused by user input or the environment.

Library code raises ``HpcllmError("file:line: what is wrong")``; the CLI prints the message
on one line without a traceback (``hpcllm --debug ...`` shows it) and exits with status 2.
A message is always one line of bounded length: whatever it quotes (a library's exception
text, a line of a bad file) is cut to an excerpt, so a broken 63 KB tokenizer.json cannot
become a 63 KB error line.
"""
import re

#: longest message kept whole; longer ones keep their start (the file and what is wrong)
#: and their end (the advice), around an ellipsis
MAX_MESSAGE = 600


def excerpt(text: str, limit: int = 120) -> str:
    """``text`` on one line, at most about ``limit`` characters (cut in the middle)."""
    text = re.sub(r"\s*\n\s*", " ", str(text)).strip()
    if len(text) <= limit:
        return text
    head = max(1, limit * 2 // 3)
    return f"{text[:head]} … {text[-(limit - head - 3):]}" if limit - head > 3 else text[:limit] + " …"


class HpcllmError(Exception):
    """A failure the user can fix: bad input, missing file, impossible request."""

    def __init__(self, message="", *args):
        super().__init__(excerpt(message, MAX_MESSAGE), *args)

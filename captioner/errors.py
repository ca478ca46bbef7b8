"""The project's error types, in one module that imports nothing, so every stage and the demo can name them.

An error of these types means something the user can fix (a file, a data directory, an option): the
CLI and the app print it as one line. Any other exception is a bug and keeps its traceback. Stage
errors also subclass the built-in type callers caught before there was a base class (``ValueError``,
``RuntimeError``), so ``except ValueError`` around a config or a cache still works.
"""

from __future__ import annotations


class CaptionerError(Exception):
    """Base class: bad input or a bad option, reported to the user as one line naming what and where."""


class ConfigError(CaptionerError, ValueError):
    """An invalid option value or combination (decoding, model, training, ``--device``, ``--precision``)."""


class DatasetError(CaptionerError, ValueError):
    """A data directory or caption file that cannot be used (message names the file and place)."""


class VocabError(CaptionerError, ValueError):
    """A vocabulary file that cannot be used."""


class EncoderError(CaptionerError, ValueError):
    """An encoder or weights specification that cannot be used."""


class ImageLoadError(CaptionerError, ValueError):
    """An image that cannot be used; ``source`` names it and ``reason`` says why."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source, self.reason = source, reason


class CheckpointError(CaptionerError, ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file and the problem."""


class TrainingError(CaptionerError, RuntimeError):
    """Training cannot go on (diverged, unwritable output, mismatched resume)."""


USER_ERRORS: tuple[type[Exception], ...] = (CaptionerError,)
"""What the CLI and the app print as one line (argparse reports its own usage errors)."""


# What decoders raise for a damaged file (Pillow's UnidentifiedImageError is an OSError; RuntimeError is libheif's,
# through pillow-heif): ``images.load_image``, ``raw`` and ``metadata`` treat such a file as unreadable, one error
# line, instead of ending a batch.
UNREADABLE = (OSError, SyntaxError, ValueError, EOFError, RuntimeError)

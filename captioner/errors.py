"""The exceptions that mean "bad input", printed as one line by the CLI instead of a traceback."""

from data_prep.manifest import DatasetError
from data_prep.vocab import VocabError

from .checkpoint import CheckpointError
from .encoder import EncoderError
from .images import ImageLoadError
from .train import TrainingError

# ValueError covers invalid option combinations (DecodeConfig, ModelConfig) as well.
USER_ERRORS: tuple[type[Exception], ...] = (DatasetError, VocabError, EncoderError, ImageLoadError, CheckpointError,
                                            TrainingError, FileNotFoundError, ValueError)

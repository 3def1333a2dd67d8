"""Exceptions a user can act on.

Every error erasekit raises for bad input derives from :class:`ErasekitError`; the CLI prints its
message on one line and exits with :attr:`ErasekitError.exit_code`.
"""

from __future__ import annotations


class ErasekitError(Exception):
    """Base class: a problem with the user's input or environment, with a message saying how to fix it."""

    exit_code: int = 2


class ConfigError(ErasekitError):
    """A configuration file or ``--set`` override is invalid."""


class ModelLoadError(ErasekitError):
    """A model path or hub id could not be loaded, or its family is not supported."""


class ErasureMismatchError(ErasekitError):
    """An erasure (a mask or any other method's artefact) does not fit the model it is applied to."""


class ErasureFileError(ErasekitError):
    """An erasure artefact is missing, incomplete, corrupt or of a newer format."""


#: The mask's names for the same errors (a mask is one kind of erasure).
MaskMismatchError = ErasureMismatchError
MaskFileError = ErasureFileError


class UnknownMethodError(ConfigError):
    """No erasure method is registered under the name asked for."""


class UnsupportedError(ErasekitError):
    """A method cannot do what was asked: a model family it does not support, or a fold of an
    inference-time erasure."""


class PromptError(ErasekitError):
    """A prompt, concept or prompt file is empty or unreadable."""


class TrainingDivergedError(ErasekitError):
    """The training loss became NaN or infinite."""

    exit_code = 1

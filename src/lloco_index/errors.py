"""Exceptions raised by lloco-index. Each message names the problem and the fix."""


class LLoCOError(Exception):
    """Base class of every error this package raises on purpose."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a command, carrying the one line that says what was saved and how to go on.

    Still a ``KeyboardInterrupt``: code that stops on Ctrl-C keeps stopping; the ``lloco-index`` command prints
    the line instead of a traceback.
    """


# Not ValueErrors: LlamaIndex's refine synthesizer catches ValueError and answers "Empty Response",
# which would turn these into a silent empty answer with exit status 0.
class EmptyDocumentError(LLoCOError):
    """A document or chunk has no text to compress."""


class UnknownPlaceholderError(LLoCOError, KeyError):
    """A prompt names a soft-prompt id that the store does not hold."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class PlaceholderNotAllowedError(UnknownPlaceholderError):
    """A prompt names a soft-prompt id that no retriever handed out in this process.

    An UnknownPlaceholderError too: code that answers an unknown id (e.g. with a client error) answers
    this one the same way, and the message never says whether the store holds the id.
    """


class StoreMismatchError(LLoCOError):
    """A soft-prompt store was written by another compressor or base model."""


class CorruptStoreError(LLoCOError):
    """A store file is truncated, corrupt or missing."""


class ModelNotFoundError(LLoCOError, FileNotFoundError):
    """A model file or directory is missing."""


class AdapterMismatchError(LLoCOError):
    """A LoRA adapter was trained against another compressor or base model."""


class ContextBudgetError(LLoCOError):
    """A prompt does not fit into the model's context window."""


class StoreLockedError(LLoCOError):
    """Another process is writing into the same persist dir."""


class PersistDirError(LLoCOError):
    """A persist dir cannot be written, or one of its files cannot be read back."""


class InputError(LLoCOError):
    """An input (a directory, a text, a command-line value) cannot be used as given."""


class DataNotFoundError(LLoCOError, FileNotFoundError):
    """Training or evaluation data is missing."""


class UnsupportedModelError(LLoCOError, ValueError):
    """A decoder is of a model family lloco-index does not support (see docs/models.md)."""

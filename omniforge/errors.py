"""The exceptions omniforge raises on bad input: one type per kind, each naming what and where."""


class OmniforgeError(Exception):
    """Base of every error omniforge raises on bad input or configuration."""


class ConfigError(OmniforgeError, ValueError):
    """A config value is unknown, missing or of the wrong type; the message names the key."""


class DataError(OmniforgeError, ValueError):
    """A stage's data cannot feed training: a dataset's samples keep failing (`SampleStream.FAILING_IN_A_ROW` in a row)."""


class CheckpointError(OmniforgeError):
    """A model folder is missing, incomplete, or does not fit the configured architecture."""


class PlaceholderCountError(OmniforgeError, ValueError):
    """The number of placeholder tokens in the text differs from the number of encoder features."""

    def __init__(self, modality: str, expected: int, got: int, message: str | None = None):
        self.modality, self.expected, self.got = modality, expected, got
        super().__init__(message or (
            f"{modality}: the encoders produced {expected} feature vectors but the text holds {got} "
            f"{modality} placeholder tokens; expand placeholders with omniforge.processing.chat"
        ))


class MediaError(OmniforgeError):
    """A media file could not be turned into model input; the message names the file."""

    def __init__(self, source: object, problem: str):
        self.source, self.problem = source, problem
        super().__init__(f"{_describe(source)}: {problem}")


class UnreadableMediaError(MediaError):
    """The file is missing, unreadable, truncated or corrupt."""


class UnsupportedMediaError(MediaError):
    """The file is not in a format omniforge can decode."""


class EmptyMediaError(MediaError):
    """The media has no content: zero pixels, no frames, no samples."""


class MediaTooLargeError(MediaError):
    """The media exceeds a configured size limit (e.g. a decompression bomb)."""


def _describe(source: object) -> str:
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    return str(source)

"""The exceptions omniforge raises on bad input: one type per kind, each naming what and where."""


class OmniforgeError(Exception):
    """Base of every error omniforge raises on bad input or configuration."""


class ConfigError(OmniforgeError, ValueError):
    """A config value is unknown, missing or of the wrong type; the message names the key."""


class CheckpointError(OmniforgeError):
    """A model folder is missing, incomplete, or does not fit the configured architecture."""


class PlaceholderCountError(OmniforgeError, ValueError):
    """The number of placeholder tokens in the text differs from the number of encoder features."""

    def __init__(self, modality: str, expected: int, got: int, detail: str = ""):
        self.modality, self.expected, self.got = modality, expected, got
        super().__init__(
            f"{modality}: the encoders produced {expected} feature vectors but the text holds {got} "
            f"{modality} placeholder tokens{detail}; expand placeholders with omniforge.processing.counts"
        )

"""Errors a user should see as one clear line, not a traceback."""


class TloptError(Exception):
    """Base of every error caused by the user's input or environment."""


class ConfigError(TloptError):
    """The parameter file has an unknown key, a wrong type or a bad value."""


class DataError(TloptError):
    """The dataset folder is missing, empty or cannot be split as asked."""


class WeightsError(TloptError):
    """Pretrained weights are needed but cannot be downloaded here."""


class TrainingError(TloptError):
    """A training run cannot continue (for example, the loss became NaN)."""

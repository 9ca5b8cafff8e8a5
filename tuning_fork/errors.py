"""The one exception type users see: a message that names the culprit and how to fix it."""


class TuningForkError(Exception):
    """Bad input (config, data, paths): printed as one line, never as a traceback."""


class ConfigError(TuningForkError):
    pass


class DataError(TuningForkError):
    pass

"""The one exception fastgrok raises for bad input: the CLI prints its message on one line and exits 2."""


class ConfigError(ValueError):
    pass

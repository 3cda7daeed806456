"""The one error type users see for bad input."""


class ConfigError(Exception):
    """Bad user input: the message is one line naming the file and the key."""

    def __init__(self, file: str, key: str, problem: str):
        self.file, self.key, self.problem = str(file), key, problem
        super().__init__(f"{self.file}: key '{key}': {problem}")

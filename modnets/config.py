"""Configuration errors and the checks that run before any training.

Every mistake in a config ends as one line naming the key, the bad value and what
would fix it (`ConfigError`), never as a stack trace from deep inside torch.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad config value: `key=value: what is allowed`."""

    def __init__(self, key: str, value, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r}: expected {allowed}")


def check(ok: bool, key: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(key, value, allowed)

"""The error every layer raises for a bad setting: one line, naming the field and the fix.

It lives apart from the schema (fmjax/config.py) so that the model and its
sharding can raise it without importing the schema.
"""


class ConfigError(ValueError):
  """A bad experiment config. The message is one line: the field, then the fix."""

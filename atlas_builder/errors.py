"""The tool's own error type.

Every problem a user can fix (bad config, unknown layer, missing file, model
that will not load) is raised as an AtlasError whose message says what is
wrong and what to do; the CLI prints it on one line and exits non-zero.
Anything else is a bug and keeps its traceback.
"""


class AtlasError(Exception):
    """A user-fixable problem; str(error) is the whole message shown."""

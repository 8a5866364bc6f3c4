"""The tool's own error and warning types.

Every problem a user can fix (bad config, unknown layer, missing file, model
that will not load) is raised as an AtlasError whose message says what is
wrong and what to do; the CLI prints it on one line and exits non-zero.
Anything else is a bug and keeps its traceback.

Something the user should know about but that does not stop the build (a
checkpoint loaded with unsafe pickling, top_k larger than the dataset) is a
`warnings.warn(AtlasWarning(...))`; the CLI prints each on one line as
`atlas: warning: ...`.
"""


class AtlasError(Exception):
    """A user-fixable problem; str(error) is the whole message shown."""


class AtlasWarning(UserWarning):
    """A problem that does not stop the build; str(warning) is the whole message shown."""


class ForwardError(AtlasError, RuntimeError):
    """A model's own forward raised (typically: it does not fit the dataset's inputs).

    An AtlasError, so the CLI shows one line; also a RuntimeError, as the model's
    failure was before it was wrapped, for callers that catch that."""

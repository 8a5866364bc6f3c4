"""`python -m atlas_builder` is the `atlas` command."""

import sys

from .cli import entry

sys.exit(entry())

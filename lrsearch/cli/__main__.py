"""``python -m lrsearch.cli``: the ``lrsearch`` executable."""

from lrsearch.cli import entry

entry()

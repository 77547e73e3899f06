"""The two kinds of failure llmmem distinguishes.

* :class:`ConfigError` - the user's input is wrong (a flag, a YAML key, a file, an environment variable).
  The command line prints its one-line message and exits with code 2, before any model loads and
  without writing anything.
* :class:`CellsFailed` - some cells of a run raised; each was recorded (``<run>/.failed/``) and the other
  cells finished. The command line prints its message and exits with code 1.
* anything else is a bug: the command line prints one line saying so (and where to report it) before the
  traceback.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A user error: printed as one line on stderr, exit code 2, nothing half-written."""


class IncompatibleError(ConfigError):
    """Two valid settings that cannot be combined (e.g. an OWL profile with an N:M structure): in a sweep's
    grid such a combination is left out with a visible warning; on its own it is an error."""


class CellsFailed(RuntimeError):
    """Cells of a run failed (recorded with their errors in ``<run>/.failed/``); the others finished."""


ISSUES_URL = "https://github.com/llmmem/llmmem/issues"

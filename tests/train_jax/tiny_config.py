"""run.py's --config file for the tiny family (run through run_py_tiny.py, which puts this
directory on the path)."""

from tiny_task import get_config  # noqa: F401

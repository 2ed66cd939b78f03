"""``python -m gvpo_kernels.trainer [--help]``: see cli.py."""

from .cli import main

main()

"""``python -m cribo``: the ``cribo`` command (:mod:`cribo.cli`)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

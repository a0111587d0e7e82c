"""``python -m kvsparse.eval``: runs :func:`kvsparse.eval.cli.main`."""
import sys

from .cli import main

sys.exit(main())

"""``python -m applications.imaml train|evaluate`` — see :mod:`applications.imaml.cli`."""

import sys

from .cli import main

sys.exit(main())

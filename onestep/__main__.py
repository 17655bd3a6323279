"""``python -m onestep``: see ``onestep.cli``."""
import sys

from .cli import main

sys.exit(main())

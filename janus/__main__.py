"""``python -m janus`` is the ``janus`` command (also what ``torchrun -m janus train`` runs)."""

import sys

from janus.cli import main

sys.exit(main())

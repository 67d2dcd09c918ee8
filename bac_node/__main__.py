"""``python -m bac_node`` runs the ``bac-node`` command."""

import sys

from bac_node.cli import main

sys.exit(main())

"""``python -m training --config FILE --out DIR`` is ``bac-node train``."""

import sys

from bac_node.cli import main

sys.exit(main(["train", *sys.argv[1:]]))

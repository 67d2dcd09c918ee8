"""``bac-node evaluate``: a model (and optionally a second one) on a labelled set, with
the source study's tables, honest uncertainty and a report people can read.

- :mod:`.data`: the labelled set (phantom manifest or your own data in that layout);
- :mod:`.sources`: where predicted masks come from (a model run as the node runs it, or
  any masks);
- :mod:`.metrics` and :mod:`.bootstrap`: the numbers, tested against scikit-learn;
- :mod:`.run`: scoring, strata, comparison, JSON and CSV;
- :mod:`.report`: the self-contained HTML page;
- :mod:`.paper`: the source study's figures and which of our aggregations matches them.
"""

from bac_node.evaluate.run import Evaluation, evaluate
from bac_node.evaluate.sources import MaskSource, ModelSource

__all__ = ["Evaluation", "MaskSource", "ModelSource", "evaluate"]

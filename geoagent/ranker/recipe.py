"""GeoRanker's fine-tuning defaults, in one light module (no torch) that the CLI's option defaults read too.

From its fine-tuning script: lambda1 0.7, K 1, learning rate 1e-4, one query a forward pass and four
accumulated a step, groups of five candidates, weight decay 0.01 and the Hugging Face Trainer's gradient
clipping at norm 1.
"""

from __future__ import annotations

#: Weight of the first-order loss; the second order gets ``1 - LAMBDA1``.
LAMBDA1 = 0.7
#: GeoRanker's ``K``: only the nearest candidate's pick counts in the first-order term (and only pairs holding
#: it in the second). None counts every pick.
TOP: int | None = 1
LR = 1e-4
WEIGHT_DECAY = 0.01
MAX_GRAD_NORM = 1.0
BATCH_QUERIES = 1
ACCUMULATE = 4
#: Four retrieved neighbours and one random negative: GeoRanker's group of five candidates a query.
CANDIDATES = 4
NEGATIVES = 1
CHECKPOINT_EVERY = 100

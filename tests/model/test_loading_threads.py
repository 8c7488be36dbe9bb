"""Loading models from several threads at once (in-process simulated clients do) gives each the
model a load alone gives: the seed's LoRA A and task head, the pretrained weights."""

import threading

import torch

from flexsfl.model.loading import load_model


def test_concurrent_loads_equal_a_load_alone():
    alone = load_model("minilm", num_labels=3, seed=7).model.state_dict()
    got: list = [None] * 4

    def load(i: int) -> None:
        got[i] = load_model("minilm", num_labels=3, seed=7).model.state_dict()

    threads = [threading.Thread(target=load, args=(i,)) for i in range(len(got))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for sd in got:  # before the load lock, each thread drew its LoRA A and head from one interleaved generator
        assert sd.keys() == alone.keys()
        assert not [k for k in alone if not torch.equal(alone[k], sd[k])]

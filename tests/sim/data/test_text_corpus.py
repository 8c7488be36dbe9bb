"""Per-device raw text: VADER domains as clients' corpora, the user's .txt/.jsonl, the instruction format."""

from __future__ import annotations

import json

import numpy as np
import pytest

from flexsfl.core.errors import DataError
from flexsfl.edge_runtime.data import Example, read_examples
from flexsfl.edge_runtime.text import TextEncoder
from flexsfl.sim.data.text_corpus import (
    instruction_text,
    read_text_corpus,
    split_corpus,
    vader_domains,
    write_client_files,
)

# SmolLM2-Instruct's template (ChatML), so the test needs no model download.
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
          "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_vader_domains_are_disjoint_raw_text_clients(tmp_path):
    clients = vader_domains(4, train=30, test=10, seed=0)
    assert [c.name for c in clients] == ["tweets", "movie_reviews", "amazon_reviews", "nyt_editorials"]
    keys = [{" ".join(e.text.lower().split()) for e in c.train + c.test} for c in clients]
    for c, k in zip(clients, keys):
        assert len(c.train) == 30 and len(c.test) == 10 and len(k) == 40
        assert all(e.label == 0 for e in c.train)
    assert all(not (a & b) for i, a in enumerate(keys) for b in keys[i + 1:])
    assert vader_domains(2, train=30, test=10, seed=0) == clients[:2]  # seeded
    paths = write_client_files(clients, tmp_path)
    assert [e.text for e in read_examples(paths["tweets"][1])] == [e.text for e in clients[0].test]
    with pytest.raises(DataError, match="choose 1..4"):
        vader_domains(5)


def test_user_text_and_jsonl_files(tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("first line\n\n  second line  \nthird\n")
    assert read_text_corpus(txt) == ["first line", "second line", "third"]
    jl = tmp_path / "d.jsonl"
    jl.write_text(json.dumps({"text": "a"}) + "\n" + json.dumps({"prompt": "hi?", "response": "hello."}) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:2: an instruction row needs"):
        read_text_corpus(jl)

    class Tok:
        chat_template = None

    assert read_text_corpus(jl, tokenizer=Tok()) == ["a", "hi?\nhello."]
    jl.write_text('{"label": 1}\n')
    with pytest.raises(DataError, match=r"d.jsonl:1: a row needs"):
        read_text_corpus(jl)
    c = split_corpus("notes", ["x y", "X  y", "z", "w", "v"], train=10, test=1)
    assert len(c.test) == 1 and len(c.train) == 3  # the repeat (case and spaces) is dropped


def test_instruction_format_masks_the_prompt_tokens(tiny_model_dirs):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_model_dirs["llama"]))
    tok.chat_template = CHATML
    whole, head = instruction_text(tok, "What is the capital of France?", "Paris.")
    assert whole.startswith(head) and head.endswith("assistant\n") and "Paris." in whole[len(head):]
    encoder = TextEncoder.from_file(tiny_model_dirs["llama"] / "tokenizer.json", max_seq=64, pad_id=0)
    batch = encoder.encode([whole, "short"])  # what the device trains on
    ids, mask = batch.input_ids, batch.attention_mask
    n_prompt = len(tok(head)["input_ids"]) - 1  # the prompt's tokens, less the closing [SEP] the tokenizer adds
    assert ids[0][:n_prompt].tolist() == tok(head)["input_ids"][:n_prompt]
    labels = encoder.lm_labels(batch, [head, ""])
    assert (labels[0, :n_prompt] == -100).all() and (labels[0, n_prompt:] != -100).any()
    assert (labels[1] == np.where(mask[1] == 1, ids[1], -100)).all()


def test_text_dataset_keeps_instruction_prompts_and_groups(tmp_path, tiny_model_dirs):
    import transformers

    from flexsfl.sim.data.text_corpus import text_dataset

    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_model_dirs["llama"]))
    tok.chat_template = CHATML
    jl = tmp_path / "mine.jsonl"
    jl.write_text('{"prompt": "Capital of France?", "response": "Paris.", "group": "geo"}\n'
                  '{"text": "just some text", "group": "misc"}\n')
    ds = text_dataset(jl, tokenizer=tok)
    assert ds.groups == ("geo", "misc") and ds.label_names == ("text",)
    first, second = ds.examples
    assert first.prompt and first.text.startswith(first.prompt) and "Paris." in first.text[len(first.prompt):]
    assert second == Example("just some text", 0)
    half = tmp_path / "half.jsonl"
    half.write_text('{"text": "a", "group": "g"}\n{"text": "b"}\n')
    with pytest.raises(DataError, match="text 2 has no \"group\" but others do"):
        text_dataset(half)
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"prompt": "Q?", "response": " "}\n')
    with pytest.raises(DataError, match="empty.jsonl:1: the response is empty"):
        text_dataset(empty, tokenizer=tok)

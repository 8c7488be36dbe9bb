"""``flexsfl generate``: sample text from a merged personal model (adapter dir or full model) with transformers."""

from __future__ import annotations

import argparse

__all__ = ["add_parser", "run", "generate"]


def generate(model_dir: str, prompt: str, *, max_new_tokens: int = 40, temperature: float = 0.0, seed: int = 0,
             chat: bool = False) -> str:
    """The model's continuation of ``prompt`` (greedy when ``temperature`` is 0; ``chat``: the chat template)."""
    import pathlib

    import torch
    import transformers

    from flexsfl.sim.adapters import load_for_generation

    model = load_for_generation(model_dir)
    d = pathlib.Path(model_dir)
    tok = transformers.AutoTokenizer.from_pretrained(str(d / "merged" if (d / "merged").is_dir() and not
                                                         (d / "tokenizer_config.json").is_file() else d))
    if chat and tok.chat_template:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    else:
        text = prompt
    enc = tok(text, return_tensors="pt")
    enc.pop("token_type_ids", None)  # BERT-style tokenizers (the tiny test models) add them; decoders take none
    torch.manual_seed(seed)
    with torch.no_grad():
        ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                             temperature=temperature if temperature > 0 else None, top_p=None, top_k=None,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def run(args: argparse.Namespace) -> int:
    print(generate(args.model, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   seed=args.seed, chat=args.chat))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="sample text from a personalized causal LM (flexsfl adapters merge --out DIR)")
    p.add_argument("--model", required=True, help="the merged adapter dir, or a full model dir (its merged/)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.set_defaults(func=run)

"""``mlf-prepare-data``: text/jsonl files -> a Megatron indexed dataset, with a subword tokenizer.

    mlf-prepare-data --input a.txt b.jsonl --output-prefix data/my_text_document \\
        --train-tokenizer data/tokenizer.json --vocab-size 8192      # train a BPE offline, then tokenize
    mlf-prepare-data --input more.jsonl --output-prefix data/more --tokenizer-model data/tokenizer.json

Then: ``mlf-pretrain --data-path data/my_text_document --tokenizer-model data/tokenizer.json``.
"""

from __future__ import annotations

import argparse

from megatron_moe_lossfree.errors import LossFreeConfigError
from megatron_moe_lossfree.training import data


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise LossFreeConfigError(f"{message}: see mlf-prepare-data --help")


def main(argv=None) -> None:
    p = _Parser(prog="mlf-prepare-data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="text files (one document each) or .jsonl")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--json-key", default="text")
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer-model", help="an existing tokenizer.json")
    tok.add_argument("--train-tokenizer", metavar="PATH", help="train a byte-level BPE on --input, save here")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--debug", action="store_true")
    args = p.parse_args(argv)
    if args.vocab_size < 258:
        raise LossFreeConfigError(f"--vocab-size ({args.vocab_size}) must be >= 258 (256 bytes + specials)")
    if args.train_tokenizer:
        tokenizer = data.train_tokenizer(args.input, args.vocab_size, args.train_tokenizer)
    else:
        tokenizer = data.Tokenizer(args.tokenizer_model)
    total = data.prepare_indexed_dataset(args.input, tokenizer, args.output_prefix, jsonl_key=args.json_key)
    print(f"wrote {total} tokens to {args.output_prefix}.bin/.idx (vocabulary {tokenizer.vocab_size})")

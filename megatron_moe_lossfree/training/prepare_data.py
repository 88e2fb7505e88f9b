"""``mlf-prepare-data``: text/jsonl files -> a Megatron indexed dataset, with a subword tokenizer.

    mlf-prepare-data --input a.txt b.jsonl --output-prefix data/my_text_document \\
        --train-tokenizer data/tokenizer.json --vocab-size 8192      # train a BPE offline, then tokenize
    mlf-prepare-data --input more.jsonl --output-prefix data/more --tokenizer-model data/tokenizer.json

Then: ``mlf-pretrain --data-path data/my_text_document --tokenizer-model data/tokenizer.json``.

Megatron's ``--split`` (e.g. 98,2,0) gives train, valid and test CONTIGUOUS ranges of documents in the
order they were written. A corpus written file by file in sorted order then validates on its last files
only, which may be nothing like the rest. ``--shuffle-seed S`` writes the documents in a seeded random
order, so each split is a random sample of the corpus; ``--max-doc-chars N`` first cuts every document
into blocks of whole lines of at most N characters, so that a few long documents do not decide a split:

    mlf-prepare-data --input corpus.jsonl --output-prefix data/corpus --train-tokenizer data/tok.json \
        --vocab-size 8192 --max-doc-chars 4096 --shuffle-seed 0
"""

from __future__ import annotations

import argparse

from megatron_moe_lossfree.errors import LossFreeConfigError
from megatron_moe_lossfree.training import data

MIN_VOCAB = 257
"""256 byte symbols + EOD: the byte-level vocabulary ``data.train_tokenizer`` builds at this size."""


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
    p.add_argument("--vocab-size", type=int, default=4096,
                   help=f"BPE vocabulary of --train-tokenizer: at least {MIN_VOCAB} (256 bytes + the end-of-"
                        f"document token; {MIN_VOCAB} is byte-level, no merges, like the small ablation scale)")
    p.add_argument("--shuffle-seed", type=int, default=None,
                   help="write the documents in random.Random(SEED) order (default: input order); see above")
    p.add_argument("--max-doc-chars", type=int, default=None,
                   help="cut each document into blocks of whole lines of at most N characters, before any shuffle")
    p.add_argument("--debug", action="store_true")
    args = p.parse_args(argv)
    if args.vocab_size < MIN_VOCAB:
        raise LossFreeConfigError(f"--vocab-size ({args.vocab_size}) must be >= {MIN_VOCAB} (256 bytes + the "
                                  f"end-of-document token)")
    if args.max_doc_chars is not None and args.max_doc_chars < 1:
        raise LossFreeConfigError(f"--max-doc-chars ({args.max_doc_chars}) must be >= 1: a block length in "
                                  f"characters, e.g. 4096, or leave it unset to keep documents whole")
    docs = data.shuffle_and_cut(data.read_texts(args.input, args.json_key),
                                seed=args.shuffle_seed, max_chars=args.max_doc_chars)
    if args.train_tokenizer:
        tokenizer = data.train_tokenizer(docs, args.vocab_size, args.train_tokenizer)
    else:
        tokenizer = data.Tokenizer(args.tokenizer_model)
    total = data.prepare_indexed_dataset(docs, tokenizer, args.output_prefix)
    print(f"wrote {len(docs)} documents, {total} tokens to {args.output_prefix}.bin/.idx "
          f"(vocabulary {tokenizer.vocab_size})")

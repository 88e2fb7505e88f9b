"""Data: a subword tokenizer, Megatron indexed datasets, and GPTDataset splits through Megatron's builder.

- ``Tokenizer``: a byte-level BPE (HuggingFace ``tokenizers``), trained offline or loaded from a
  ``tokenizer.json``; nothing is downloaded. It exposes what Megatron's dataset stack reads
  (``vocab_size``, ``eod``, ``pad``) plus ``tokenize``/``detokenize``.
- ``read_texts`` (a text file is one document, a jsonl line is one) and ``prepare_indexed_dataset``:
  documents -> ``PREFIX.bin``/``PREFIX.idx`` via Megatron-Core's ``IndexedDatasetBuilder`` (EOD appended).
- ``embedded_corpus_documents``: the default corpus every machine has, the Python standard library's own
  sources and its docs (``pydoc_data``'s topics), cut into blocks of lines and shuffled with a fixed seed so
  that Megatron's contiguous train/valid/test document ranges are random samples of one mixture of code
  and prose (version 2; version 1 kept the files in sorted order, so its validation split was mostly
  prose the training split never held). Prepared once and cached under a key that names the version.
- ``build_gpt_datasets``: train/valid/test GPTDatasets from ``--data-path`` prefixes (Megatron-LM syntax:
  ``PREFIX`` or ``W1 PREFIX1 W2 PREFIX2``) through ``BlendedMegatronDatasetBuilder``.
"""

from __future__ import annotations

import json
import os
import pathlib
import sysconfig
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

from megatron_moe_lossfree.errors import LossFreeConfigError

EOD_TOKEN = "<|endoftext|>"
EMBEDDED_CORPUS_VERSION = "stdlib-v2"
"""Part of the cache key: a corpus built by another version is never read (v1: whole files, sorted)."""
EMBEDDED_BLOCK_CHARS = 2048
"""Version 2 cuts every document into blocks of whole lines of at most this many characters (a longer
line is a block of its own): about 2,700 documents, so a 2% validation split holds about 54 of them."""
EMBEDDED_SHUFFLE_SEED = 0
"""Version 2's document order: ``random.Random(EMBEDDED_SHUFFLE_SEED).shuffle`` of the blocks."""


class Tokenizer:
    """Byte-level BPE tokenizer with the attributes Megatron's GPTDataset reads."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer as HFTokenizer

        if not os.path.isfile(path):
            raise LossFreeConfigError(
                f"--tokenizer-model ({path}) does not exist: give a tokenizer.json file, or build one "
                f"with mlf-prepare-data --train-tokenizer")
        try:
            self._tok = HFTokenizer.from_file(path)
        except Exception as exc:  # the tokenizers library raises bare Exceptions on bad JSON
            raise LossFreeConfigError(
                f"--tokenizer-model ({path}) is not a valid tokenizer.json ({exc}): rebuild it with "
                f"mlf-prepare-data --train-tokenizer") from None
        self.path = path
        eod = self._tok.token_to_id(EOD_TOKEN)
        if eod is None:
            raise LossFreeConfigError(
                f"--tokenizer-model ({path}) has no {EOD_TOKEN} token: add it as a special token")
        self.eod = eod
        self.pad = eod
        # Megatron's dataset cache keys on this (MegatronTokenizerBase has the same attribute).
        self.unique_identifiers = {"class": "megatron_moe_lossfree.Tokenizer", "path": os.path.abspath(path),
                                   "vocab_size": self.vocab_size}

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [enc.ids for enc in self._tok.encode_batch(list(texts))]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids))


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_path: str) -> Tokenizer:
    """Train a byte-level BPE on the documents ``texts`` and write it to ``out_path`` (tokenizer.json).

    256 byte symbols plus the EOD token make the smallest vocabulary, 257 (byte-level, no merges)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOD_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tok.save(out_path)
    return Tokenizer(out_path)


def _read_documents(files: Sequence[str], jsonl_key: str = "text") -> Iterator[tuple[str, str]]:
    """Yield (origin, text): a whole .txt/.py/... file is one document; a .jsonl line is one document."""
    for path in files:
        if not os.path.isfile(path):
            raise LossFreeConfigError(f"--input ({path}) does not exist: give existing text or jsonl files")
        if path.endswith(".jsonl") or path.endswith(".json"):
            with open(path, encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)[jsonl_key]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise LossFreeConfigError(
                            f"--input ({path}) line {lineno} is not a JSON object with a {jsonl_key!r} "
                            f"field: fix the line or pass --json-key") from None
                    yield f"{path}:{lineno}", text
        else:
            yield path, pathlib.Path(path).read_text(encoding="utf-8", errors="replace")


def read_texts(files: Sequence[str], jsonl_key: str = "text") -> list[str]:
    """The documents of ``files`` in order: a whole .txt/.py/... file is one, a .jsonl line is one."""
    return [text for _, text in _read_documents(files, jsonl_key)]


def prepare_indexed_dataset(texts: Sequence[str], tokenizer: Tokenizer, output_prefix: str,
                            batch: int = 256) -> int:
    """Tokenize the documents ``texts``, in their order, into a Megatron indexed dataset at
    ``output_prefix``; returns the token count."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    builder = IndexedDatasetBuilder(output_prefix + ".bin", dtype=dtype)
    total = 0
    docs = list(texts)
    for start in range(0, len(docs), batch):
        for ids in tokenizer.tokenize_batch(docs[start:start + batch]):
            ids = ids + [tokenizer.eod]
            builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
            total += len(ids)
    builder.finalize(output_prefix + ".idx")
    return total


def cut_document(text: str, max_chars: int) -> list[str]:
    """``text`` as consecutive blocks of whole lines, each at most ``max_chars`` long unless one line is
    longer (then that line is a block). Joined, the blocks are ``text`` again."""
    blocks, current, size = [], [], 0
    for line in text.splitlines(keepends=True):
        if current and size + len(line) > max_chars:
            blocks.append("".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line)
    if current:
        blocks.append("".join(current))
    return blocks


def shuffle_and_cut(documents: Sequence[str], *, seed: Optional[int], max_chars: Optional[int]) -> list[str]:
    """``mlf-prepare-data``'s --max-doc-chars then --shuffle-seed: cut each document into blocks of
    whole lines, then shuffle the documents with ``random.Random(seed)`` (None: keep the order)."""
    import random

    docs = [b for d in documents for b in cut_document(d, max_chars)] if max_chars else list(documents)
    if seed is not None:
        random.Random(seed).shuffle(docs)
    return docs


def embedded_corpus_files() -> list[str]:
    """The standard library's top-level sources plus its docs: present on every Python install."""
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = sorted(str(p) for p in stdlib.glob("*.py"))
    topics = stdlib / "pydoc_data" / "topics.py"
    if topics.exists():
        files.append(str(topics))
    return files


def embedded_corpus_documents() -> list[str]:
    """Version 2 of the embedded corpus, in its document order.

    The sources are the standard library's top-level modules (code) and the text of pydoc's topics (the
    language reference's prose, read as the ``topics`` dict rather than as the module that holds it);
    each is cut into blocks of at most ``EMBEDDED_BLOCK_CHARS`` and all blocks are shuffled with
    ``EMBEDDED_SHUFFLE_SEED``. Megatron's split takes contiguous document ranges, so each split is then a
    random sample of the same blocks (tests/unit/test_data.py states the distribution test).
    """
    texts = []
    for path in embedded_corpus_files():
        text = pathlib.Path(path).read_text(encoding="utf-8", errors="replace")
        if path.endswith(os.path.join("pydoc_data", "topics.py")):
            texts += _pydoc_topics(text)
        else:
            texts.append(text)
    return shuffle_and_cut(texts, seed=EMBEDDED_SHUFFLE_SEED, max_chars=EMBEDDED_BLOCK_CHARS)


def _pydoc_topics(source: str) -> list[str]:
    """The topic texts of ``pydoc_data/topics.py`` (a module assigning one dict literal), in key order."""
    import ast

    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "topics":
            topics = ast.literal_eval(node.value)
            return [topics[key] for key in sorted(topics)]
    return [source]


def embedded_dataset(cache_dir: str, vocab_size: int) -> tuple[str, str]:
    """(data prefix, tokenizer path) of the embedded corpus, built once under ``cache_dir``.

    The cache key names the corpus version, block size, seed and vocabulary, so a corpus built otherwise
    is never read. Only global rank 0 builds; the caller holds the others at a barrier.
    """
    key = f"{EMBEDDED_CORPUS_VERSION}-b{EMBEDDED_BLOCK_CHARS}-s{EMBEDDED_SHUFFLE_SEED}-v{vocab_size}"
    root = os.path.join(cache_dir, key)
    tokenizer_path = os.path.join(root, "tokenizer.json")
    prefix = os.path.join(root, "stdlib_text_document")
    if os.path.exists(prefix + ".idx") and os.path.exists(tokenizer_path):
        return prefix, tokenizer_path
    os.makedirs(root, exist_ok=True)
    import fcntl

    # Several jobs on one machine (two ablation streams) may start together: one builds, the others wait.
    with open(os.path.join(root, ".build.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(tokenizer_path):
            docs = embedded_corpus_documents()
            tokenizer = train_tokenizer(docs, vocab_size, tokenizer_path + ".tmp")
            prepare_indexed_dataset(docs, tokenizer, prefix)
            os.replace(tokenizer_path + ".tmp", tokenizer_path)  # last: its presence marks a finished build
    return prefix, tokenizer_path


def parse_data_path(data_path: Sequence[str]) -> tuple[list[str], Optional[list[float]]]:
    """Megatron-LM's ``--data-path`` syntax: ``P`` / ``P1 P2`` / ``W1 P1 W2 P2``; checks the files."""
    items = list(data_path)
    weights: Optional[list[float]] = None
    try:
        float(items[0])
        weighted = True
    except ValueError:
        weighted = False
    if weighted:
        if len(items) % 2:
            raise LossFreeConfigError(
                f"--data-path ({' '.join(items)}) mixes weights and prefixes unevenly: give W1 P1 W2 P2 ...")
        weights = [float(w) for w in items[0::2]]
        items = items[1::2]
    for prefix in items:
        for ext in (".bin", ".idx"):
            if not os.path.isfile(prefix + ext):
                raise LossFreeConfigError(
                    f"--data-path ({prefix}) has no {prefix + ext}: give the prefix of a Megatron indexed "
                    f"dataset (PREFIX.bin + PREFIX.idx), e.g. made by mlf-prepare-data")
    return items, weights


def check_indexed_dataset(prefix: str, vocab_size: int) -> None:
    """Open an indexed dataset and check its tokens fit the tokenizer's vocabulary."""
    from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, IndexedDataset

    with open(prefix + ".idx", "rb") as fh:
        header = fh.read(len(_INDEX_HEADER))
    if header != _INDEX_HEADER:
        # Checked before IndexedDataset: a half-built one prints a traceback from its __del__.
        raise LossFreeConfigError(
            f"--data-path ({prefix}) is not a readable Megatron indexed dataset ({prefix}.idx has no "
            f"Megatron index header): rebuild it with mlf-prepare-data")
    try:
        dataset = IndexedDataset(prefix, mmap=True)
        max_id = max((int(dataset[i].max()) for i in range(min(len(dataset), 64)) if len(dataset[i])),
                     default=-1)
    except Exception as exc:
        raise LossFreeConfigError(
            f"--data-path ({prefix}) is not a readable Megatron indexed dataset ({type(exc).__name__}: "
            f"{exc}): rebuild it with mlf-prepare-data") from None
    if max_id >= vocab_size:
        raise LossFreeConfigError(
            f"--data-path ({prefix}) holds token id {max_id} but the tokenizer's vocabulary has "
            f"{vocab_size} entries: use the tokenizer the dataset was built with (--tokenizer-model)")


def build_gpt_datasets(prefixes: list[str], weights: Optional[list[float]], tokenizer: Tokenizer, *,
                       seq_length: int, seed: int, split: str, num_samples: Sequence[int],
                       cache_dir: Optional[str]) -> tuple:
    """(train, valid, test) GPTDatasets through Megatron-Core's BlendedMegatronDatasetBuilder."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    check_split(prefixes, split)
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=(prefixes, weights), split=split,
        tokenizer=tokenizer, reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        create_attention_mask=False, path_to_cache=cache_dir, mid_level_dataset_surplus=0.005)
    builder = BlendedMegatronDatasetBuilder(GPTDataset, list(num_samples), lambda: True, config)
    return tuple(builder.build())


def check_split(prefixes: list[str], split: str) -> None:
    """Every non-empty split must get at least one document of every dataset (Megatron's GPTDataset
    loops forever on an empty split)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    try:
        weights = [float(x) for x in split.replace("/", ",").split(",")]
    except ValueError:
        weights = []
    if len(weights) != 3 or any(w < 0 for w in weights) or weights[0] <= 0:
        raise LossFreeConfigError(f"--split ({split}) must be three non-negative weights train,valid,test "
                                  f"with train > 0, e.g. 98,2,0")
    for prefix in prefixes:
        num_docs = len(IndexedDataset(prefix, mmap=True))
        for name, w, (lo, hi) in zip(("train", "valid", "test"), weights, split_document_ranges(num_docs, weights)):
            if w > 0 and hi - lo < 1:
                raise LossFreeConfigError(
                    f"--split ({split}) gives the {name} split no document of {prefix} ({num_docs} documents): "
                    f"raise its share or set it to 0")


def split_document_ranges(num_docs: int, weights: Sequence[float]) -> list[tuple[int, int]]:
    """[lo, hi) document ranges of train, valid, test: Megatron's rule (``round`` of the cumulative
    normalised weights times the document count, blended_megatron_dataset_builder)."""
    total, bounds = sum(weights), [0.0]
    for w in weights:
        bounds.append(bounds[-1] + w / total)
    return [(int(round(lo * num_docs)), int(round(hi * num_docs))) for lo, hi in zip(bounds, bounds[1:])]


def iterate_micro_batches(dataset, *, start_step: int, global_batch_size: int, micro_batch_size: int,
                          dp_rank: int, dp_size: int) -> Iterable[dict]:
    """Micro-batches for this DP rank, step after step, from ``start_step`` (resumable by step).

    Step s covers the global samples [s*GB, (s+1)*GB); DP rank r takes a contiguous 1/DP share in
    micro-batches. Each batch carries ``sample_ids`` (global sample indices), used to pick exempt
    sequences identically on every rank.
    """
    per_rank = global_batch_size // dp_size
    step = start_step
    while True:
        base = step * global_batch_size + dp_rank * per_rank
        for first in range(base, base + per_rank, micro_batch_size):
            ids = list(range(first, first + micro_batch_size))
            samples = [dataset[i % len(dataset)] for i in ids]
            batch = {key: torch.stack([torch.as_tensor(s[key]) for s in samples])
                     for key in ("tokens", "labels", "loss_mask", "position_ids")}
            batch["sample_ids"] = torch.tensor(ids, dtype=torch.int64)
            yield batch
        step += 1

"""Data preparation round trip: tokens read back from the indexed dataset equal the tokens written."""

import json
import pathlib

import numpy as np
import pytest

from megatron_moe_lossfree.errors import LossFreeConfigError
from megatron_moe_lossfree.training import data

TEXTS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog. " * 5,
         "import os\nprint(os.getcwd())\n"]


def test_prepare_round_trip(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    txt = tmp_path / "a.txt"
    txt.write_text(TEXTS[0])
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS[1:]) + "\n")
    tok = data.train_tokenizer(data.read_texts([str(txt), str(jsonl)]), 300, str(tmp_path / "tok.json"))
    total = data.prepare_indexed_dataset(data.read_texts([str(txt), str(jsonl)]), tok, str(tmp_path / "ds"))
    expected = [tok.tokenize(t) + [tok.eod] for t in TEXTS]
    ds = IndexedDataset(str(tmp_path / "ds"))
    assert len(ds) == 3
    assert [ds[i].tolist() for i in range(3)] == expected
    assert total == sum(map(len, expected))
    assert ds[0].dtype == np.uint16
    assert tok.detokenize(expected[0][:-1]) == TEXTS[0]


def test_bad_inputs_name_the_flag(tmp_path):
    with pytest.raises(LossFreeConfigError, match=r"^--data-path \(/nope\) has no /nope.bin"):
        data.parse_data_path(["/nope"])
    with pytest.raises(LossFreeConfigError, match=r"^--tokenizer-model \(/nope.json\) does not exist"):
        data.Tokenizer("/nope.json")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": 1}\n')
    with pytest.raises(LossFreeConfigError, match=r"line 1 is not a JSON object with a 'text' field"):
        list(data._read_documents([str(bad)]))
    with pytest.raises(LossFreeConfigError, match=r"^--data-path \(1 a 2\) mixes weights and prefixes unevenly"):
        data.parse_data_path(["1", "a", "2"])


def test_embedded_corpus_exists_everywhere():
    files = data.embedded_corpus_files()
    assert len(files) > 50 and any(f.endswith("topics.py") for f in files)


def test_micro_batches_cover_the_global_batch_once_across_dp_ranks():
    dataset = [{"tokens": np.full(4, i), "labels": np.full(4, i), "loss_mask": np.ones(4),
                "position_ids": np.arange(4)} for i in range(100)]
    seen = []
    for rank in range(2):
        it = data.iterate_micro_batches(dataset, start_step=3, global_batch_size=8, micro_batch_size=2,
                                        dp_rank=rank, dp_size=2)
        for _ in range(2):
            seen += next(it)["sample_ids"].tolist()
    assert sorted(seen) == list(range(24, 32))


def test_micro_batches_are_the_same_global_samples_at_every_data_parallel_size():
    """A step's global batch, and its split into micro-batches, do not depend on the DP size: a run resumed
    at another layout (tests/distributed/test_layout_resume.py) sees the same micro-batches {2j, 2j+1}."""
    dataset = [dict(tokens=[i], labels=[i], loss_mask=[1], position_ids=[0]) for i in range(100)]
    per_dp = {}
    for dp_size in (1, 2, 4):
        micro = []
        for rank in range(dp_size):
            it = data.iterate_micro_batches(dataset, start_step=2, global_batch_size=8, micro_batch_size=2,
                                            dp_rank=rank, dp_size=dp_size)
            micro += [next(it)["sample_ids"].tolist() for _ in range(8 // (2 * dp_size))]
        per_dp[dp_size] = micro
    assert per_dp[1] == per_dp[2] == per_dp[4] == [[16, 17], [18, 19], [20, 21], [22, 23]]


# ----------------------------------------------------------------------------- corpus v2 (issue 26)


def _byte_histogram(docs):
    counts = np.zeros(256)
    for doc in docs:
        counts += np.bincount(np.frombuffer(doc.encode("utf-8", "replace"), dtype=np.uint8), minlength=256)
    return counts / counts.sum()


def _total_variation(a, b):
    return 0.5 * float(np.abs(_byte_histogram(a) - _byte_histogram(b)).sum())


SPLIT_TV_MULTIPLE = 5.0
"""How far the valid split may sit from the train split, in units of the distance between the train
split's two halves. A random sample of a few dozen blocks lies 2-4 such units away by sampling noise alone
(the valid split is 50-200x smaller than a half); corpus v1's sorted files put theirs 7.5-8.2 units away."""


def _split_distance(docs, split):
    (lo, hi), (vlo, vhi), _ = data.split_document_ranges(len(docs), split)
    train, valid = docs[lo:hi], docs[vlo:vhi]
    half = len(train) // 2
    return _total_variation(train, valid), _total_variation(train[:half], train[half:])


@pytest.mark.parametrize("split", [[98, 2, 0], [94, 6, 0]])  # the demo's and the small ablation scale's
def test_embedded_corpus_splits_sample_one_distribution_and_version_1_did_not(split):
    """Byte-histogram total-variation distance, train vs valid, within SPLIT_TV_MULTIPLE of train's two
    halves for corpus v2; the old corpus (whole files in sorted order, pydoc's topics last) fails it."""
    new = data.embedded_corpus_documents()
    tv_valid, tv_halves = _split_distance(new, split)
    assert tv_valid <= SPLIT_TV_MULTIPLE * tv_halves, (tv_valid, tv_halves)
    old = [pathlib.Path(f).read_text(encoding="utf-8", errors="replace") for f in data.embedded_corpus_files()]
    tv_valid, tv_halves = _split_distance(old, split)
    assert tv_valid > SPLIT_TV_MULTIPLE * tv_halves, (tv_valid, tv_halves)


def test_embedded_corpus_v2_is_deterministic_blocks_of_the_sources():
    docs = data.embedded_corpus_documents()
    assert docs == data.embedded_corpus_documents()
    assert len(docs) > 2000 and max(map(len, docs)) <= 20000
    assert sum(len(d) <= data.EMBEDDED_BLOCK_CHARS for d in docs) > 0.99 * len(docs)
    # code and prose are both there: a keyword of each in many blocks
    assert sum("def " in d for d in docs) > 1000 and sum(" the " in d for d in docs) > 1000


def test_embedded_dataset_cache_key_names_the_version(tmp_path, monkeypatch):
    made = []
    monkeypatch.setattr(data, "train_tokenizer", lambda texts, v, path: made.append(path))
    monkeypatch.setattr(data, "prepare_indexed_dataset", lambda *a, **k: 0)
    monkeypatch.setattr(data.os, "replace", lambda a, b: None)
    data.embedded_dataset(str(tmp_path), 257)
    assert pathlib.Path(made[0]).parent.name == "stdlib-v2-b2048-s0-v257"


def test_cut_document_keeps_whole_lines_and_joins_back():
    text = "a\n" * 5 + "x" * 10 + "\nend"
    blocks = data.cut_document(text, 4)
    assert "".join(blocks) == text
    assert blocks == ["a\na\n", "a\na\n", "a\n", "x" * 10 + "\n", "end"]
    docs = data.shuffle_and_cut(["1\n2\n3\n", "4\n"], seed=3, max_chars=2)
    assert sorted(docs) == ["1\n", "2\n", "3\n", "4\n"] and docs == data.shuffle_and_cut(
        ["1\n2\n3\n", "4\n"], seed=3, max_chars=2)
    assert data.shuffle_and_cut(["b", "a"], seed=None, max_chars=None) == ["b", "a"]


def test_prepare_data_cli_shuffles_cuts_and_accepts_the_byte_level_vocabulary(tmp_path, capsys):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_moe_lossfree.training import prepare_data

    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps({"text": f"line {i}\n" * 3}) for i in range(6)) + "\n")
    prefix = str(tmp_path / "ds")
    prepare_data.main(["--input", str(src), "--output-prefix", prefix, "--train-tokenizer",
                       str(tmp_path / "tok.json"), "--vocab-size", "257", "--max-doc-chars", "7",
                       "--shuffle-seed", "1"])
    assert "wrote 18 documents" in capsys.readouterr().out
    tok = data.Tokenizer(str(tmp_path / "tok.json"))
    assert tok.vocab_size == 257
    ds = IndexedDataset(prefix)
    texts = [tok.detokenize(ds[i].tolist()[:-1]) for i in range(len(ds))]
    expected = data.shuffle_and_cut([f"line {i}\n" * 3 for i in range(6)], seed=1, max_chars=7)
    assert texts == expected and texts != sorted(texts, key=lambda t: int(t.split()[1]))
    with pytest.raises(LossFreeConfigError,
                       match=r"^--vocab-size \(256\) must be >= 257 \(256 bytes \+ the end-of-document token\)$"):
        prepare_data.main(["--input", str(src), "--output-prefix", prefix, "--train-tokenizer",
                           str(tmp_path / "t2.json"), "--vocab-size", "256"])
    with pytest.raises(LossFreeConfigError, match=r"^--max-doc-chars \(0\) must be >= 1"):
        prepare_data.main(["--input", str(src), "--output-prefix", prefix, "--tokenizer-model",
                           str(tmp_path / "tok.json"), "--max-doc-chars", "0"])


def test_embedded_dataset_is_built_once_when_jobs_start_together(tmp_path, monkeypatch):
    """Two ablation streams starting at once: one builds under the lock, the other waits and reads it."""
    import threading
    import time

    builds = []

    def fake_train(texts, vocab, path):
        builds.append(path)
        time.sleep(0.3)
        pathlib.Path(path).write_text("{}")

    monkeypatch.setattr(data, "train_tokenizer", fake_train)
    monkeypatch.setattr(data, "prepare_indexed_dataset", lambda *a, **k: 0)
    monkeypatch.setattr(data, "embedded_corpus_documents", lambda: ["x"])
    results = []
    threads = [threading.Thread(target=lambda: results.append(data.embedded_dataset(str(tmp_path), 300)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and len(results) == 2 and results[0] == results[1]
    assert (tmp_path / "stdlib-v2-b2048-s0-v300" / "tokenizer.json").exists()

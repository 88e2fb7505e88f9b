"""Data preparation round trip: tokens read back from the indexed dataset equal the tokens written."""

import json

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
    tok = data.train_tokenizer([str(txt), str(jsonl)], 300, str(tmp_path / "tok.json"))
    total = data.prepare_indexed_dataset([str(txt), str(jsonl)], tok, str(tmp_path / "ds"))
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

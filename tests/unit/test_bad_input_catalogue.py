"""The bad-input catalogue: every case through the real CLI (``mlf-pretrain``), each answered by ONE line
``error: <flag> (<value>) ... : <fix>`` on stderr, exit status 2, no traceback, nothing trained.

Checkpoint cases (another model shape, no expert_bias, truncated, corrupt tracker) need a saved run and
live in tests/integration/test_reliability.py with their exact messages.
"""

import numpy as np
import pytest

from megatron_moe_lossfree.cli import pretrain_main

CASES = {
    # ranges
    "lr warmup >= iters": (["--lr-warmup-iters", "100", "--train-iters", "100"],
                           "--lr-warmup-iters (100) must lie in [0, --train-iters (100)): shorten the warmup or "
                           "train longer"),
    "negative update rate": (["--lossfree-update-rate", "-1"],
                             "--lossfree-update-rate (-1.0) must be >= 0 with bias balancing: use e.g. 1e-3 (the "
                             "paper's value), 0 for a fixed bias, or --lossfree-balancing none"),
    "capacity factor 0": (["--lossfree-drop", "device", "--lossfree-capacity-factor", "0"],
                          "--lossfree-capacity-factor (0.0) must be > 0, e.g. 1.0 (V2) or 1.25"),
    "exempt fraction 1.5": (["--lossfree-exempt-fraction", "1.5"],
                            "--lossfree-exempt-fraction (1.5) must lie in [0, 1], e.g. 0.1 (V2)"),
    "negative aux coeff": (["--lossfree-aux-loss-coeff", "-1"],
                           "--lossfree-aux-loss-coeff (-1.0) must be a finite number >= 0 (0 turns the loss off)"),
    "negative consistency": (["--lossfree-check-consistency", "-1"],
                             "--lossfree-check-consistency (-1) must be >= 0 (0 = off)"),
    "negative eval iters": (["--eval-iters", "-1"], "--eval-iters (-1) must be >= 0 (0 skips evaluation)"),
    "topk > experts": (["--moe-router-topk", "9", "--num-experts", "8"],
                       "--moe-router-topk (9) must be <= --num-experts (8)"),
    "all layers dense": (["--moe-first-dense-layers", "4", "--num-layers", "4"],
                         "--moe-first-dense-layers (4) must lie in [0, --num-layers (4)): at least one layer must "
                         "be MoE"),
    "seq > positions": (["--seq-length", "256", "--max-position-embeddings", "128"],
                        "--seq-length (256) must be <= --max-position-embeddings (128)"),
    # choices
    "unknown rule": (["--lossfree-update-rule", "sgn"],
                     "--lossfree-update-rule ('sgn') is not a valid choice: use one of sign, proportional, "
                     "sign_centered, multiplicative, quantile, smebu, phi, bip"),
    "unknown score function": (["--moe-router-score-function", "relu"],
                               "--moe-router-score-function (relu) must be sigmoid or softmax"),
    "unknown preset": (["--preset", "huge"],
                       "--preset (huge) is unknown: use one of tiny-cpu, paper-1b, paper-3b, v2-router, v3-router"),
    "not an int": (["--num-layers", "three"], "argument --num-layers: invalid int value: 'three': see mlf-pretrain "
                                              "--help"),
    # combinations
    "v3 without token budget": (["--lossfree-rate-schedule", "v3"],
                                "--lossfree-freeze-bias-after-tokens (None) must be a positive token count with "
                                "--lossfree-rate-schedule v3"),
    "multiplicative kind, sign rule": (["--lossfree-bias-kind", "multiplicative"],
                                       "--lossfree-update-rule (sign) and --lossfree-bias-kind (multiplicative) "
                                       "disagree: the multiplicative rule goes with the multiplicative bias kind "
                                       "(LFB Table 4), so set both to multiplicative or neither"),
    "drop without capacity": (["--lossfree-drop", "expert"],
                              "--lossfree-capacity-factor is required with --lossfree-drop expert: give e.g. 1.0"),
    "padding without capacity": (["--lossfree-pad-to-capacity"],
                                 "--lossfree-pad-to-capacity needs a capacity: set --lossfree-drop expert or device "
                                 "and --lossfree-capacity-factor"),
    "two bias owners": (["--megatron-router"],
                        "--megatron-router (Megatron's own router, no plugin bias) and --lossfree-balancing bias "
                        "disagree: add --lossfree-balancing none (and --moe-router-enable-expert-bias for Megatron's bias)"),
    "megatron bias against plugin none": (["--moe-router-enable-expert-bias", "--lossfree-balancing", "none"],
                        "--moe-router-enable-expert-bias (True) and --lossfree-balancing (none) disagree: drop one "
                        "(the plugin's bias then follows --moe-router-enable-expert-bias)"),
    "groups against route limit": (["--moe-router-num-groups", "4", "--moe-router-group-topk", "2",
                                    "--lossfree-route-limit", "node", "--lossfree-route-groups", "4",
                                    "--lossfree-route-max-groups", "2"],
                        "--moe-router-num-groups/--moe-router-group-topk (4/2) and --lossfree-route-limit (node) "
                        "both limit routing: keep one"),
    "megatron capacity against plugin drop": (["--moe-expert-capacity-factor", "1.0", "--lossfree-drop", "expert",
                                               "--lossfree-capacity-factor", "1.0"],
                        "--moe-expert-capacity-factor (1.0) and --lossfree-drop (expert) both drop tokens: keep "
                        "Megatron's expert capacity or the plugin's dropping"),
    "megatron aux against plugin aux": (["--moe-router-load-balancing-type", "aux_loss", "--moe-aux-loss-coeff",
                                         "0.01", "--lossfree-aux-loss-coeff", "0.001"],
                        "--moe-router-load-balancing-type aux_loss with --moe-aux-loss-coeff (0.01) and "
                        "--lossfree-aux-loss-coeff (0.001) are the same loss twice: keep one"),
    "sinkhorn": (["--moe-router-load-balancing-type", "sinkhorn"],
                 "--moe-router-load-balancing-type (sinkhorn) is not supported by the plugin's router: use "
                 "--moe-router-enable-expert-bias or --lossfree-balancing bias (loss-free), or aux_loss"),
    "data without tokenizer": (["--data-path", "/nowhere/x"],
                               "--data-path and --tokenizer-model go together: give both (your dataset and the "
                               "tokenizer it was built with), or neither for the embedded corpus"),
    "TP without SP": (["--tensor-model-parallel-size", "2"],
                      "--tensor-model-parallel-size (2) with MoE needs --sequence-parallel: Megatron-Core requires "
                      "sequence parallelism for MoE under tensor parallelism"),
    # divisibility across TP/EP/PP/experts/groups/batch
    "experts % EP": (["--num-experts", "6", "--expert-model-parallel-size", "4"],
                     "--num-experts (6) must be divisible by --expert-model-parallel-size (4): use an EP size that "
                     "divides 6"),
    "heads % TP": (["--num-attention-heads", "6", "--tensor-model-parallel-size", "4", "--sequence-parallel"],
                   "--num-attention-heads (6) must be divisible by --tensor-model-parallel-size (4)"),
    "layers % PP": (["--num-layers", "3", "--pipeline-model-parallel-size", "2"],
                    "--num-layers (3) must be divisible by --pipeline-model-parallel-size (2)"),
    "batch % micro-batch": (["--global-batch-size", "10", "--micro-batch-size", "4"],
                            "--global-batch-size (10) must be divisible by --micro-batch-size (4) times the "
                            "data-parallel size"),
    "experts % groups": (["--lossfree-route-limit", "node", "--lossfree-route-groups", "3",
                          "--lossfree-route-max-groups", "2"],
                         "--num-experts (16) must be divisible by the node groups (3, from --lossfree-route-groups): "
                         "choose a group count that divides 16"),
    "K % M (node rule)": (["--lossfree-route-limit", "node", "--lossfree-route-groups", "8",
                           "--lossfree-route-max-groups", "3", "--moe-router-topk", "4"],
                          "--moe-router-topk (4) must be divisible by --lossfree-route-max-groups (3) for the node "
                          "rule (node score = sum of the top K/M affinities): pick M dividing 4"),
    "M > devices": (["--lossfree-route-limit", "device", "--lossfree-route-max-groups", "2"],
                    "--lossfree-route-max-groups (2) must be <= the device groups (1, from the EP size "
                    "(--expert-model-parallel-size)): lower M or raise the group count"),
    # TE / FP8 on this CPU machine
    "TE requested": (["--transformer-impl", "transformer_engine"],
                     "--transformer-impl transformer_engine needs a CUDA GPU and Transformer Engine; this machine "
                     "has no CUDA device: drop the flag (the CPU path uses Megatron's local spec)"),
    "FP8 on CPU": (["--transformer-impl", "transformer_engine", "--fp8-format", "e4m3"],
                   "--fp8-format e4m3 needs a CUDA GPU and Transformer Engine; this machine has no CUDA device: "
                   "drop the flag (the CPU path uses Megatron's local spec)"),
}


def run(argv, capsys):
    status = pretrain_main(list(argv) + ["--no-progress", "--eval-iters", "0", "--train-iters", "1"]
                           if "--train-iters" not in argv and "--eval-iters" not in argv else list(argv))
    err = capsys.readouterr().err
    return status, err


@pytest.mark.parametrize("name", list(CASES))
def test_catalogue(name, capsys):
    argv, message = CASES[name]
    status, err = run(argv, capsys)
    assert status == 2
    assert "Traceback" not in err
    assert err == f"error: {message}\n"


def test_catalogue_is_large_enough():
    assert len(CASES) + len(FILE_CASES) >= 25


# Missing or corrupt data files: caught before any model is built.
FILE_CASES = ["missing data files", "corrupt data files", "vocabulary mismatch", "missing tokenizer",
              "corrupt tokenizer"]


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    from megatron_moe_lossfree.training import data

    root = tmp_path_factory.mktemp("catalogue")
    text = root / "t.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 50)
    tok = data.train_tokenizer(data.read_texts([str(text)]), 300, str(root / "tok.json"))
    data.prepare_indexed_dataset(data.read_texts([str(text)]), tok, str(root / "good"))
    (root / "bad.bin").write_bytes(b"\x00" * 10)
    (root / "bad.idx").write_bytes(b"not an index")
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(root / "wide.bin"), dtype=np.int32)
    builder.add_document(torch.tensor([5, 200, 4000, tok.eod]), [4])
    builder.finalize(str(root / "wide.idx"))
    (root / "broken.json").write_text("{ not json")
    return root


@pytest.mark.parametrize("name", FILE_CASES)
def test_file_catalogue(name, data_files, capsys, megatron_world):
    from megatron_moe_lossfree.training.data import Tokenizer

    root = data_files
    tok = str(root / "tok.json")
    argv, message = {
        "missing data files": (["--data-path", str(root / "nope"), "--tokenizer-model", tok],
                               f"--data-path ({root}/nope) has no {root}/nope.bin: give the prefix of a Megatron "
                               f"indexed dataset (PREFIX.bin + PREFIX.idx), e.g. made by mlf-prepare-data"),
        "corrupt data files": (["--data-path", str(root / "bad"), "--tokenizer-model", tok],
                               f"--data-path ({root}/bad) is not a readable Megatron indexed dataset"),
        "vocabulary mismatch": (["--data-path", str(root / "wide"), "--tokenizer-model", tok],
                                f"--data-path ({root}/wide) holds token id 4000 but the tokenizer's vocabulary has "
                                f"{Tokenizer(tok).vocab_size} entries: use the tokenizer the dataset was built with "
                                f"(--tokenizer-model)"),
        "missing tokenizer": (["--data-path", str(root / "good"), "--tokenizer-model", str(root / "none.json")],
                              f"--tokenizer-model ({root}/none.json) does not exist: give a tokenizer.json file, or "
                              f"build one with mlf-prepare-data --train-tokenizer"),
        "corrupt tokenizer": (["--data-path", str(root / "good"), "--tokenizer-model", str(root / "broken.json")],
                              f"--tokenizer-model ({root}/broken.json) is not a valid tokenizer.json"),
    }[name]
    status, err = run(argv, capsys)
    assert status == 2 and "Traceback" not in err and err.count("\n") == 1
    assert err.startswith(f"error: {message}")

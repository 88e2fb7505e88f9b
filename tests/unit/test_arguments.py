"""mlf-pretrain argument parsing and validation: exact one-line messages naming flag, value and fix."""

import pytest

from megatron_moe_lossfree.errors import LossFreeConfigError
from megatron_moe_lossfree.training.arguments import parse_args

CASES = [
    (["--num-experts", "6", "--expert-model-parallel-size", "4"],
     "--num-experts (6) must be divisible by --expert-model-parallel-size (4): use an EP size that divides 6"),
    (["--tensor-model-parallel-size", "2"],
     "--tensor-model-parallel-size (2) with MoE needs --sequence-parallel: Megatron-Core requires sequence "
     "parallelism for MoE under tensor parallelism"),
    (["--global-batch-size", "10", "--micro-batch-size", "4"],
     "--global-batch-size (10) must be divisible by --micro-batch-size (4) times the data-parallel size"),
    (["--moe-router-topk", "9", "--num-experts", "8"], "--moe-router-topk (9) must be <= --num-experts (8)"),
    (["--lossfree-update-rate", "-1"],
     "--lossfree-update-rate (-1.0) must be >= 0 with bias balancing: use e.g. 1e-3 (the paper's value), 0 for "
     "a fixed bias, or --lossfree-balancing none"),
    (["--lossfree-update-rule", "sgn"],
     "--lossfree-update-rule ('sgn') is not a valid choice: use one of sign, proportional, sign_centered, "
     "multiplicative, quantile, smebu, phi, bip"),
    (["--lossfree-rate-schedule", "v3"],
     "--lossfree-freeze-bias-after-tokens (None) must be a positive token count with --lossfree-rate-schedule v3"),
    (["--data-path", "/nonexistent/x"],
     "--data-path and --tokenizer-model go together: give both (your dataset and the tokenizer it was built "
     "with), or neither for the embedded corpus"),
    (["--lr-warmup-iters", "100", "--train-iters", "100"],
     "--lr-warmup-iters (100) must lie in [0, --train-iters (100)): shorten the warmup or train longer"),
    (["--megatron-router"],
     "--megatron-router (Megatron's own router, no plugin bias) and --lossfree-balancing bias disagree: add "
     "--lossfree-balancing none (and --moe-router-enable-expert-bias for Megatron's bias)"),
    (["--preset", "huge"], "--preset (huge) is unknown: use one of tiny-cpu, paper-1b, paper-3b, v2-router, v3-router"),
    (["--lossfree-route-limit", "node", "--lossfree-route-groups", "3", "--lossfree-route-max-groups", "2"],
     "--num-experts (16) must be divisible by the node groups (3, from --lossfree-route-groups): choose a group "
     "count that divides 16"),
    (["--lossfree-route-limit", "node", "--lossfree-route-groups", "4", "--lossfree-route-max-groups", "8",
      "--moe-router-topk", "8"],
     "--lossfree-route-max-groups (8) must be <= the node groups (4, from --lossfree-route-groups): lower M or "
     "raise the group count"),
    (["--lossfree-route-limit", "node", "--lossfree-route-groups", "8", "--lossfree-route-max-groups", "3",
      "--moe-router-topk", "4"],
     "--moe-router-topk (4) must be divisible by --lossfree-route-max-groups (3) for the node rule (node score "
     "= sum of the top K/M affinities): pick M dividing 4"),
    (["--lossfree-route-limit", "device", "--lossfree-route-max-groups", "2"],
     "--lossfree-route-max-groups (2) must be <= the device groups (1, from the EP size "
     "(--expert-model-parallel-size)): lower M or raise the group count"),
    (["--num-layers", "three"], "argument --num-layers: invalid int value: 'three': see mlf-pretrain --help"),
]


@pytest.mark.parametrize("argv,message", CASES, ids=[c[0][0] for c in CASES])
def test_bad_input_gives_exact_message(argv, message):
    with pytest.raises(LossFreeConfigError) as info:
        parse_args(argv)
    assert str(info.value) == message


def test_every_violation_is_reported_at_once():
    with pytest.raises(LossFreeConfigError) as info:
        parse_args(["--num-experts", "6", "--expert-model-parallel-size", "4", "--lossfree-update-rate", "-1"])
    text = str(info.value)
    assert "--num-experts (6)" in text and "--lossfree-update-rate (-1.0)" in text


def test_preset_fills_defaults_and_flags_win():
    args = parse_args(["--preset", "tiny-cpu", "--num-experts", "32"])
    assert args.num_experts == 32            # explicit flag beats the preset
    assert args.moe_router_topk == 2         # from the preset
    assert args.moe_first_dense_layers == 1  # LFB: first FFN dense
    assert args.lossfree.update_rule == "sign"


def test_cli_prints_one_line_without_traceback(capsys):
    from megatron_moe_lossfree.cli import pretrain_main

    assert pretrain_main(["--num-experts", "6", "--expert-model-parallel-size", "4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: --num-experts (6) must be divisible")


def test_megatron_s_forward_flags_reach_the_transformer_config():
    """--moe-router-force-load-balancing, --moe-input-jitter-eps, --moe-enable-routing-replay (both lanes) and
    --moe-router-force-biased (0.19; refused by name on 0.16): Megatron's names, Megatron's fields."""
    from megatron_moe_lossfree.megatron.compat import megatron_core_version
    from megatron_moe_lossfree.training.model import megatron_router_fields

    fields = megatron_router_fields(parse_args(["--moe-router-force-load-balancing", "--moe-input-jitter-eps", "0.1",
                                                "--moe-enable-routing-replay"]))
    assert (fields["moe_router_force_load_balancing"], fields["moe_input_jitter_eps"],
            fields["moe_enable_routing_replay"]) == (True, 0.1, True)
    assert "moe_router_force_biased" not in fields  # not given: 0.16 has no such field
    if megatron_core_version().release >= (0, 19):
        assert megatron_router_fields(parse_args(["--moe-router-force-biased", "0.5"]))["moe_router_force_biased"] == 0.5
    else:
        with pytest.raises(LossFreeConfigError) as info:
            parse_args(["--moe-router-force-biased", "0.5"])
        assert str(info.value) == (f"--moe-router-force-biased (0.5) needs megatron-core >= 0.19 (installed: "
                                   f"{megatron_core_version()}): drop it")


WANDB_CASES = [
    (["--wandb-project", "moe"], "--wandb-project (moe) needs --wandb-exp-name (the run's name, as in Megatron-LM)"),
    (["--wandb-exp-name", "run1"], "--wandb-exp-name (run1) has no effect without --wandb-project: add it"),
    (["--wandb-save-dir", "/tmp/w"], "--wandb-save-dir (/tmp/w) has no effect without --wandb-project: add it"),
]


@pytest.mark.parametrize("argv,message", WANDB_CASES, ids=[c[0][0] for c in WANDB_CASES])
def test_wandb_flags_are_checked(argv, message):
    with pytest.raises(LossFreeConfigError) as info:
        parse_args(argv)
    assert str(info.value) == message


def test_wandb_without_the_package_is_refused_with_the_install_command(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(LossFreeConfigError) as info:
        parse_args(["--wandb-project", "moe", "--wandb-exp-name", "run1"])
    assert str(info.value) == ("--wandb-project (moe) needs the wandb package, which is not installed: "
                               "pip install 'megatron_moe_lossfree[wandb]'")

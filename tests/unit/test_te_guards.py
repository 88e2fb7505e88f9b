"""TE/FP8 on CPU: guard messages, config mapping, and alignment padding that never counts as load."""

import pytest
import torch

from megatron_moe_lossfree.errors import LossFreeConfigError
from megatron_moe_lossfree.megatron.te import check_te_request, fp8_config_fields


@pytest.mark.parametrize("impl,fmt,recipe,have_te,cap,message", [
    ("transformer_engine", None, "delayed", False, None,
     "--transformer-impl transformer_engine needs a CUDA GPU and Transformer Engine; this machine has no CUDA "
     "device: drop the flag (the CPU path uses Megatron's local spec)"),
    ("transformer_engine", "e4m3", "delayed", False, (9, 0),
     "--fp8-format e4m3 needs Transformer Engine, which is not installed: pip install "
     "'megatron_moe_lossfree[te]' on the GPU machine, or drop the flag"),
    ("transformer_engine", "hybrid", "mxfp8", True, (9, 0),
     "--fp8-recipe (mxfp8) needs compute capability 10.0 or newer; this GPU has 9.0: use bf16, or --fp8-recipe "
     "tensorwise on Ada/Hopper"),
    ("local", "e4m3", "delayed", True, (9, 0), "--fp8-format (e4m3) needs --transformer-impl transformer_engine"),
    ("local", "e5m2", "delayed", True, (9, 0), "--fp8-format (e5m2) must be one of e4m3, hybrid"),
    ("local", None, "fast", True, (9, 0), "--fp8-recipe (fast) must be one of delayed, tensorwise, blockwise, mxfp8"),
])
def test_guard_messages(impl, fmt, recipe, have_te, cap, message):
    with pytest.raises(LossFreeConfigError) as info:
        check_te_request(impl, fmt, recipe, have_te=have_te, capability=cap)
    assert str(info.value) == message


def test_capable_gpu_with_te_passes_and_cpu_default_passes():
    check_te_request("transformer_engine", "e4m3", "tensorwise", have_te=True, capability=(9, 0))
    check_te_request("local", None, "delayed", have_te=False, capability=None)


def test_fp8_request_on_this_cpu_machine_fails_from_the_cli_parser():
    from megatron_moe_lossfree.training.arguments import parse_args

    with pytest.raises(LossFreeConfigError, match=r"^--fp8-format e4m3 needs a CUDA GPU and Transformer Engine"):
        parse_args(["--transformer-impl", "transformer_engine", "--fp8-format", "e4m3"])


def test_config_mapping_uses_megatrons_fields():
    assert fp8_config_fields(None, "delayed") == {}
    assert fp8_config_fields("hybrid", "mxfp8") == dict(fp8="hybrid", fp8_recipe="mxfp8",
                                                        moe_router_padding_for_quantization=True)


def test_cpu_import_of_the_package_never_imports_te():
    import sys

    import megatron_moe_lossfree.megatron.te  # noqa: F401
    assert "transformer_engine" not in sys.modules


@pytest.mark.parametrize("align", [16, 32])
def test_alignment_padding_rows_do_not_count_as_load(megatron_world, align):
    """Megatron's dispatcher pads each expert's rows to the FP8 alignment AFTER our router counted."""
    from megatron.core.transformer.moe.moe_utils import pad_routing_map

    from tests.unit.test_router import K, make_router

    router = make_router(megatron_world)
    _, map_TE = router(torch.randn(40, 2, 16))[:2]
    loads = map_TE.sum(0)
    padded = pad_routing_map(map_TE.clone(), align)
    per_expert = padded.sum(0)
    assert bool((per_expert % align == 0).all()) and int(per_expert.sum()) > 80 * K
    assert torch.equal(router.local_tokens_per_expert, loads)  # the unpadded loads
    assert int(router.local_tokens_per_expert.sum()) == 80 * K

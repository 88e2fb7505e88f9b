"""Shared fixtures. Megatron-using unit tests run in one gloo process group of size 1."""

import os
import warnings

import pytest

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
# The fused router's Triton kernels are defined in interpreter mode only if TRITON_INTERPRET is set before
# their module is first imported, which any router test may do: set it for the whole session on a host
# without CUDA (on a GPU the kernels compile for the device).
if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|apex).*")


@pytest.fixture(scope="session")
def megatron_world():
    """A one-rank gloo world with Megatron's model-parallel state (TP = PP = EP = 1) on CPU."""
    import torch.distributed as dist

    from megatron_moe_lossfree.megatron import compat, cpu_runtime
    from megatron_moe_lossfree.training.pretrain import init_distributed

    cpu_runtime.activate()
    init_distributed()
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel()
    compat.seed_model_parallel_rng(1234)
    yield dist


def pytest_report_header(config):
    from importlib.metadata import version

    import torch

    return f"megatron-core {version('megatron-core')}, torch {torch.__version__}"

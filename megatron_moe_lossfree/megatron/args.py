"""``--lossfree-*`` flags: ``add_lossfree_args`` works as Megatron-LM's ``extra_args_provider``.

Megatron-LM: ``pretrain(..., extra_args_provider=add_lossfree_args)``; our ``mlf-pretrain`` uses the
same function, so the flags are spelled identically in both.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing

from megatron_moe_lossfree.config import CHOICES, LossFreeConfig, flag

_HELP_OVERRIDES = {
    "update_rule": "bias update rule (LFB Tables 3-4; sign is the paper's; smebu, phi, bip: the 2025-2026 rules, "
                   "README's rule table)",
    "rate_schedule": "rate schedule: constant (LFB), v3 (freeze after N tokens), primal_dual (u*tau/(tau+t))",
    "rate_decay_steps": "tau of the primal_dual schedule u*tau/(tau+t) (our reading of arXiv 2512.03915)",
    "smebu_kappa": "SMEBU soft-clamp scale kappa in tanh(kappa*v) (Trinity Large: 2)",
    "smebu_momentum": "SMEBU momentum beta (Trinity Large: 0.5)",
    "phi_ema": "phi-Balancing: decay of the EMA of the routing distribution (ours)",
    "bip_iterations": "BIP-based balancing: dual (ADMM) iterations per step (ours)",
    "dump_loads": "mlf-pretrain: write every step's loads to OUT/loads.jsonl, one JSON row per optimizer step: "
                  '{"step": N, "layers": [MoE layer numbers], "loads": [[tokens per expert] per layer]} '
                  "(pre-drop, summed over the ranks)",
}


def _field_type(field: dataclasses.Field):
    hints = typing.get_type_hints(LossFreeConfig)
    hint = hints[field.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union and args:
        hint = args[0]
    if typing.get_origin(hint) is typing.Literal:
        return str
    return hint


def add_lossfree_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add every ``LossFreeConfig`` field as ``--lossfree-<name>``; returns the parser (Megatron-LM style)."""
    group = parser.add_argument_group("lossfree", "aux-loss-free balancing (megatron_moe_lossfree)")
    for field in dataclasses.fields(LossFreeConfig):
        kind = _field_type(field)
        doc = _HELP_OVERRIDES.get(field.name) or field.name.replace("_", " ")
        help_text = f"{doc} (default: {field.default})"
        if kind is bool:
            group.add_argument(flag(field.name), dest=f"lossfree_{field.name}", action="store_true",
                               default=field.default, help=help_text)
            continue
        # Choices are validated by LossFreeConfig.validate() so the error names the fix; argparse's own
        # choices= message would exit with a usage dump instead.
        metavar = "{" + ",".join(CHOICES[field.name]) + "}" if field.name in CHOICES else None
        group.add_argument(flag(field.name), dest=f"lossfree_{field.name}", type=kind, default=field.default,
                           metavar=metavar, help=help_text)
    return parser


def lossfree_config_from_args(args: argparse.Namespace) -> LossFreeConfig:
    """Build (not yet validated against the model) the plugin config from parsed args."""
    values = {}
    for field in dataclasses.fields(LossFreeConfig):
        key = f"lossfree_{field.name}"
        if hasattr(args, key):
            values[field.name] = getattr(args, key)
    return LossFreeConfig(**values).validate()

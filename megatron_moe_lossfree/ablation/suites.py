"""The LFB / DeepSeek ablation suites as data: each suite is a plain function of the scale that returns
its arms, each arm a name plus the ``mlf-pretrain`` flags that make it that arm.

Every flag an arm sets is explicit (balancing, rule, rate, ...), so an arm means the same thing under
every preset. Paper numbers are REFERENCE.md section 8, copied as printed ("PPL / MaxVio_global");
"n/a" where the paper gives none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from megatron_moe_lossfree.errors import LossFreeConfigError

NA = "n/a"


@dataclass(frozen=True)
class Arm:
    """One configuration of a suite: a directory-safe name and the flags that define it."""

    name: str
    flags: tuple[str, ...]
    paper: tuple[str, ...] = ()
    """One cell per ``Suite.paper_columns``: the published value(s), as printed in the paper."""
    versus: Optional[str] = None
    """The arm this one is compared with in the table's last column (None: the suite's baseline)."""
    ranks: int = 1
    """Processes the arm needs (2 for the EP = 2 arms of v2-drop; launched through torchrun)."""


@dataclass(frozen=True)
class Suite:
    name: str
    title: str
    source: str
    baseline: str
    """The arm the others are compared with (unless an arm names its own ``versus``)."""
    paper_columns: tuple[str, ...]
    arms: tuple[Arm, ...]
    metrics: tuple[str, ...] = ("final_ppl", "maxvio_global", "maxvio_batch_tail")
    """Our columns, keys of ``ablation.report.METRICS``."""
    compare: tuple[str, ...] = ("final_ppl", "maxvio_global")
    """Metrics the "vs" column judges (a difference is called only outside the seed spread)."""
    notes: tuple[str, ...] = ()
    ratio: Optional[tuple[str, str, str]] = None
    """(arm A, arm B, the paper's value): a line under the table with MaxVio_global of A / B per seed."""

    def arm(self, name: str) -> Arm:
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise LossFreeConfigError(f"--arms ({name}) is not an arm of suite {self.name}: use one of "
                                  f"{', '.join(a.name for a in self.arms)}")


@dataclass(frozen=True)
class Scale:
    name: str
    preset: str
    flags: tuple[str, ...]
    """Overrides on top of the preset (the tiny model, logging/eval cadence), explicit in every command."""
    seeds: int
    """Default seeds per arm (``--seeds``)."""
    train_iters: int
    lr_warmup_iters: int
    save_interval: int
    lossfree_rate: str
    """u of the "paper's u = 1e-3" arms (lfb-main, lfb-softmax, lfb-batch, v2-drop, v3-seqaux)."""
    micro_batch_sizes: tuple[int, ...]
    """Computation batch sizes of lfb-batch (LFB Fig. 5); each divides the global batch."""
    notes: tuple[str, ...] = ()
    threads: Optional[int] = None
    """OMP_NUM_THREADS of every run (None: the environment's; ``--threads`` overrides). Not part of a run's
    configuration."""
    two_rank_flags: tuple[str, ...] = ()
    """Flags of the arms that run on 2 ranks (v2-drop, EP = 2): each rank holds half the global batch, so
    a micro-batch as large as the global batch must shrink."""


# The tiny scale is the tiny-cpu preset made cheaper for many runs: hidden 64 instead of 128 (about 4x
# faster per step on 2 cores), 200 steps so the bias settles, a table row every 5 steps so the
# "last 10%" MaxVio_batch averages 4 rows.
_TINY_FLAGS = (
    "--num-layers", "4",                                # 3 MoE layers (the first FFN is dense, as in LFB)
    "--hidden-size", "64", "--num-attention-heads", "4",
    "--ffn-hidden-size", "256",                         # the dense layer's FFN
    "--moe-ffn-hidden-size", "64",                      # each routed expert
    "--moe-shared-expert-intermediate-size", "64",      # one shared expert
    "--num-experts", "16", "--moe-router-topk", "2",
    "--seq-length", "128", "--micro-batch-size", "8", "--global-batch-size", "16",
    "--train-iters", "200", "--lr", "2e-3", "--min-lr", "2e-4", "--lr-warmup-iters", "10",
    "--log-interval", "5", "--eval-interval", "50", "--eval-iters", "4",
)

# The small scale (issue 18; evidence in docs/ablations/README.md): tiny-cpu's layout at hidden 64 on a
# byte-level vocabulary, 800 steps so that u = 1e-3 settles. vocab 257 = 256 bytes + EOD: the embedded
# corpus's BPE trained to 257 entries has no merges (the step costs 1.8x less than with vocab 4096 at
# hidden 128, and the same text gives 3.7x more tokens: 800 steps read 0.6 of an epoch).
_SMALL_FLAGS = (
    "--hidden-size", "64", "--ffn-hidden-size", "256",  # 4 layers (3 MoE), 4 heads: tiny-cpu's
    "--moe-ffn-hidden-size", "64", "--moe-shared-expert-intermediate-size", "64",  # 16 experts top-2 + shared
    "--vocab-size", "257",                              # byte-level
    "--micro-batch-size", "32", "--global-batch-size", "32",  # 4,096 tokens per step in one micro-batch
    "--train-iters", "800", "--lr", "2e-3", "--min-lr", "2e-4", "--lr-warmup-iters", "40",
    "--log-interval", "10", "--eval-interval", "80", "--eval-iters", "4",  # an evaluation every 80 steps
    # The final evaluation reads MaxVio_global and the floors: 64 x 4,096 = 262,144 tokens put the random
    # router's floor under 0.01 (issue 26), and a 6% validation split (about 310K tokens of corpus v2) holds
    # them without repeating a sample.
    "--split", "94,6,0", "--final-eval-iters", "64",
    "--lossfree-update-rate", "1e-3",                   # the paper's u (arms that set a rate override it)
)

SCALES: dict[str, Scale] = {
    "tiny": Scale(
        name="tiny", preset="tiny-cpu", flags=_TINY_FLAGS, seeds=3, train_iters=200, lr_warmup_iters=10,
        save_interval=50, lossfree_rate="1e-2", micro_batch_sizes=(2, 4, 8, 16),
        notes=("tiny scale: tiny-cpu preset with hidden 64, 4 layers (3 MoE), 16 experts top-2 plus a shared "
               "expert, seq 128, batch 16 x 128 tokens, 200 steps, embedded corpus; CPU.",
               "tiny scale uses u = 1e-2 where the paper uses u = 1e-3 (lfb-main, lfb-softmax, lfb-batch, qb, "
               "v2-drop, v3-seqaux): in 200 steps a 1e-3 sign update moves a bias by at most 0.2, too little "
               "to undo the early router collapse (the tiny-cpu preset's reason, README). Rate sweeps "
               "(lfb-rate, lfb-rule, lfb-bias-kind) use the paper's rates.")),
    "small": Scale(
        name="small", preset="tiny-cpu", flags=_SMALL_FLAGS, seeds=3, train_iters=800, lr_warmup_iters=40,
        save_interval=100, lossfree_rate="1e-3", micro_batch_sizes=(4, 8, 16, 32), threads=1,
        two_rank_flags=("--micro-batch-size", "16"),
        notes=("small scale: tiny-cpu preset with hidden 64, 4 layers (3 MoE), 16 experts top-2 plus a shared "
               "expert, byte-level vocabulary (257), seq 128, batch 32 x 128 = 4,096 tokens, 800 steps, cosine "
               "lr 2e-3 -> 2e-4, embedded corpus v2 (shuffled blocks, split 94,6,0), final evaluation 64 x 4,096 "
               "tokens; CPU, one thread per run process (--threads).",
               "small scale uses the paper's u = 1e-3 everywhere the paper does.")),
    "paper-1b": Scale(
        name="paper-1b", preset="paper-1b", flags=("--eval-interval", "1000", "--eval-iters", "16"), seeds=1,
        train_iters=40000, lr_warmup_iters=1000, save_interval=1000, lossfree_rate="1e-3",
        micro_batch_sizes=(1, 2, 4, 8),
        notes=("paper-1b: the LFB 1B shape and schedule (paper-1b preset), for a GPU cluster.",)),
    "paper-3b": Scale(
        name="paper-3b", preset="paper-3b", flags=("--eval-interval", "1000", "--eval-iters", "16"), seeds=1,
        train_iters=56514, lr_warmup_iters=2000, save_interval=1000, lossfree_rate="1e-3",
        micro_batch_sizes=(1, 2, 4, 8),
        notes=("paper-3b: the LFB 3B shape and schedule (paper-3b preset), for a GPU cluster.",)),
}


# ----------------------------------------------------------------------------- flag builders


def loss_controlled(alpha: str) -> tuple[str, ...]:
    """LFB Eq. 2 baseline: no bias, expert balance loss with coefficient alpha."""
    return ("--lossfree-balancing", "none", "--lossfree-aux-loss-coeff", alpha)


def loss_free(rule: str, rate: str, bias_kind: Optional[str] = None) -> tuple[str, ...]:
    """LFB Alg. 1: bias balancing with an update rule and rate u, no balance loss."""
    flags = ("--lossfree-balancing", "bias", "--lossfree-update-rule", rule, "--lossfree-update-rate", rate)
    return flags + (("--lossfree-bias-kind", bias_kind) if bias_kind else ())


RATES = ("1e-4", "1e-3", "1e-2")
PPL_MAXVIO = "PPL / MaxVio_global"


# ----------------------------------------------------------------------------- suites


def lfb_main(scale: Scale) -> Suite:
    u = scale.lossfree_rate
    return Suite(
        name="lfb-main", title="LFB Table 2: loss-controlled vs loss-free balancing",
        source="LFB Table 2 (arXiv 2408.15664)", baseline="aux-a1e-3",
        paper_columns=(f"paper 1B: {PPL_MAXVIO}", f"paper 3B: {PPL_MAXVIO}"),
        arms=(Arm("aux-a1e-3", loss_controlled("1e-3"), paper=("9.56 / 0.72", "7.97 / 0.52")),
              Arm(f"bias-sign-u{u}", loss_free("sign", u), paper=("9.50 / 0.04", "7.92 / 0.04"))),
        notes=("paper's loss-free arm: sign rule, u = 1e-3.",),
        ratio=("aux-a1e-3", f"bias-sign-u{u}", "18x at 1B (0.72 / 0.04), 13x at 3B (0.52 / 0.04)"))


def lfb_alpha(scale: Scale) -> Suite:
    paper = {"1e-3": ("9.56 / 0.72",)}
    return Suite(
        name="lfb-alpha", title="LFB section 2: the loss-controlled dilemma (alpha sweep)",
        source="LFB section 2 / Fig. 2 (only alpha 1e-3 has a number in REFERENCE 8: Table 2)",
        baseline="aux-a1e-3", paper_columns=(f"paper 1B: {PPL_MAXVIO}",),
        arms=tuple(Arm(f"aux-a{a}", loss_controlled(a), paper=paper.get(a, (NA,)))
                   for a in ("1e-2", "1e-3", "1e-4", "0")))


def lfb_rate(scale: Scale) -> Suite:
    paper = {"1e-4": "9.51 / n/a", "1e-3": "9.50 / 0.044", "1e-2": "9.51 / n/a"}
    return Suite(
        name="lfb-rate", title="LFB Fig. 4: update rate u of the sign rule",
        source="LFB Fig. 4 (PPL) and Table 3 (MaxVio_global of u 1e-3)", baseline="bias-sign-u1e-3",
        paper_columns=(f"paper 1B: {PPL_MAXVIO}",),
        arms=tuple(Arm(f"bias-sign-u{u}", loss_free("sign", u), paper=(paper[u],)) for u in RATES),
        metrics=("final_ppl", "maxvio_global", "maxvio_batch_tail", "settle_batch", "bias_jitter_tail"),
        notes=("paper: u 1e-4 balances slowly; u 1e-2 oscillates late in training.",))


def lfb_rule(scale: Scale) -> Suite:
    paper = {("sign", "1e-4"): "9.51 / n/a", ("sign", "1e-3"): "9.50 / 0.044", ("sign", "1e-2"): "9.51 / n/a",
             ("proportional", "1e-4"): "9.51 / 0.040", ("proportional", "1e-3"): "9.51 / 0.036",
             ("proportional", "1e-2"): "9.53 / 0.028"}
    return Suite(
        name="lfb-rule", title="LFB Table 3: sign vs proportional update rule",
        source="LFB Table 3 (sign u 1e-4 / 1e-2: PPL from Fig. 4)", baseline="bias-sign-u1e-3",
        paper_columns=(f"paper 1B: {PPL_MAXVIO}",),
        arms=tuple(Arm(f"bias-{short}-u{u}", loss_free(rule, u), paper=(paper[rule, u],))
                   for rule, short in (("sign", "sign"), ("proportional", "prop")) for u in RATES),
        notes=("proportional rule: b += u * (mean - c) / mean (README).",))


def lfb_bias_kind(scale: Scale) -> Suite:
    paper = {"1e-2": "9.52 / 0.041", "1e-3": "9.52 / 0.036", "1e-4": "9.54 / 0.048"}
    arms = [Arm("bias-add-u1e-3", loss_free("sign", "1e-3", "additive"), paper=("9.50 / 0.044",))]
    arms += [Arm(f"bias-mul-u{u}", loss_free("multiplicative", u, "multiplicative"), paper=(paper[u],))
             for u in ("1e-2", "1e-3", "1e-4")]
    return Suite(
        name="lfb-bias-kind", title="LFB Table 4: additive vs multiplicative bias",
        source="LFB Table 4", baseline="bias-add-u1e-3", paper_columns=(f"paper 1B: {PPL_MAXVIO}",),
        arms=tuple(arms),
        notes=("multiplicative: selection on s * b, b starts at 1, b *= 1 + u * sign(mean - c) (README).",))


def lfb_softmax(scale: Scale) -> Suite:
    u, softmax = scale.lossfree_rate, ("--moe-router-score-function", "softmax")
    return Suite(
        name="lfb-softmax", title="LFB Table 6 (appendix C): softmax gate",
        source="LFB Table 6", baseline="softmax-aux-a3e-4", paper_columns=(f"paper 1B: {PPL_MAXVIO}",),
        arms=(Arm("softmax-aux-a3e-4", softmax + loss_controlled("3e-4"), paper=("9.604 / 0.937",)),
              Arm(f"softmax-bias-prop-u{u}", softmax + loss_free("proportional", u), paper=("9.599 / 0.027",))),
        notes=("paper's loss-free arm: proportional rule, u = 1e-3 (the sign rule is hard to tune under "
               "softmax).",))


def lfb_batch(scale: Scale) -> Suite:
    u, arms = scale.lossfree_rate, []
    for mbs in scale.micro_batch_sizes:
        base = f"aux-a1e-3-mbs{mbs}"
        arms.append(Arm(base, loss_controlled("1e-3") + ("--micro-batch-size", str(mbs)), paper=(NA,)))
        arms.append(Arm(f"bias-sign-u{u}-mbs{mbs}", loss_free("sign", u) + ("--micro-batch-size", str(mbs)),
                        paper=(NA,), versus=base))
    return Suite(
        name="lfb-batch", title="LFB Fig. 5: MaxVio vs computation batch size",
        source="LFB section 5.1 / Fig. 5 (a plot; REFERENCE 8 lists no numbers)",
        baseline=arms[0].name, paper_columns=("paper 1B",), arms=tuple(arms),
        metrics=("final_ppl", "maxvio_global", "maxvio_batch_tail", "maxvio_compute_tail"),
        compare=("maxvio_compute_tail",),
        notes=("computation batch = micro-batch size x EP-DP size (1 rank: the micro-batch size); the global "
               "batch and so the training maths stay the same, only the batch MaxVio is counted on changes.",
               "paper's finding: the loss-free arm keeps a lower MaxVio at every computation batch size, the "
               "gap growing with the batch."))


def v2_drop(scale: Scale) -> Suite:
    ep = ("--expert-model-parallel-size", "2") + scale.two_rank_flags
    device = ("--lossfree-drop", "device", "--lossfree-capacity-factor", "1.0")
    arms = (Arm("drop-free", ep + ("--lossfree-drop", "none"), paper=(NA,), ranks=2),
            Arm("device-cf1-exempt0.1", ep + device + ("--lossfree-exempt-fraction", "0.1"), paper=(NA,), ranks=2),
            Arm("device-cf1-exempt0", ep + device + ("--lossfree-exempt-fraction", "0"), paper=(NA,), ranks=2),
            Arm("expert-cf1", ep + ("--lossfree-drop", "expert", "--lossfree-capacity-factor", "1.0"),
                paper=(NA,), ranks=2))
    return Suite(
        name="v2-drop", title="DeepSeek-V2 token dropping: drop-free vs device- and expert-level capacity",
        source="DeepSeek-V2 section 2.2.3 (no ablation numbers published)", baseline="drop-free",
        paper_columns=("paper",), arms=arms,
        metrics=("final_ppl", "maxvio_global", "maxvio_batch_tail", "drop_tail"),
        compare=("final_ppl", "drop_tail"),
        notes=("2 ranks, EP = 2 (device dropping needs EP > 1); balancing is the preset's (bias, sign) so "
               "the arms differ in dropping only; nothing is dropped at evaluation.",))


QUANTILE_FLAGS = ("--lossfree-update-rule", "--lossfree-quantile-estimator", "--lossfree-quantile-ema")
"""The quantile-balancing flags the qb suite needs from mlf-pretrain (REFERENCE 10)."""


def quantile(estimator: str, ema: Optional[str] = None, space: Optional[str] = None) -> tuple[str, ...]:
    """Quantile balancing (REFERENCE 10): the bias solved each step to balance the batch, then centred."""
    flags = ("--lossfree-balancing", "bias", "--lossfree-update-rule", "quantile",
             "--lossfree-quantile-estimator", estimator)
    flags += ("--lossfree-quantile-ema", ema) if ema else ()
    return flags + (("--lossfree-quantile-space", space) if space else ())


def qb(scale: Scale) -> Suite:
    u = scale.lossfree_rate
    return Suite(
        name="qb", title="Quantile balancing (QB) vs the sign step",
        source="Kimi K3 report section 2.3.3 and appendix D; Su, MoE Odyssey 6 (kexue.fm 11619); "
               "Megatron-Core 0.19 quantile_balancing (no published ablation numbers in REFERENCE 10)",
        baseline=f"bias-sign-u{u}", paper_columns=("paper",),
        arms=(Arm(f"bias-sign-u{u}", loss_free("sign", u), paper=(NA,)),
              Arm("qb-exact", quantile("exact"), paper=(NA,)),
              Arm("qb-histogram", quantile("histogram", space="scores"), paper=(NA,)),
              Arm("qb-exact-ema0.9", quantile("exact", ema="0.9"), paper=(NA,)),
              Arm("aux-a1e-3", loss_controlled("1e-3"), paper=(NA,))),
        metrics=("final_ppl", "maxvio_global", "maxvio_batch_tail", "settle_batch", "bias_jitter_tail"),
        compare=("final_ppl", "maxvio_global", "maxvio_batch_tail", "settle_batch"),
        notes=("qb-exact: Megatron-Core 0.19's estimator on router logits, EMA 0 (the bias is replaced each "
               "step); qb-histogram: Kimi K3's estimator on sigmoid scores (1000 bins, margin 1 covers score "
               "space exactly); qb-exact-ema0.9 keeps 90% of the old bias each step.",
               "the exact and EMA arms' bias lives in logit space, the sign and histogram arms' in score "
               "space: compare their bias change within a space only.",
               "the sign arm is lfb-main's loss-free arm and the aux arm lfb-main's baseline (shared runs)."))


def v3_seqaux(scale: Scale) -> Suite:
    u = scale.lossfree_rate
    bias = loss_free("sign", u)
    return Suite(
        name="v3-seqaux", title="DeepSeek-V3: bias alone vs bias + sequence-wise balance loss",
        source="DeepSeek-V3 section 2.1.2 and 4.5.3 (validation loss; the seq-wise arm there has no bias)",
        baseline=f"bias-sign-u{u}", paper_columns=("paper V3 1B: val loss",),
        arms=(Arm(f"bias-sign-u{u}", bias, paper=("2.253 (aux-free)",)),
              Arm(f"bias-sign-u{u}-seqaux1e-4", bias + ("--lossfree-seq-aux-loss-coeff", "1e-4"), paper=(NA,))),
        metrics=("final_loss", "final_ppl", "maxvio_global", "maxvio_batch_tail"),
        compare=("final_loss", "maxvio_global"),
        notes=("V3 4.5.3 compares aux-free 2.253 with a sequence-wise loss alone (2.258), not with bias plus "
               "the loss; V3 itself trains with bias plus alpha = 1e-4.",))


SUITES: dict[str, Callable[[Scale], Suite]] = {
    "lfb-main": lfb_main, "lfb-alpha": lfb_alpha, "lfb-rate": lfb_rate, "lfb-rule": lfb_rule,
    "lfb-bias-kind": lfb_bias_kind, "lfb-softmax": lfb_softmax, "lfb-batch": lfb_batch, "v2-drop": v2_drop,
    "v3-seqaux": v3_seqaux, "qb": qb,
}
ALL = "all"
"""``--suite all``: every suite of SUITES, in this order, sharing runs with identical configurations."""


def get_scale(name: str) -> Scale:
    if name not in SCALES:
        raise LossFreeConfigError(f"--scale ({name}) is unknown: use one of {', '.join(SCALES)}")
    return SCALES[name]


def get_suite(name: str, scale: Scale) -> Suite:
    if name not in SUITES:
        raise LossFreeConfigError(f"--suite ({name}) is unknown: use one of {', '.join(SUITES)}, or {ALL}")
    return SUITES[name](scale)


def get_suites(name: str, scale: Scale) -> list[Suite]:
    """The suites ``--suite NAME`` means: one, or every suite for ``all``."""
    return [build(scale) for build in SUITES.values()] if name == ALL else [get_suite(name, scale)]

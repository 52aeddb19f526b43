"""Parameters of the simulated two-tier routing benchmark (`moa bench routing`), in one place.

Each question has a difficulty d in [0, 1]. A model of skill s answers it correctly with
probability sigmoid(SHARPNESS * (s - d)); a wrong answer is the question's "trap" answer with
probability TRAP_SHARE (so wrong proposers can agree), else a random near miss. An aggregator
(or evolve recombiner) is pulled toward its references: its logit gains REFERENCE_PULL *
(2 * share of correct references - 1), and when wrong it repeats the most common wrong
reference. Token logprobs correlate with correctness only imperfectly: a reply's mean chosen-token
logprob is LOGPROB_RIGHT or LOGPROB_WRONG plus Gaussian noise of LOGPROB_NOISE (per
reply) and TOKEN_NOISE (per token). Prices are per million tokens (input, output).
"""

from __future__ import annotations

SEED = 20260607
QUESTIONS = 400
CALIBRATION_QUESTIONS = 200
"""A separate labelled split on which the calibrated policies are fitted."""
DIFFICULTY_BETA = (1.0, 3.0)
"""Beta(a, b) of the difficulty: most questions easy, a long tail of hard ones."""
SHARPNESS = 9.0
SKILL = {"cheap": 0.42, "strong": 0.82}
TRAP_SHARE = 0.5
REFERENCE_PULL = 0.2
LOGPROB_RIGHT = -0.12
LOGPROB_WRONG = -0.55
LOGPROB_NOISE = 0.14
TOKEN_NOISE = 0.05
PRICES = {"cheap": (0.15, 0.60), "strong": (2.50, 10.00)}
"""The gpt-4o-mini / gpt-4o price ratio, about 1:17."""

PROPOSERS = 3
MAX_TOKENS = 96
THRESHOLDS = {
    "agreement": [0.5, 1.0],
    "min_confidence": [-0.4, -0.3, -0.2],
}
"""Threshold policies swept for the curve: at or above the threshold the aggregation is
skipped (the majority answer stands), below it runs on the strong tier. The loopback server
reports chosen-token logprobs only, so confidence is the chosen-token (not top-k) DeepConf."""
CALIBRATED_STRONG_SHARE = 0.45
"""Share of questions the calibrated policies may send to the strong tier."""
MARGINAL_SWEEP = [0.25, 0.5, 2.0, 4.0]
"""Multiples of the calibrated marginal-utility λ swept for the curve."""
EVOLVE = {"population": 4, "group_size": 2, "loops": 2, "strong_percentile": 25.0}

"""The simulated cheap and strong models of `moa bench routing` (parameters: `routing_sim`).

Replies are deterministic functions of the request body (question, role, references and the
`seed` the routed strategies send per stage), so the reply text and its token logprobs are
computed independently yet agree, and every run of the benchmark is reproducible.
"""

from __future__ import annotations

import json
import math
import random
import re
import zlib
from contextvars import ContextVar
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from moa.bench import routing_sim
from moa.routing.signals import extract_answer
from moa.testing import ModelBehavior

_QUESTION = re.compile(r"Question (\d+):")
_REFERENCE = re.compile(r"^\d+\. (.*)$", re.MULTILINE)
_TOKENS = re.compile(r"\s*\S+")
_MARKERS = ("Responses from models:", "Candidate solutions:")
_LOGPROBS: ContextVar[list[float]] = ContextVar("simulated_logprobs", default=[])  # noqa: B039


@dataclass(frozen=True)
class Question:
    qid: int
    a: int
    b: int
    difficulty: float
    trap: int

    @property
    def answer(self) -> int:
        return self.a + self.b

    @property
    def prompt(self) -> str:
        return f"Question {self.qid}: what is {self.a} + {self.b}? End with 'The answer is N.'"


def make_questions(params: ModuleType = routing_sim) -> list[Question]:
    rng = random.Random(params.SEED)
    out = []
    for qid in range(params.QUESTIONS + params.CALIBRATION_QUESTIONS):
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        difficulty = rng.betavariate(*params.DIFFICULTY_BETA)
        trap = a + b + rng.choice([-100, -10, 10, 100])
        out.append(Question(qid, a, b, difficulty, trap))
    return out


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@dataclass(frozen=True)
class Outcome:
    answer: int
    correct: bool
    mean_logprob: float
    key: int
    aggregate: bool


class SimulatedModels:
    """Reply and logprob functions of the simulated tiers over one question set."""

    def __init__(self, params: ModuleType = routing_sim) -> None:
        self.params = params
        questions = make_questions(params)
        self.all_questions = questions
        self.questions = questions[: params.QUESTIONS]
        self.calibration = questions[params.QUESTIONS :]

    def outcome(self, tier: str, body: dict[str, Any]) -> Outcome:
        messages = body.get("messages") or []
        text = "\n".join(str(m.get("content") or "") for m in messages)
        match = _QUESTION.search(text)
        question = self.all_questions[int(match.group(1))] if match else None
        system = next((str(m.get("content")) for m in messages if m.get("role") == "system"), "")
        refs = _REFERENCE.findall(system) if any(k in system for k in _MARKERS) else []
        # Common random numbers: the draw depends on the question, tier, role and stage seed,
        # not on the references, so policies are compared on the same luck.
        qid = question.qid if question else -1
        key = zlib.crc32(
            json.dumps([self.params.SEED, tier, qid, bool(refs), body.get("seed")]).encode()
        )
        rng = random.Random(key)
        p = self.params
        if question is None:
            return Outcome(0, False, p.LOGPROB_WRONG, key, bool(refs))
        logit = p.SHARPNESS * (p.SKILL[tier] - question.difficulty)
        wrong_refs: list[int] = []
        if refs:
            answers = [extract_answer(r) for r in refs]
            right = sum(a == str(question.answer) for a in answers)
            logit += p.REFERENCE_PULL * (2 * right / len(refs) - 1)
            wrong_refs = [
                int(a)
                for a in answers
                if a and a.lstrip("-").isdigit() and a != str(question.answer)
            ]
        correct = rng.random() < _sigmoid(logit)
        if correct:
            answer = question.answer
        elif wrong_refs:
            answer = max(set(wrong_refs), key=wrong_refs.count)
        elif rng.random() < p.TRAP_SHARE:
            answer = question.trap
        else:
            answer = question.answer + rng.choice([-2, -1, 1, 2, 20, -20])
        mean = (p.LOGPROB_RIGHT if correct else p.LOGPROB_WRONG) + rng.gauss(0, p.LOGPROB_NOISE)
        return Outcome(answer, correct, min(mean, -0.005), key, bool(refs))

    def reply(self, tier: str, body: dict[str, Any]) -> str:
        out = self.outcome(tier, body)
        if out.aggregate:
            lead = "Weighing the earlier answers and rechecking the sum myself, the result holds."
        else:
            lead = "I add the two numbers column by column, carry where needed, and check once."
        return f"{lead} The answer is {out.answer}."

    def token_logprobs(self, tier: str, body: dict[str, Any]) -> list[float]:
        """The chosen-token logprob of every token of the reply."""
        out = self.outcome(tier, body)
        rng = random.Random(out.key ^ 0x5EED)
        noise = self.params.TOKEN_NOISE
        count = len(_TOKENS.findall(self.reply(tier, body)))
        return [min(out.mean_logprob + rng.gauss(0, noise), -0.001) for _ in range(count)]

    def behaviors(self) -> dict[str, ModelBehavior]:
        """Loopback behaviours of the two tiers, named `cheap` and `strong`.

        The server asks for a reply (with the body) and then for each token's logprob (by index
        only) while serving one request in one task, so the reply function leaves that
        request's logprobs in a context variable for the logprob function to read.
        """

        def make(tier: str) -> ModelBehavior:
            def reply(body: dict[str, Any]) -> str:
                _LOGPROBS.set(self.token_logprobs(tier, body))
                return self.reply(tier, body)

            def logprob(index: int) -> float:
                values = _LOGPROBS.get()
                return values[index] if index < len(values) else self.params.LOGPROB_WRONG

            return ModelBehavior(reply=reply, logprob=logprob)

        return {tier: make(tier) for tier in self.params.SKILL}

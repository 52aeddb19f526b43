"""`moa bench routing`: cost and accuracy of routing policies on a simulated two-tier task.

Default backend `sim`: a cheap and a strong simulated model on the loopback server (their
behaviour and the seed live in `moa.bench.routing_sim`). The calibrated policies are fitted on
a separate labelled split (`moa.routing.calibration`), then every policy runs the routed
mixture — three routed proposers and a routed aggregator, through the one executor
(`moa.mixture.Mixture`) — on the test split: always-cheap, always-strong, threshold sweeps,
the calibrated thresholds and marginal utility, random routing at the marginal policy's strong
share, and Squeeze Evolve (routed by the rank rule, and with every group on the strong tier).
`--plot PATH` saves the cost-accuracy curve as a PNG drawn with matplotlib (the `plot`
extra); without it nothing is written.

Backend `local`: the embedded CPU engine (`local/smollm2`) on a few arithmetic questions, one
row per question, to show the signals on real logprobs.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

import anyio

from moa.bench import routing_sim
from moa.bench.routing_model import Question, SimulatedModels
from moa.config import MixtureConfig, from_dict
from moa.errors import ConfigError
from moa.mixture import Mixture
from moa.providers.registry import Registry
from moa.routing.calibration import collect, fit_marginal, fit_threshold
from moa.routing.signals import is_correct

CONCURRENCY = 8
_SHORT = {"agreement": "agree", "min_confidence": "minconf"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=["sim", "local"], default="sim", help="default: sim")
    parser.add_argument(
        "--questions", type=int, metavar="N", help="test questions (sim default: 400)"
    )
    parser.add_argument(
        "--calibration", type=int, metavar="N",
        help="labelled questions the calibrated policies are fitted on (sim default: 200)",
    )
    parser.add_argument(
        "--plot",
        metavar="PATH",
        help="save the cost-accuracy curve as a PNG at PATH (sim backend; needs matplotlib, "
        "the 'plot' extra); nothing is written without it",
    )


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
    if args.backend == "local":
        if args.plot:
            raise ConfigError("--plot draws the sim backend's curve; drop it with --backend local.")
        return asyncio.run(_local(args.questions or 5))
    if args.plot:
        _pyplot()  # fail before the run, not after it
    return asyncio.run(_sim(args.questions, args.calibration, args.plot))


def routed_config(
    cheap: str, strong: str, *, proposers: int, max_tokens: int, **extra: Any
) -> dict[str, Any]:
    """A mixture whose proposers and aggregator are all routed between `cheap` and `strong`."""
    agent = {"model": cheap, "strong": strong, "max_tokens": max_tokens}
    return {
        "layers": [{"agents": [{**agent, "n": proposers}]}],
        "aggregator": {**agent, "temperature": 0.3},
        "mode": "layered",
        **extra,
    }


async def evaluate(
    config: MixtureConfig,
    router: dict[str, Any],
    questions: list[Question],
    registry: Registry,
    *,
    policy: str,
    **overrides: Any,
) -> dict[str, Any]:
    """Run one policy over the questions; one benchmark row."""
    data = {**config.model_dump(exclude_none=True), **overrides}
    router = {**router, "top_logprobs": (config.router.top_logprobs if config.router else 5)}
    cfg = from_dict({**data, "router": router}, registry=registry)
    strong_model = cfg.final.strong
    mixture = Mixture(cfg, registry=registry)
    limiter = anyio.CapacityLimiter(CONCURRENCY)
    correct = calls = strong = 0
    cost = 0.0

    async def one(q: Question) -> None:
        nonlocal correct, calls, strong, cost
        async with limiter:
            result = await mixture.run(q.prompt, seed=q.qid)
        correct += is_correct(result.text, str(q.answer))
        calls += result.calls
        strong += sum(o.calls for o in result.outputs if o.agent.model == strong_model)
        cost += result.cost_usd or 0.0

    async with anyio.create_task_group() as tg:
        for q in questions:
            tg.start_soon(one, q)
    n = len(questions)
    return {
        "policy": policy,
        "accuracy": round(correct / n, 4),
        "cost_usd": round(cost, 6),
        "calls": calls,
        "strong_calls": strong,
    }


async def _sim(
    questions: int | None, calibration: int | None, plot: str | None
) -> tuple[list[dict[str, Any]], list[str]]:
    from moa.testing import LoopbackServer

    p = routing_sim
    sim = SimulatedModels(p)
    test = sim.questions[:questions] if questions else sim.questions
    async with LoopbackServer(sim.behaviors()) as server:
        registry = server.registry("sim")
        config = from_dict(
            routed_config(
                "sim/cheap",
                "sim/strong",
                proposers=p.PROPOSERS,
                max_tokens=p.MAX_TOKENS,
                name="routing-bench",
                router={"policy": "marginal", "top_logprobs": 0},
                prices={f"sim/{tier}": price for tier, price in p.PRICES.items()},
            ),
            registry=registry,
        )
        items = [(q.prompt, str(q.answer)) for q in sim.calibration[:calibration]]
        samples = await collect(config, items, registry=registry, seed=len(sim.questions))
        share = p.CALIBRATED_STRONG_SHARE
        fits = {
            "cal thr agree": fit_threshold(samples, "agreement", strong_share=share),
            "cal thr minconf": fit_threshold(samples, "min_confidence", strong_share=share),
            "cal mu": fit_marginal(samples, strong_share=share),
        }

        async def row(policy: str, router: dict[str, Any], **overrides: Any) -> dict[str, Any]:
            return await evaluate(config, router, test, registry, policy=policy, **overrides)

        rows = [
            await row("always-cheap", {"policy": "fixed", "tier": "cheap"}),
            await row("always-strong", {"policy": "fixed", "tier": "strong"}),
        ]
        curves: dict[str, list[dict[str, Any]]] = {}
        for signal, values in p.THRESHOLDS.items():
            for value in values:
                router = {
                    "policy": "threshold",
                    "signal": signal,
                    "threshold": value,
                    "skip_above": value,
                }
                curves.setdefault(signal, []).append(
                    await row(f"thr {_SHORT[signal]}={value:g}", router)
                )
        for name, fit in fits.items():
            rows.append(await row(name, fit.router))
        marginal = fits["cal mu"].router
        for factor in p.MARGINAL_SWEEP:
            router = {**marginal, "multiplier": marginal["multiplier"] * factor}
            curves.setdefault("marginal", []).append(await row(f"mu lambda x{factor:g}", router))
        mu_row = rows[-1]
        p_strong = mu_row["strong_calls"] / len(test)
        rows.append(
            await row(
                f"random p={p_strong:.2f}",
                {"policy": "random", "p_strong": p_strong, "seed": p.SEED},
            )
        )
        evolve = {
            "strategy": "evolve",
            "evolve": {"group_size": p.EVOLVE["group_size"], "loops": p.EVOLVE["loops"]},
            "layers": [
                {"agents": [{"model": "sim/strong", "n": p.EVOLVE["population"],
                             "max_tokens": p.MAX_TOKENS}]}
            ],
        }
        rank = {"policy": "threshold", "signal": "rank"}
        percentile = p.EVOLVE["strong_percentile"] / 100
        rows.append(await row("evolve", {**rank, "threshold": percentile}, **evolve))
        rows.append(await row("evolve strong", {**rank, "threshold": 1.0}, **evolve))
    rows[2:2] = [r for curve in curves.values() for r in curve]
    for r in rows:
        r["cost_share"] = round(r["cost_usd"] / rows[1]["cost_usd"], 3)
    notes = _notes(rows, fits, len(test), len(items))
    if plot:
        notes.append(f"Cost-accuracy curve saved to {_plot(Path(plot), rows, curves)}.")
    return rows, notes


def _notes(rows: list[dict[str, Any]], fits: dict[str, Any], n_test: int, n_cal: int) -> list[str]:
    by = {r["policy"]: r for r in rows}
    strong = by["always-strong"]
    notes = [
        f"{n_test} test questions; calibrated on {n_cal} other labelled questions (target "
        f"strong share {routing_sim.CALIBRATED_STRONG_SHARE:.0%}); seed {routing_sim.SEED}.",
    ]
    for name in fits:
        r = by[name]
        gap = (r["accuracy"] - strong["accuracy"]) * 100
        met = gap >= -1.0 and r["cost_share"] <= 1 / 3
        notes.append(
            f"{name}: {gap:+.1f} accuracy points vs always-strong at {r['cost_share']:.0%} "
            f"of its cost; target (>= -1 point at <= 33% cost) {'met' if met else 'NOT met'}."
        )
    return notes


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend, or one clear error without it."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError(
            "--plot needs matplotlib: pip install -e '.[plot]' in the checkout."
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot(path: Path, rows: list[dict[str, Any]], curves: dict[str, list[dict[str, Any]]]) -> Path:
    """Each policy as a point, each threshold / multiplier sweep as a line; a legend names them
    (labels next to points would overlap where policies cost the same)."""
    plt = _pyplot()
    curve_rows = {id(r) for curve in curves.values() for r in curve}
    fig, ax = plt.subplots(figsize=(10, 6), dpi=110)
    try:
        for name, curve in curves.items():
            line = sorted(curve, key=lambda r: r["cost_usd"])
            ax.plot([r["cost_usd"] for r in line], [r["accuracy"] for r in line], marker=".",
                    linestyle="--", alpha=0.6, label=f"sweep {name}")
        markers = "osD^vP*Xh"
        for i, r in enumerate(r for r in rows if id(r) not in curve_rows):
            ax.scatter(r["cost_usd"], r["accuracy"], marker=markers[i % len(markers)], s=60,
                       zorder=3, label=r["policy"])
        ax.set(title="moa bench routing", xlabel="total cost (USD)", ylabel="accuracy")
        ax.grid(alpha=0.3)
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return path


LOCAL_QUESTIONS = [
    ("What is 2 + 3? Answer with the number only.", "5"),
    ("What is 10 - 4? Answer with the number only.", "6"),
    ("What is 3 * 3? Answer with the number only.", "9"),
    ("What is 7 + 8? Answer with the number only.", "15"),
    ("What is 12 / 4? Answer with the number only.", "3"),
    ("What is 9 + 10? Answer with the number only.", "19"),
    ("What is 6 * 7? Answer with the number only.", "42"),
    ("What is 100 - 1? Answer with the number only.", "99"),
]


async def _local(count: int) -> tuple[list[dict[str, Any]], list[str]]:
    """Signals on real logprobs from the embedded CPU engine (both tiers the same model)."""
    try:
        import moa.local_engine.llamacpp  # noqa: F401
    except ImportError as err:
        raise ConfigError(
            f"The local backend needs the CPU engine (pip install -e '.[local]' in the "
            f"checkout): {err}."
        ) from None
    config = routed_config(
        "local/smollm2",
        "local/smollm2",
        proposers=3,
        max_tokens=24,
        name="routing-local",
        router={
            "policy": "threshold",
            "signal": "min_confidence",
            "threshold": 1.0,
            "skip_above": 1.0,
        },
    )
    config["layers"][0]["agents"][0]["temperature"] = 0.8
    mixture = Mixture(config)
    rows = []
    try:
        for i, (question, answer) in enumerate(LOCAL_QUESTIONS[:count]):
            result = await mixture.run(question, seed=i)
            aggregate = next(d for d in result.decisions if d.stage.startswith("aggregate"))
            s = aggregate.signals
            rows.append(
                {
                    "policy": f"threshold:min_confidence q{i + 1}",
                    "question": question.split("?")[0] + "?",
                    "majority": s.get("majority"),
                    "agreement": s.get("agreement"),
                    "confidence": s.get("confidence"),
                    "min_confidence": s.get("min_confidence"),
                    "source": s.get("confidence_source"),
                    "choice": aggregate.choice,
                    "accuracy": float(is_correct(result.text, answer)),
                    "cost_usd": result.cost_usd or 0.0,
                    "calls": result.calls,
                }
            )
    finally:
        await mixture.aclose()
    return rows, ["local/smollm2 (SmolLM2-135M, CPU): signals from real top-5 logprobs."]

"""Several syntheses of one set of references (`n`), and the final answer's token logprobs.

Runs on the embedded default engine (the bundled SmolLM2-135M on llama.cpp): no key, no
network. The proposers answer once; the final aggregator samples three syntheses of their
answers (llama.cpp reuses the prompt's KV cache for each), then a second request asks for the
aggregator's logprobs with the two most likely alternatives per token.
"""

import math

import moa

SMALL = {
    "name": "small",
    "layers": [{"agents": [{"model": "local/smollm2", "max_tokens": 40},
                           {"model": "local/smollm2", "max_tokens": 40, "temperature": 0.9}]}],
    "aggregator": {"model": "local/smollm2", "max_tokens": 40, "temperature": 0.8},
}


def main() -> None:
    mixture = moa.Mixture(SMALL)
    question = "Name one reason the sky is blue, in one sentence."
    result = mixture.run_sync(question, n=3, seed=5)
    calls = {o.agent.key: o.calls for o in result.outputs}
    print(f"calls per agent: {calls}")  # each proposer once, the aggregator once for 3 samples
    for choice in result.choices:
        print(f"choice {choice.index} ({choice.finish_reason}): {choice.text.strip()!r}")

    scored = mixture.run_sync(question, logprobs=True, top_logprobs=2, seed=5)
    tokens = scored.choices[0].logprobs or []
    for lp in tokens[:5]:
        others = ", ".join(f"{t!r} {math.exp(v):.0%}" for t, v in lp.top)
        print(f"{lp.token!r:>12} p={math.exp(lp.logprob):.0%}   top: {others}")
    mean = sum(lp.logprob for lp in tokens) / max(len(tokens), 1)
    print(f"{len(tokens)} tokens, mean logprob {mean:.2f}")


if __name__ == "__main__":
    main()

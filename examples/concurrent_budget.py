"""Many mixture requests at once under one shared dollar budget (asyncio).

Ten questions run concurrently through one `Mixture` whose session ledger caps the total
spend; requests that would exceed it are refused before any call, and the spend is reported.
Runs against the loopback test server (simulated models with a price), so it is free.
"""

import anyio

from moa import Mixture, SessionBudget
from moa.errors import MoaError
from moa.testing import LoopbackServer, ModelBehavior

CONFIG = {
    "mode": "layered",
    "layers": [{"agents": [{"model": "loop/cheap-a", "max_tokens": 64},
                           {"model": "loop/cheap-b", "max_tokens": 64}]}],
    "aggregator": {"model": "loop/strong", "max_tokens": 64},
    "prices": {"loop/cheap-a": [0.2, 0.6], "loop/cheap-b": [0.2, 0.6], "loop/strong": [3.0, 15.0]},
}


async def main(registry) -> None:
    session = SessionBudget(usd=0.004)
    mixture = Mixture(CONFIG, registry=registry, session=session)
    answered, refused = [], []

    async def ask(i: int) -> None:
        try:
            result = await mixture.run(f"Question {i}: what is {i} + {i}?")
            answered.append((i, result.cost_usd))
        except MoaError as err:
            refused.append((i, str(err)))

    async with anyio.create_task_group() as tg:
        for i in range(10):
            tg.start_soon(ask, i)
    await mixture.aclose()
    report = session.report()
    print(f"answered {len(answered)}, refused {len(refused)}")
    print(f"spent ${report['spent_usd']:.6f} of ${report['limit_usd']} "
          f"({report['spent_tokens']} tokens)")
    assert report["spent_usd"] <= 0.004
    # The cap binds: some requests were answered within it, the rest refused before any call.
    assert answered and refused and len(answered) + len(refused) == 10
    # A refused request may have paid for its proposers: the ledger holds at least the answers.
    assert report["spent_usd"] >= sum(cost for _, cost in answered) - 1e-12
    if refused:
        print("first refusal:", refused[0][1])


if __name__ == "__main__":
    reply = ModelBehavior(reply="The sum is easy to compute " * 4, tokens_per_s=400)
    with LoopbackServer(default=reply) as srv:
        anyio.run(main, srv.registry())

"""A mixture as the model of an OpenAI Agents SDK agent (`pip install openai-agents`).

`moa serve` speaks both APIs the Agents SDK uses: the Responses API (`OpenAIResponsesModel`,
the SDK's default) and chat completions (`OpenAIChatCompletionsModel`). The agent has one
`@function_tool`; the mixture's acting stage (its final aggregator) calls it, the SDK runs it
and sends the result back, and the mixture answers. Only the acting stage sees the tool.

Offline: a loopback upstream plays the models and `moa serve` runs in this process. With your
own server, point `AsyncOpenAI(base_url=...)` at it and pick a served mixture as the model.
"""

import asyncio

from openai import AsyncOpenAI

from moa.config import MixtureConfig
from moa.openai.server import ServerThread, create_app
from moa.testing import LoopbackServer, ModelBehavior

TEAM = MixtureConfig.model_validate({
    "name": "team",
    "layers": [{"agents": [{"model": "loop/a"}, {"model": "loop/b"}]}],
    "aggregator": {"model": "loop/actor"},
})


def actor(body: dict) -> str:
    """Turn 1: a word before its tool call; turn 2 (after the tool's result): the answer."""
    answered = body["messages"][-1]["role"] == "tool"
    return "It is 18 C and sunny in Paris." if answered else "Let me check."


BEHAVIORS = {
    "a": ModelBehavior(reply="Look the weather up with the tool."),
    "b": ModelBehavior(reply="Call get_weather for Paris."),
    "actor": ModelBehavior(reply=actor,
                           tool_calls=[{"name": "get_weather", "arguments": {"city": "Paris"}}]),
}


async def main(base_url: str) -> None:
    from agents import (
        Agent,
        OpenAIChatCompletionsModel,
        OpenAIResponsesModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )

    set_tracing_disabled(True)  # no trace export: nothing leaves this machine
    calls: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        calls.append(city)
        return f"18 C and sunny in {city}"

    client = AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0)
    models = {
        "responses": OpenAIResponsesModel(model="team", openai_client=client),
        "chat completions": OpenAIChatCompletionsModel(model="team", openai_client=client),
    }
    for api, model in models.items():
        agent = Agent(name="weather", instructions="Answer briefly.", model=model,
                      tools=[get_weather])
        result = await Runner.run(agent, "What is the weather in Paris?")
        print(f"{api}: {result.final_output}")
    # Streamed through the Responses API: the answer's text arrives as deltas.
    agent = Agent(name="weather", model=models["responses"], tools=[get_weather])
    streamed = Runner.run_streamed(agent, "And now?")
    pieces = [event.data.delta async for event in streamed.stream_events()
              if event.type == "raw_response_event"
              and event.data.type == "response.output_text.delta"]
    print(f"responses, streamed ({len(pieces)} text deltas): {streamed.final_output}")
    assert calls == ["Paris"] * 3 and "".join(pieces).endswith(streamed.final_output)
    await client.close()


if __name__ == "__main__":
    try:
        import agents  # noqa: F401
    except ImportError:
        print("This example needs the OpenAI Agents SDK: pip install openai-agents")
        raise SystemExit(0) from None
    with LoopbackServer(BEHAVIORS) as upstream:
        app = create_app({"team": TEAM}, registry=upstream.registry())
        with ServerThread(app) as server:
            asyncio.run(main(server.base_url))
        advice = [r.body or {} for r in upstream.requests if r.model in ("a", "b")]
        assert advice and all("tools" not in body for body in advice)

"""An agent loop through a mixture: the acting model calls a tool, the program runs it and
sends the result back, and the mixture answers.

Runs on the embedded default — the `local` preset, the bundled SmolLM2-135M on llama.cpp — so
it needs no key and no network. Only the final aggregator (the acting stage) gets the tool
schema; the proposers advise in text. On llama.cpp a grammar forces the call's shape, so
`tool_choice="required"` always yields a well-formed call, even from a 135M model.
Point `Mixture(...)` at remote models (docs/tools.md) for answers worth reading.
"""

import json

import moa

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def get_weather(city: str) -> dict[str, object]:
    return {"city": city, "celsius": 18, "sky": "sunny"}


def main() -> None:
    mixture = moa.Mixture("local")
    messages: list[dict] = [{"role": "user", "content": "What is the weather in Paris?"}]
    for turn in range(3):  # an agent's usual cap on tool rounds
        last = turn == 2
        result = mixture.run_sync(
            messages,
            tools=[WEATHER],
            tool_choice="none" if last else "required" if turn == 0 else "auto",
            max_tokens=96,
            seed=7,
        )
        print(f"turn {turn + 1}: {result.finish_reason}, {result.usage.total_tokens} tokens "
              f"over {len(result.outputs)} calls")
        if not result.tool_calls:
            break
        messages.append({"role": "assistant", "content": result.text or None,
                         "tool_calls": [c.as_message_part() for c in result.tool_calls]})
        for call in result.tool_calls:
            output = get_weather(**json.loads(call.arguments))
            print(f"  called {call.name}({call.arguments}) -> {output}")
            messages.append({"role": "tool", "tool_call_id": call.id,
                             "content": json.dumps(output)})
    print("answer:", result.text.strip())
    assert result.text.strip() and not result.tool_calls


if __name__ == "__main__":
    main()

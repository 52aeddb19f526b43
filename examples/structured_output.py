"""Typed answers from a mixture: `response_format` with a JSON schema, and the official SDK's
`chat.completions.parse(response_format=Model)` through the `moa.OpenAI` wrapper.

Runs on the embedded default engine (the bundled SmolLM2-135M on llama.cpp; one proposer and
the aggregator, to keep it quick on a CPU): no key, no network. The acting stage's backend
gets the schema natively (a llama.cpp grammar here), the proposer gets one line saying what
shape the final answer needs, and the answer is validated against the schema before it is
returned.
"""

from pydantic import BaseModel

import moa

SMALL = {
    "name": "small",
    "layers": [{"agents": [{"model": "local/smollm2", "max_tokens": 48}]}],
    "aggregator": {"model": "local/smollm2", "max_tokens": 64, "temperature": 0.3},
}


class City(BaseModel):
    name: str
    country: str
    population_millions: float


def main() -> None:
    messages = [{"role": "user", "content": "Describe Paris as JSON."}]
    schema = {"name": "City", "schema": City.model_json_schema()}
    result = moa.Mixture(SMALL).run_sync(
        messages, response_format={"type": "json_schema", "json_schema": schema}, seed=3
    )
    print("library:", City.model_validate_json(result.text))

    # The wrapper: model "small" runs the mixture in this process, nothing goes upstream.
    with moa.OpenAI(api_key="unused", base_url="http://127.0.0.1:9/v1",
                    mixtures={"small": SMALL}) as client:
        completion = client.chat.completions.parse(
            model="small", messages=messages, response_format=City, seed=3
        )
    city = completion.choices[0].message.parsed
    print("openai parse():", repr(city))
    assert isinstance(city, City)


if __name__ == "__main__":
    main()

"""The shipped exact-answer task set of `moa bench quality`, and the code that wrote it.

160 short questions in four kinds (arithmetic, units, counting facts, multiple choice), 40 of
each, every one with a single number as its answer so that `moa.routing.signals` extracts and
compares it. Arithmetic and unit questions come from a seeded generator; facts and choices are
written here. Each kind is split half and half into `dev` (to choose a configuration on) and
`heldout` (to report it on), stored as `moa/bench/tasks/{dev,heldout}.jsonl` — JSON Lines with
`id`, `kind`, `question` and `answer`, so `moa eval` reads them too.

    python -m moa.bench.taskset     # rewrite the files (a test checks they match)
"""

from __future__ import annotations

import json
import random
from importlib.resources import files
from pathlib import Path
from typing import Any

from moa.errors import ConfigError
from moa.routing.evaluate import Task

SPLITS = ("dev", "heldout")
SEED = 16
NUMBER_ONLY = "Reply with the number only."
OPTION_ONLY = "Reply with the option number only."

_UNITS = [  # (big unit, small unit, small units per big unit)
    ("meters", "centimeters", 100),
    ("kilometers", "meters", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("days", "hours", 24),
    ("weeks", "days", 7),
    ("kilograms", "grams", 1000),
    ("liters", "milliliters", 1000),
    ("years", "months", 12),
    ("dozens", "eggs", 12),
]
_FACTS = [  # (question, answer)
    ("How many legs does a spider have?", 8),
    ("How many legs does a dog have?", 4),
    ("How many legs does an insect have?", 6),
    ("How many days are in a week?", 7),
    ("How many months are in a year?", 12),
    ("How many hours are in a day?", 24),
    ("How many minutes are in an hour?", 60),
    ("How many seconds are in a minute?", 60),
    ("How many days are in a leap year?", 366),
    ("How many days are in a normal year?", 365),
    ("How many sides does a triangle have?", 3),
    ("How many sides does a square have?", 4),
    ("How many sides does a hexagon have?", 6),
    ("How many sides does an octagon have?", 8),
    ("How many sides does a pentagon have?", 5),
    ("How many continents are there on Earth?", 7),
    ("How many planets are in our solar system?", 8),
    ("How many players are on a soccer team on the field?", 11),
    ("How many strings does a standard guitar have?", 6),
    ("How many wheels does a bicycle have?", 2),
    ("How many wheels does a tricycle have?", 3),
    ("How many fingers are on one human hand?", 5),
    ("How many letters are in the English alphabet?", 26),
    ("How many cards are in a standard deck, without jokers?", 52),
    ("How many centimeters are in a meter?", 100),
    ("How many grams are in a kilogram?", 1000),
    ("How many years are in a century?", 100),
    ("How many years are in a decade?", 10),
    ("How many eggs are in a dozen?", 12),
    ("How many colors are in a rainbow?", 7),
    ("How many degrees are in a right angle?", 90),
    ("How many degrees are in a full circle?", 360),
    ("At how many degrees Celsius does water boil at sea level?", 100),
    ("At how many degrees Celsius does water freeze?", 0),
    ("How many hearts does a human have?", 1),
    ("How many eyes does a human have?", 2),
    ("How many days are in the month of January?", 31),
    ("How many days are in the month of April?", 30),
    ("How many squares are on a chess board?", 64),
    ("How many arms does an octopus have?", 8),
]
_CHOICES = [  # (question, options, 1-based number of the right option)
    ("Which of these is a fruit?", ["car", "apple", "chair", "shoe"], 2),
    ("Which of these is an animal?", ["table", "lamp", "horse", "spoon"], 3),
    ("Which of these is a color?", ["blue", "bread", "river", "seven"], 1),
    ("Which of these is a planet?", ["Paris", "Mars", "Nile", "Everest"], 2),
    ("Which of these is a vegetable?", ["carrot", "hammer", "cloud", "shirt"], 1),
    ("Which of these can fly?", ["fish", "stone", "cow", "bird"], 4),
    ("Which of these is a number?", ["cat", "twelve", "green", "happy"], 2),
    ("Which of these is a day of the week?", ["March", "Winter", "Tuesday", "Noon"], 3),
    ("Which of these is a month?", ["Friday", "June", "Autumn", "Morning"], 2),
    ("Which of these is a country?", ["France", "Pacific", "Amazon", "Sahara"], 1),
    ("Which of these is a musical instrument?", ["fork", "violin", "pillow", "brick"], 2),
    ("Which of these is a drink?", ["bread", "rice", "milk", "cheese"], 3),
    ("Which of these is a body part?", ["window", "elbow", "pencil", "garden"], 2),
    ("Which of these is a tool?", ["hammer", "banana", "tiger", "cloud"], 1),
    ("Which of these is hot?", ["ice", "snow", "fire", "frost"], 3),
    ("Which of these is a shape?", ["circle", "dog", "water", "song"], 1),
    ("Which of these is a vehicle?", ["tree", "bus", "apple", "book"], 2),
    ("Which of these lives in water?", ["lion", "eagle", "whale", "camel"], 3),
    ("Which of these is a season?", ["summer", "Monday", "noon", "April"], 1),
    ("Which of these is the largest?", ["ant", "mouse", "cat", "elephant"], 4),
    ("Which of these is the smallest?", ["whale", "horse", "ant", "dog"], 3),
    ("Which of these is a metal?", ["wood", "iron", "glass", "paper"], 2),
    ("Which of these is a language?", ["Spanish", "Tokyo", "Atlantic", "Alps"], 1),
    ("Which of these is a piece of clothing?", ["jacket", "carrot", "table", "river"], 1),
    ("Which of these is a bird?", ["shark", "parrot", "frog", "bee"], 2),
    ("Which of these is a sport?", ["tennis", "piano", "salad", "pencil"], 1),
    ("Which of these is a flower?", ["rose", "rock", "knife", "boat"], 1),
    ("Which of these is cold?", ["sun", "oven", "ice", "candle"], 3),
    ("Which of these is a room in a house?", ["kitchen", "forest", "ocean", "desert"], 1),
    ("Which of these is a meal?", ["breakfast", "umbrella", "pillow", "ladder"], 1),
    ("Which of these is a fish?", ["salmon", "horse", "owl", "goat"], 1),
    ("Which of these is a fruit that is yellow?", ["banana", "grape", "cherry", "plum"], 1),
    ("Which of these is a kind of weather?", ["chair", "rain", "spoon", "door"], 2),
    ("Which of these do you sleep in?", ["bed", "sink", "oven", "car"], 1),
    ("Which of these is a mammal?", ["snake", "dolphin", "shark", "lizard"], 2),
    ("Which of these is used to write?", ["pen", "cup", "shoe", "plate"], 1),
    ("Which of these is a baby cat called?", ["puppy", "kitten", "calf", "cub"], 2),
    ("Which of these is the opposite of up?", ["left", "down", "right", "over"], 2),
    ("Which of these is the opposite of hot?", ["warm", "cold", "big", "fast"], 2),
    ("Which of these gives light at night?", ["moon", "sand", "grass", "salt"], 1),
]


def _arithmetic(rng: random.Random) -> list[tuple[str, int]]:
    items: dict[str, int] = {}
    while len(items) < 40:
        op = len(items) % 3
        if op == 0:
            a, b = rng.randint(2, 49), rng.randint(2, 49)
            items.setdefault(f"What is {a} + {b}?", a + b)
        elif op == 1:
            a = rng.randint(20, 99)
            b = rng.randint(1, a - 1)
            items.setdefault(f"What is {a} - {b}?", a - b)
        else:
            a, b = rng.randint(2, 12), rng.randint(2, 9)
            items.setdefault(f"What is {a} times {b}?", a * b)
    return list(items.items())


def _units(rng: random.Random) -> list[tuple[str, int]]:
    items: dict[str, int] = {}
    while len(items) < 40:
        big, small, factor = _UNITS[len(items) % len(_UNITS)]
        count = rng.randint(2, 9)
        items.setdefault(f"How many {small} are in {count} {big}?", count * factor)
    return list(items.items())


def generate() -> dict[str, list[dict[str, Any]]]:
    """Every item, by split (deterministic: the same seed gives the same files)."""
    rng = random.Random(SEED)
    kinds: dict[str, list[tuple[str, int]]] = {
        "arithmetic": _arithmetic(rng),
        "units": _units(rng),
        "facts": list(_FACTS),
        "choice": [
            (f"{q} " + " ".join(f"{n}) {o}" for n, o in enumerate(opts, 1)), right)
            for q, opts, right in _CHOICES
        ],
    }
    orders = {kind: rng.sample(range(len(items)), len(items)) for kind, items in kinds.items()}
    out: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
    for rank in range(40):  # kinds interleaved, so any prefix of a file mixes them evenly
        for kind, items in kinds.items():
            index = orders[kind][rank]
            question, answer = items[index]
            suffix = OPTION_ONLY if kind == "choice" else NUMBER_ONLY
            out[SPLITS[rank % 2]].append({
                "id": f"{kind}-{index + 1:02d}",
                "kind": kind,
                "question": f"{question} {suffix}",
                "answer": str(answer),
            })
    return out


def path(split: str) -> Path:
    """Where the installed package keeps a split's file."""
    return Path(str(files("moa.bench") / "tasks" / f"{split}.jsonl"))


def load(split: str, *, limit: int | None = None) -> list[tuple[str, Task]]:
    """A split's items as (kind, task) pairs, in file order; `limit` keeps a per-kind prefix."""
    if split not in SPLITS:
        raise ConfigError(f"Unknown split {split!r}; splits: {', '.join(SPLITS)}.")
    items = [json.loads(line) for line in path(split).read_text().splitlines() if line.strip()]
    taken: dict[str, int] = {}
    out = []
    for item in items:
        taken[item["kind"]] = taken.get(item["kind"], 0) + 1
        if limit is None or taken[item["kind"]] <= limit:
            out.append((item["kind"], Task(item["question"], item["answer"])))
    return out


def write() -> None:
    """Rewrite the shipped files from `generate()`."""
    for split, items in generate().items():
        path(split).parent.mkdir(exist_ok=True)
        path(split).write_text("".join(json.dumps(item) + "\n" for item in items))


if __name__ == "__main__":
    write()

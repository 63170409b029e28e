#!/usr/bin/env python3
"""Generate the comparison task (harder than the quickstart's): normalise a person's birth record.

    python scripts/make_hard_task_data.py [--out data/task_hard] [--train 1200] [--heldout 64] [--seed 4321]

Each example is one chat turn in `{"messages": [...]}` jsonl:

    user:      Normalise: Dr. Ada Quinn (born on the 3rd of March, 1987) lives in Lyon.
    assistant: Quinn, Ada | 1987-03-03 | Lyon

Why harder than data/task (which LoRA r=8 saturates at 64/64 within 20 steps): the answer is not a copy of the
sentence. The name is swapped to "Last, First" with titles dropped, and the date, written in five wordings
("March 3rd, 1987", "the 3rd of March, 1987", "3 March 1987", "1987, March 3", ...; never "3/3/1987", which is
ambiguous), becomes ISO 8601: month names map to two-digit numbers, ordinal days to two digits. Every field must
be right for an exact match. The held-out set uses first and last names, cities and years the training set never uses,
and three sentence wordings plus two date wordings reserved for it (one in four held-out examples uses each).

Pure Python and seeded: the same arguments always write byte-identical files.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_task_data import CITIES, FIRST_NAMES, LAST_NAMES, task_data_main

MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
DAYS_IN_MONTH = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]  # no 29 February: no leap-year question
TITLES = ["", "", "", "Dr. ", "Mr. ", "Ms. ", "Prof. "]
INSTRUCTIONS = ["Normalise:", "Normalise this record:", "Make a register line:", "Register entry for:"]


def ordinal(day: int) -> str:
    suffix = "th" if 10 <= day % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


DATE_WORDINGS = [
    lambda d, m, y: f"{MONTHS[m]} {ordinal(d)}, {y}",
    lambda d, m, y: f"the {ordinal(d)} of {MONTHS[m]}, {y}",
    lambda d, m, y: f"{d} {MONTHS[m]} {y}",
    lambda d, m, y: f"{MONTHS[m]} {d}, {y}",
    lambda d, m, y: f"{y}, {MONTHS[m]} {d}",
]
HELDOUT_DATE_WORDINGS = [
    lambda d, m, y: f"{ordinal(d)} {MONTHS[m]} {y}",
    lambda d, m, y: f"{MONTHS[m][:3]}. {d}, {y}",
]
TEMPLATES = [
    "{person} (born on {date}) lives in {city}.",
    "{person} was born on {date} and lives in {city}.",
    "Born {date}, {person} now lives in {city}.",
    "{city} resident {person}, date of birth {date}.",
    "{person} of {city} was born on {date}.",
    "Our records show {person}, born {date}, living in {city}.",
]
HELDOUT_TEMPLATES = [
    "Living in {city} since childhood, {person} gives {date} as the date of birth.",
    "Registered in {city}: {person}, whose birthday is {date}.",
    "Please note that {person} ({city}) was born on {date}.",
]


def make_example(rng: random.Random, pools: dict, templates: list[str], date_wordings: list) -> dict:
    first, last = rng.choice(pools["first"]), rng.choice(pools["last"])
    city, year = rng.choice(pools["city"]), rng.choice(pools["year"])
    month = rng.randrange(12)
    day = rng.randint(1, DAYS_IN_MONTH[month])
    person = f"{rng.choice(TITLES)}{first} {last}"
    date = rng.choice(date_wordings)(day, month, year)
    sentence = rng.choice(templates).format(person=person, date=date, city=city)
    prompt = f"{rng.choice(INSTRUCTIONS)} {sentence[0].upper()}{sentence[1:]}"
    answer = f"{last}, {first} | {year:04d}-{month + 1:02d}-{day:02d} | {city}"
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def make_task(n_train: int, n_heldout: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, heldout): disjoint names, cities and years; held-out also gets wordings training never sees."""
    rng = random.Random(seed)
    years = list(range(1931, 2008))
    train_pools, heldout_pools = {}, {}
    for key, pool in (("first", FIRST_NAMES), ("last", LAST_NAMES), ("city", CITIES), ("year", years)):
        items = sorted(pool)
        rng.shuffle(items)
        cut = round(len(items) * 0.25)
        train_pools[key], heldout_pools[key] = items[cut:], items[:cut]
    train = [make_example(rng, train_pools, TEMPLATES, DATE_WORDINGS) for _ in range(n_train)]
    heldout, seen = [], {ex["messages"][0]["content"] for ex in train}
    while len(heldout) < n_heldout:
        i = len(heldout)
        templates = HELDOUT_TEMPLATES if i % 4 == 1 else TEMPLATES
        wordings = HELDOUT_DATE_WORDINGS if i % 4 == 3 else DATE_WORDINGS
        example = make_example(rng, heldout_pools, templates, wordings)
        if example["messages"][0]["content"] not in seen:
            seen.add(example["messages"][0]["content"])
            heldout.append(example)
    return train, heldout


def main(argv: list[str] | None = None) -> None:
    task_data_main(make_task, __doc__.splitlines()[0], Path("data/task_hard"), 4321, argv)


if __name__ == "__main__":
    main()

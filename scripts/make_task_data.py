#!/usr/bin/env python3
"""Generate the shipped fine-tuning task: person records extracted into one strict `key: value; ...` line.

    python scripts/make_task_data.py [--out data/task] [--train 1200] [--heldout 64] [--test 64] [--seed 1234]

Each example is one chat turn in `{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}` jsonl:

    user:      Extract the record: Meet Ada Quinn, a 41-year-old plumber from Lyon.
    assistant: name: Ada Quinn; age: 41; city: Lyon; job: plumber

Why this task: the base SmolLM2-135M-Instruct cannot guess the keys, their order or the separators, so it scores ~0%
exact match; the skill (copy four fields, whatever order the sentence gives them in, into a fixed line) is learnt by a
LoRA in a few dozen steps. The held-out sets measure generalisation, not memorisation: their first names, last names,
cities and jobs come from pools the training set never uses, and two of the sentence wordings appear only there.

Three files, three roles:
    train.jsonl    what the model trains on
    heldout.jsonl  the validation split: every choice of the main job (learning rate, steps, block size) is made on it
    test.jsonl     the test split: drawn like heldout.jsonl (same pools and wordings, other sentences), and looked at
                   by no choice; the quickstart's reported score. It is drawn after the other two, from the same
                   random stream, so adding it left train.jsonl and heldout.jsonl byte for byte as they were.

Pure Python and seeded: the same arguments always write byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def _words(text: str) -> list[str]:
    return text.split()


FIRST_NAMES = _words(
    "Ada Alan Alice Amir Anna Arjun Astrid Boris Bruno Carla Chen Clara Dario Diego Dmitri Elena Elif Emil Erik Esther "
    "Fatima Felix Freya Gaspar Greta Hana Hugo Ines Ivan Jonas Julia Kai Karim Lars Lea Leon Lucia Luis Maja Marco "
    "Maria Mateo Mina Nadia Nina Noah Olga Omar Oscar Paula Pedro Priya Rafael Rosa Ruth Sami Sara Sofia Tariq Tomas "
    "Uma Vera Viktor Wen Yara Yusuf Zara Zoe Anton Bianca Cyrus Dalia Edgar Flora Goran Helga Idris Jana Kofi Lina"
)
LAST_NAMES = _words(
    "Abbott Alvarez Baker Becker Berg Bianchi Brandt Castro Chandra Costa Dahl Duarte Eriksen Fischer Fontaine Garcia "
    "Greco Hansen Haddad Hoffmann Ibarra Ivanova Jensen Kaur Keller Kim Kowalski Larsen Lindqvist Lopez Marino Meyer "
    "Moreau Nakamura Novak Okafor Olsen Ortiz Park Petrov Quinn Rossi Sato Schmidt Silva Sousa Tanaka Torres Vargas "
    "Weber Wong Yilmaz Zamora Adler Brooks Crane Dunn Ellis Frost Gray Hale Irwin Joyce Knox Lowe Marsh Nash Pike"
)
CITIES = [
    "Lyon",
    "Porto",
    "Oslo",
    "Turin",
    "Leeds",
    "Krakow",
    "Seville",
    "Ghent",
    "Bergen",
    "Graz",
    "Cork",
    "Basel",
    "Tampere",
    "Malmo",
    "Utrecht",
    "Bilbao",
    "Dresden",
    "Nantes",
    "Bologna",
    "Brno",
    "Aarhus",
    "Lille",
    "Galway",
    "Split",
    "Riga",
    "Tallinn",
    "Vilnius",
    "Geneva",
    "Munich",
    "Hamburg",
    "Toronto",
    "Boston",
    "Denver",
    "Austin",
    "Seattle",
    "Osaka",
    "Busan",
    "Perth",
    "Adelaide",
    "Auckland",
    "Santiago",
    "Lima",
    "Quito",
    "Cairo",
    "Tunis",
    "Nairobi",
    "Accra",
    "Dakar",
    "Mumbai",
    "Pune",
    "Hanoi",
    "Manila",
    "Kyoto",
    "Calgary",
    "Halifax",
    "Salzburg",
    "Verona",
    "Cordoba",
    "Valencia",
    "Granada",
    "Zagreb",
    "Ljubljana",
    "Sofia",
    "Bratislava",
    "Dublin",
    "Glasgow",
    "New York",
    "San Diego",
    "Buenos Aires",
    "Cape Town",
    "Rio de Janeiro",
    "Mexico City",
    "Hong Kong",
    "Tel Aviv",
]
JOBS = [
    "baker",
    "plumber",
    "nurse",
    "pilot",
    "teacher",
    "lawyer",
    "farmer",
    "chef",
    "dentist",
    "architect",
    "engineer",
    "librarian",
    "carpenter",
    "painter",
    "journalist",
    "pharmacist",
    "electrician",
    "gardener",
    "translator",
    "photographer",
    "firefighter",
    "mechanic",
    "surgeon",
    "accountant",
    "tailor",
    "butcher",
    "florist",
    "jeweller",
    "sculptor",
    "veterinarian",
    "economist",
    "geologist",
    "optician",
    "barber",
    "welder",
    "beekeeper",
    "potter",
    "cartographer",
    "locksmith",
    "glassblower",
    "midwife",
    "astronomer",
    "bus driver",
    "data analyst",
    "web designer",
    "police officer",
    "flight attendant",
    "social worker",
    "real estate agent",
    "tour guide",
]

INSTRUCTIONS = ["Extract the record:", "Record for this sentence:", "Fill in the record:", "Turn this into a record:"]

# {a_job} is the job with its article ("a baker", "an engineer").
TEMPLATES = [
    "{name} is {a_job} from {city}, aged {age}.",
    "{name}, {age}, works as {a_job} in {city}.",
    "Meet {name}, {a_age}-year-old {job} from {city}.",
    "In {city}, {name} ({age}) earns a living as {a_job}.",
    "{city} is home to {name}, {a_job} who is {age} years old.",
    "Our new {job} is {name}, {age}, who moved here from {city}.",
    "At {age}, {name} is {a_job} based in {city}.",
    "The {job} {name} turned {age} last week in {city}.",
    "Born and raised in {city}, {name} is now {age} and works as {a_job}.",
    "{name} ({job}, {city}) celebrated turning {age} yesterday.",
]
# Wordings the training set never sees: the held-out set mixes them in to test new phrasings too.
HELDOUT_TEMPLATES = [
    "Having worked as {a_job} for years, {name} still lives in {city} at the age of {age}.",
    "Ask anyone in {city} about {name}: the {age}-year-old {job} knows everybody.",
]


def _article(word: str) -> str:
    # Ages like 18, 80-89 ("an eighteen-", "an eighty-") and vowel-initial jobs take "an".
    return "an" if word[0] in "aeiou" or word.startswith(("8", "18", "11")) else "a"


def _split(pool: list[str], rng: random.Random, heldout_fraction: float) -> tuple[list[str], list[str]]:
    """Shuffle a copy of `pool` and cut it: (training part, held-out part), disjoint."""
    items = sorted(pool)
    rng.shuffle(items)
    cut = max(1, round(len(items) * heldout_fraction))
    return items[cut:], items[:cut]


def make_example(rng: random.Random, pools: dict[str, list[str]], templates: list[str]) -> dict:
    name = f"{rng.choice(pools['first'])} {rng.choice(pools['last'])}"
    city, job, age = rng.choice(pools["city"]), rng.choice(pools["job"]), str(rng.randint(18, 89))
    sentence = rng.choice(templates).format(
        name=name, age=age, city=city, job=job, a_job=f"{_article(job)} {job}", a_age=f"{_article(age)} {age}"
    )
    sentence = sentence[0].upper() + sentence[1:]
    prompt = f"{rng.choice(INSTRUCTIONS)} {sentence}"
    # "key: value", not "key=value": after ": " a value is tokenized with its leading space, exactly as in the
    # sentence ("Brno" -> " Br","no" in both), so the model copies tokens; after "=" the same word splits into
    # other pieces ("Br","no" / "mid","wife" vs " midw","ife") and a 135M model misspells rare ones (measured:
    # ~60% held-out exact match with "=" against ~92% with ": " after the same 20 steps).
    answer = f"name: {name}; age: {age}; city: {city}; job: {job}"
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def make_task(n_train: int, n_heldout: int, seed: int, n_test: int = 0) -> tuple[list[dict], ...]:
    """(train, heldout[, test]): disjoint entity pools between training and the held-out sets; held-out and test
    also use wordings the training set never sees. No prompt appears twice across the three."""
    rng = random.Random(seed)
    train_pools, heldout_pools = {}, {}
    for key, pool, fraction in (
        ("first", FIRST_NAMES, 0.25),
        ("last", LAST_NAMES, 0.25),
        ("city", CITIES, 0.25),
        ("job", JOBS, 0.25),
    ):
        train_pools[key], heldout_pools[key] = _split(pool, rng, fraction)
    train = [make_example(rng, train_pools, TEMPLATES) for _ in range(n_train)]
    seen_prompts = {ex["messages"][0]["content"] for ex in train}

    def draw(n: int) -> list[dict]:
        out: list[dict] = []
        while len(out) < n:
            # One in four held-out sentences uses a wording reserved for the held-out sets.
            templates = HELDOUT_TEMPLATES if len(out) % 4 == 3 else TEMPLATES
            example = make_example(rng, heldout_pools, templates)
            if example["messages"][0]["content"] not in seen_prompts:
                seen_prompts.add(example["messages"][0]["content"])
                out.append(example)
        return out

    heldout = draw(n_heldout)
    if not n_test:
        return train, heldout
    return train, heldout, draw(n_test)


def write_jsonl(path: Path, examples: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for example in examples:
            f.write(json.dumps(example, ensure_ascii=False) + "\n")


def task_data_main(
    make, description: str, out: Path, seed: int, argv: list[str] | None = None, test: int | None = None
) -> None:
    """The command line of both task generators: `make(n_train, n_heldout, seed[, n_test])` -> OUT/train.jsonl,
    OUT/heldout.jsonl and, where `test` (the default size of the test split) is given, OUT/test.jsonl."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=out, help="folder for the .jsonl files")
    parser.add_argument("--train", type=int, default=1200, help="number of training examples")
    parser.add_argument("--heldout", type=int, default=64, help="number of held-out (validation) examples")
    if test is not None:
        parser.add_argument("--test", type=int, default=test, help="number of test examples")
    parser.add_argument("--seed", type=int, default=seed)
    args = parser.parse_args(argv)
    if test is None:
        splits = dict(zip(("train", "heldout"), make(args.train, args.heldout, args.seed), strict=True))
    else:
        splits = dict(
            zip(("train", "heldout", "test"), make(args.train, args.heldout, args.seed, args.test), strict=True)
        )
    for name, examples in splits.items():
        write_jsonl(args.out / f"{name}.jsonl", examples)
    print(f"wrote {', '.join(f'{len(v)} {k}' for k, v in splits.items())} examples to {args.out}")


def main(argv: list[str] | None = None) -> None:
    task_data_main(make_task, __doc__.splitlines()[0], Path("data/task"), 1234, argv, test=64)


if __name__ == "__main__":
    main()

"""Task suites with ground truth, the scripted expert, the answer checker.

Groups mirror ToolBench's G1/G2/G3: (1) one relevant tool; (2) 2–3 chained calls where later arguments come from
earlier results; (3) 3–5 calls across categories (finance + math, knowledge + weather + math, geography + math).
Thirteen task types, three query templates (phrasings) each; a task is (type, entities, template) in a world.
`make_suite(name)` gives one interface over two suites: .environment(faults), .tasks(split, n, seed), .fingerprint().

"tiny" (make_tasks, the default, for the from-scratch model): one small world; the (entities, template) pairs are
partitioned between train / val / test by a hash, so no (entity, template) pair is shared across splits. For the
two-entity types (G3: a company and a currency; two countries) the entity *pair* is partitioned whatever the
template, so those test tasks are compositions never seen in training. A single entity does appear in training
under another phrasing or in another task type: the world is small enough for a tiny model trained from scratch in
minutes (see README, "Design of the benchmark"). Tasks are drawn with replacement; "sft" = "train". Each task shows
its relevant tools plus two distractors.

"large" (LargeSuite, for a pretrained model that copies names): one world per split (sft, train, val, test) with
globally unique names, so splits are entity-disjoint down to every entity a reference chain touches; the APIs answer
from the union. val (150) and test (540) are fixed lists of unique tasks, a third per group; sft and train are drawn
with replacement from their own worlds. Every task shows all 14 tools in one fixed order.

Every task records, when it is built, what judging and rewarding need without an environment: its entities, the
values its reference chain takes and returns (the real tools' responses), and the argument values its type fixes.

The judge, check_answer, is tools/judge.py: an answer is Solved only when it commits to every fact.

Deterministic; tens of thousands of tasks per second; the large suite builds in milliseconds.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import json
import random
from dataclasses import asdict, dataclass

from .actions import format_action, parse_action
from .apis import SCHEMAS, Environment, FaultConfig, calculate, convert, implementations
from .world import WORLD, WORLD_SEED, World

SOLVED, UNSURE, UNSOLVED = 1.0, 0.5, 0.0


@dataclass
class Task:
    id: str
    group: int
    split: str
    query: str
    tools: list                    # tools shown to the model: relevant + distractors, shuffled
    answer: str                    # the expert's final answer (display)
    facts: list                    # what a correct answer must contain: numbers or strings; [] = cannot judge
    relevant_tools: list
    reference_chain: list          # [(tool, args)] with the ground-truth arguments
    kind: str = ""
    # Recorded by build_task, so that judging and rewarding need no environment (hand-built and ToolBench tasks
    # keep the empty defaults: no chain to record):
    entities: tuple = ()           # the entity tuple the task is about; statistics cluster tasks by (kind, entities)
    chain_values: tuple = ()       # every leaf the reference chain takes (arguments) or returns (the real tools'
    #                                responses, no faults): the values an answer may mention besides the facts
    constants: tuple = ()          # argument values the task type fixes whatever its entities (base "USD" of
    #                                get_exchange_rate, "C"/"F" of convert_units): no call learns them


# ----------------------------------------------------------------------------------------------------------------------
# Task types: name -> (group, entity pool, builder). A builder returns (query templates, chain, facts, answer).

def _weather(world, city):
    c = world.cities[city]
    return (["What is the temperature in {0} right now?", "How warm is it in {0}?", "Tell me the current temperature in {0}."],
            [("get_weather", {"city": city})], [c.temp_c], f"It is {c.temp_c} C in {city}.", (city,))


def _city_pop(world, city):
    c = world.cities[city]
    return (["What is the population of {0}?", "How many people live in {0}?", "Give me the number of inhabitants of {0}."],
            [("get_city", {"city": city})], [c.population], f"{city} has {c.population} inhabitants.", (city,))


def _capital(world, country):
    c = world.countries[country]
    return (["What is the capital of {0}?", "Which city is the capital of {0}?", "Name the capital city of {0}."],
            [("get_country", {"country": country})], [c.capital], f"The capital of {country} is {c.capital}.", (country,))


def _film_year(world, title):
    f = world.films[title]
    return (["In which year was the film {0} released?", "When did {0} come out?", "What year is the film {0} from?"],
            [("search_film", {"title": title})], [f.year], f"{title} was released in {f.year}.", (title,))


def _stock(world, ticker):
    c = world.tickers[ticker]
    return (["What is the stock price of {0}?", "How much does one {0} share cost?", "Quote the share price of {0}."],
            [("get_stock_quote", {"ticker": ticker})], [c.price_usd], f"{ticker} trades at {c.price_usd} USD.", (ticker,))


def _capital_weather(world, country):
    c = world.countries[country]
    t = world.cities[c.capital].temp_c
    return (["What is the temperature in the capital of {0}?", "How warm is it in the capital city of {0}?",
             "Tell me the current temperature in the capital of {0}."],
            [("get_country", {"country": country}), ("get_weather", {"city": c.capital})], [t, c.capital],
            f"It is {t} C in {c.capital}, the capital of {country}.", (country,))


def _city_currency(world, city):
    country = world.cities[city].country
    code = world.countries[country].currency
    return (["Which currency is used in {0}?", "What money do people pay with in {0}?", "Name the currency of the country of {0}."],
            [("get_city", {"city": city}), ("get_country", {"country": country})], [code],
            f"{city} is in {country}, whose currency is {code}.", (city,))


def _director_birthplace(world, title):
    d = world.films[title].director
    city = world.people[d].born_city
    return (["Where was the director of {0} born?", "In which city was the director of the film {0} born?",
             "Name the birth city of the director of {0}."],
            [("search_film", {"title": title}), ("search_person", {"name": d})], [d, city],
            f"{d}, the director of {title}, was born in {city}.", (title,))


def _company_price(world, name):
    c = world.companies[name]
    return (["What is the stock price of {0}?", "How much does one share of {0} cost?", "Quote the share price of {0}."],
            [("search_company", {"name": name}), ("get_stock_quote", {"ticker": c.ticker})], [c.price_usd],
            f"{name} ({c.ticker}) trades at {c.price_usd} USD.", (name,))


def _ceo_birth_year(world, name):
    c = world.companies[name]
    year = world.people[c.ceo].birth_year
    return (["In which year was the CEO of {0} born?", "When was the chief executive of {0} born?",
             "What is the birth year of the CEO of {0}?"],
            [("search_company", {"name": name}), ("search_person", {"name": c.ceo})], [year],
            f"{c.ceo}, the CEO of {name}, was born in {year}.", (name,))


def _company_price_local(world, name, code):
    c = world.companies[name]
    rate = round(world.currencies[code] / world.currencies["USD"], 4)
    expression = f"{c.price_usd} * {rate}"
    value = round(calculate(expression), 2)
    return (["What does one share of {0} cost in {1}?", "Give the price of a {0} share in {1}.",
             "How much is one {0} share worth in {1}?"],
            [("search_company", {"name": name}), ("get_stock_quote", {"ticker": c.ticker}),
             ("get_exchange_rate", {"base": "USD", "target": code}), ("calculator", {"expression": expression})],
            [value], f"One share of {name} costs {value} {code}.", (name, code))


def _director_weather_f(world, title):
    d = world.films[title].director
    city = world.people[d].born_city
    t = world.cities[city].temp_c
    f = convert(t, "C", "F")
    return (["What is the temperature in Fahrenheit in the birth city of the director of {0}?",
             "How warm is it, in F, where the director of {0} was born?",
             "Give the temperature in degrees F in the city where the director of {0} was born."],
            [("search_film", {"title": title}), ("search_person", {"name": d}), ("get_weather", {"city": city}),
             ("convert_units", {"value": t, "from_unit": "C", "to_unit": "F"})],
            [f], f"It is {f} F in {city}, where {d} was born.", (title,))


def _capital_pop_diff(world, a, b):
    ca, cb = world.countries[a].capital, world.countries[b].capital
    pa, pb = world.cities[ca].population, world.cities[cb].population
    expression = f"{pa} - {pb}"
    diff = int(calculate(expression))
    return (["How many more people live in the capital of {0} than in the capital of {1}?",
             "What is the population of the capital of {0} minus that of the capital of {1}?",
             "By how much does the population of the capital of {0} exceed that of the capital of {1}?"],
            [("get_country", {"country": a}), ("get_country", {"country": b}), ("get_city", {"city": ca}),
             ("get_city", {"city": cb}), ("calculator", {"expression": expression})],
            [diff], f"The difference is {diff} ({ca} {pa}, {cb} {pb}).", (a, b))


def domains(world) -> dict:
    """The entities a task can be about, by domain, each in a fixed (sorted) order."""
    return {"city": sorted(world.cities), "country": sorted(world.countries), "film": sorted(world.films),
            "company": sorted(world.companies), "ticker": sorted(world.tickers),
            "code": sorted(c for c in world.currencies if c != "USD")}


TASK_TYPES = {
    "weather": (1, ("city",), _weather),
    "city_population": (1, ("city",), _city_pop),
    "capital": (1, ("country",), _capital),
    "film_year": (1, ("film",), _film_year),
    "stock_price": (1, ("ticker",), _stock),
    "capital_weather": (2, ("country",), _capital_weather),
    "city_currency": (2, ("city",), _city_currency),
    "director_birthplace": (2, ("film",), _director_birthplace),
    "company_price": (2, ("company",), _company_price),
    "ceo_birth_year": (2, ("company",), _ceo_birth_year),
    "company_price_local": (3, ("company", "code"), _company_price_local),
    "director_weather_f": (3, ("film",), _director_weather_f),
    "capital_population_diff": (3, ("country", "country"), _capital_pop_diff),
}
SPLITS = ("train", "val", "test")
_CITIES = sorted(WORLD.cities)          # the expert's wrong-argument noise draws from these


def combinations(world, kind: str) -> list[tuple]:
    """The entity tuples of a task type in `world`: single entities, or ordered pairs of distinct ones."""
    names = [domains(world)[d] for d in TASK_TYPES[kind][1]]
    return [(x,) for x in names[0]] if len(names) == 1 else [(x, y) for x in names[0] for y in names[1] if x != y]


def build_task(world, kind: str, entities: tuple, template: int, task_id: str, split: str, show_tools) -> Task:
    """One task of type `kind` about `entities` in `world`, phrased with query template `template` (0-2).
    show_tools(relevant tools) -> the tool list shown to the model."""
    group, _, builder = TASK_TYPES[kind]
    templates, chain, facts, answer, _ = builder(world, *entities)
    relevant = list(dict.fromkeys(tool for tool, _ in chain))
    answer_from = _implementations(world)
    values = [leaf for tool, args in chain for leaf in (*_scalars(args), *_scalars(answer_from[tool](**args)))]
    constants = [chain[i][1][key] for i, key in sorted(_fixed_arguments(kind))]
    return Task(task_id, group, split, templates[template].format(*entities), show_tools(relevant), answer, facts,
                relevant, chain, kind, tuple(entities), tuple(dict.fromkeys(values)), tuple(constants))


def _scalars(value) -> list:
    """Every scalar inside a JSON value, in order."""
    if isinstance(value, dict):
        return [x for v in value.values() for x in _scalars(v)]
    if isinstance(value, list):
        return [x for v in value for x in _scalars(v)]
    return [value]


@functools.lru_cache(maxsize=None)
def _implementations(world) -> dict:
    """The real tools answering from `world` (one set per world, built once)."""
    return implementations(world)


@functools.lru_cache(maxsize=None)
def _fixed_arguments(kind: str) -> frozenset:
    """(call index, argument name) of the reference-chain arguments whose value is the same in every task of type
    `kind` (over WORLD's entities): values the task type fixes, not values an earlier call supplies. USD is one,
    although get_stock_quote happens to return it before get_exchange_rate takes it."""
    builder = TASK_TYPES[kind][2]
    chains = [builder(WORLD, *entities)[1] for entities in combinations(WORLD, kind)]
    return frozenset((i, key) for i, (_, args) in enumerate(chains[0]) for key, value in args.items()
                     if all(chain[i][1][key] == value for chain in chains))


def split_of(kind: str, entities: tuple, template: int) -> str:
    """The split of a tiny-suite task: 70% train, 10% val, 20% test, by a hash of (type, entities, template) — of
    (type, entities) alone for two-entity types, so their test pairs are unseen in training."""
    key = [kind, list(entities)] + ([template] if len(entities) == 1 else [])
    h = int(hashlib.sha256(json.dumps(key).encode()).hexdigest()[:8], 16) % 10
    return "train" if h < 7 else "val" if h < 8 else "test"


def _pools():
    """For every task type and split, the (entities, template index) combinations that belong to it (tiny suite)."""
    pools = {}
    for kind in TASK_TYPES:
        combos = combinations(WORLD, kind)
        for split in SPLITS:
            pools[kind, split] = [(c, t) for c in combos for t in range(3) if split_of(kind, c, t) == split]
    return pools


POOLS = _pools()


def make_tasks(split: str, n: int, seed: int = 0, group: int | None = None, n_distractors: int = 2) -> list[Task]:
    """n tasks of the tiny suite's `split` (train | val | test), drawn with replacement, groups uniform unless
    `group` is given; each shows its relevant tools plus `n_distractors` others, shuffled. Deterministic."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (choose from {', '.join(SPLITS)})")
    if group not in (None, 1, 2, 3):
        raise ValueError(f"group must be 1, 2 or 3 (got {group})")
    rng = random.Random(f"{split}:{seed}")
    kinds = {g: [k for k, v in TASK_TYPES.items() if v[0] == g and POOLS[k, split]] for g in (1, 2, 3)}

    def relevant_and_distractors(relevant):
        others = [t for t in SCHEMAS if t not in relevant]
        tools = relevant + rng.sample(others, min(n_distractors, len(others)))
        rng.shuffle(tools)
        return tools

    tasks = []
    for i in range(n):
        g = group or rng.choice((1, 2, 3))
        kind = rng.choice(kinds[g])
        entities, template = rng.choice(POOLS[kind, split])
        task_id = f"{split}-{seed}-{i}"
        tasks.append(build_task(WORLD, kind, entities, template, task_id, split, relevant_and_distractors))
    return tasks


# ----------------------------------------------------------------------------------------------------------------------
# Suites: one interface (environment, tasks, fingerprint) over the tiny suite above and the large one below


SUITE_SPLITS = ("sft", "train", "val", "test")


def _check(split: str, group):
    if split not in SUITE_SPLITS:
        raise ValueError(f"unknown split {split!r} (choose from {', '.join(SUITE_SPLITS)})")
    if group not in (None, 1, 2, 3):
        raise ValueError(f"group must be 1, 2 or 3 (got {group})")


class TinySuite:
    """The small WORLD and make_tasks, as they always were: "sft" and "train" both draw from the train split."""
    name = "tiny"

    def environment(self, faults: FaultConfig | None = None) -> Environment:
        return Environment(faults)

    def tasks(self, split: str, n: int | None = None, seed: int = 0, group: int | None = None) -> list[Task]:
        _check(split, group)
        if n is None:
            raise ValueError("the tiny suite samples its tasks with replacement: give n")
        return make_tasks("train" if split == "sft" else split, n, seed, group)

    def fingerprint(self) -> str:
        return suite_fingerprint()


LARGE_WORLDS = {     # split -> (world seed, size); built in this order with one shared `used` set, so disjoint
    "test": (WORLD_SEED + 1, dict(n_countries=12, cities_per_country=3, n_people=24, n_films=24, n_companies=16)),
    "val": (WORLD_SEED + 2, dict(n_countries=4, cities_per_country=3, n_people=8, n_films=8, n_companies=6)),
    "train": (WORLD_SEED + 3, dict(n_countries=16, cities_per_country=3, n_people=32, n_films=32, n_companies=24)),
    "sft": (WORLD_SEED + 4, dict(n_countries=16, cities_per_country=3, n_people=32, n_films=32, n_companies=24)),
}
LARGE_FIXED_PER_GROUP = {"test": 180, "val": 50}   # unique tasks per group in the fixed val and test lists


class LargeSuite:
    """For a pretrained model that can copy names: one world per split (entity-disjoint, so no test entity or any
    entity its chain touches occurs in sft/train/val), every task shows all tools in one fixed order (one system
    prompt for every episode), val and test are fixed lists of unique tasks, sft and train are drawn with
    replacement from their own worlds' (entities, template) pools."""
    name = "large"

    def __init__(self):
        used: set[str] = set()
        self.worlds = {split: World(seed, used=used, **size) for split, (seed, size) in LARGE_WORLDS.items()}
        self.world = World.union(list(self.worlds.values()))
        self.pools = {(kind, split): [(c, t) for c in combinations(self.worlds[split], kind) for t in range(3)]
                      for kind in TASK_TYPES for split in ("sft", "train")}
        self.fixed = {split: self._fixed_list(split, per_group) for split, per_group in LARGE_FIXED_PER_GROUP.items()}

    def _fixed_list(self, split: str, per_group: int) -> list[tuple]:
        """(kind, entities, template) of a fixed list: within a group, task types in turn; within a type, entities
        in a seeded order, each once before any twice (then with another template); groups interleaved G1 G2 G3 G1
        ..., so every prefix is balanced over groups and types."""
        rng = random.Random(f"large:{split}")
        by_group = []
        for g in (1, 2, 3):
            queues = []
            for kind in [k for k, v in TASK_TYPES.items() if v[0] == g]:
                combos = combinations(self.worlds[split], kind)
                rng.shuffle(combos)
                queues.append([(kind, c, (i + k) % 3) for k in range(3) for i, c in enumerate(combos)])
            in_turn = [spec for row in itertools.zip_longest(*queues) for spec in row if spec is not None]
            if len(in_turn) < per_group:
                raise ValueError(f"the {split} world has {len(in_turn)} unique G{g} tasks, {per_group} asked for")
            by_group.append(in_turn[:per_group])
        return [spec for row in zip(*by_group) for spec in row]

    def environment(self, faults: FaultConfig | None = None) -> Environment:
        return Environment(faults, world=self.world)

    def tasks(self, split: str, n: int | None = None, seed: int = 0, group: int | None = None) -> list[Task]:
        """val/test: the first n of the fixed list (all if n is None; `seed` is ignored); sft/train: n tasks drawn
        with replacement, groups uniform, deterministic from `seed`."""
        _check(split, group)
        every_tool = lambda relevant: list(SCHEMAS)                                  # noqa: E731
        if split in self.fixed:
            specs = [(i, spec) for i, spec in enumerate(self.fixed[split]) if group in (None, TASK_TYPES[spec[0]][0])]
            if n is not None and n > len(specs):
                raise ValueError(f"the large suite's {split} list has {len(specs)} tasks; {n} asked for")
            return [build_task(self.world, kind, c, t, f"{split}-{i:05d}", split, every_tool)
                    for i, (kind, c, t) in specs[:n]]
        if n is None:
            raise ValueError(f"the large suite samples its {split} tasks with replacement: give n")
        rng = random.Random(f"large:{split}:{seed}")
        kinds = {g: [k for k, v in TASK_TYPES.items() if v[0] == g] for g in (1, 2, 3)}
        tasks = []
        for i in range(n):
            kind = rng.choice(kinds[group or rng.choice((1, 2, 3))])
            entities, template = rng.choice(self.pools[kind, split])
            tasks.append(build_task(self.world, kind, entities, template, f"{split}-{seed}-{i:05d}", split, every_tool))
        return tasks

    def fingerprint(self) -> str:
        """A short hash of the worlds, the tools, the pools and the fixed lists."""
        tables = [repr(sorted(getattr(self.world, t).items())) for t in ("currencies", "countries", "cities", "people",
                                                                         "films", "companies")]
        blob = json.dumps([tables, SCHEMAS, sorted(map(str, self.pools.items())),
                           [asdict(t) for split in self.fixed for t in self.tasks(split)]])
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


SUITES = {"tiny": TinySuite, "large": LargeSuite}


@functools.lru_cache(maxsize=None)
def make_suite(name: str):
    """The task suite `name` (tiny | large): .environment(faults), .tasks(split, n, seed), .fingerprint()."""
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r} (choose from {', '.join(SUITES)})")
    return SUITES[name]()


# ----------------------------------------------------------------------------------------------------------------------
# The scripted expert


THOUGHTS = {
    "get_city": "I need facts about {city}.", "get_country": "I need facts about {country}.",
    "get_weather": "I need the weather in {city}.", "get_stock_quote": "I need the price of {ticker}.",
    "search_company": "I need to look up {name}.", "search_person": "I need to look up {name}.",
    "search_film": "I need to look up {title}.", "get_exchange_rate": "I need the rate from {base} to {target}.",
    "calculator": "I compute {expression}.", "convert_units": "I convert {value} {from_unit} to {to_unit}.",
}


@dataclass
class Expert:
    """Follows the reference chain; retries a failed call (faults) up to `max_retries` times, then gives up.
    Noise (probabilities per step) makes imperfect demonstrations."""
    skip_step: float = 0.0
    wrong_arg: float = 0.0
    wrong_tool: float = 0.0
    early_finish: float = 0.0
    max_retries: int = 2
    seed: int = 0

    def act(self, task: Task, history: list) -> str:
        rng = random.Random(f"{self.seed}:{task.id}:{len(history)}")
        done = sum(1 for _, r in history if r is not None and r.ok)
        failed_in_a_row = 0
        for _, r in reversed(history):
            if r is not None and r.ok:
                break
            failed_in_a_row += 1
        if failed_in_a_row > self.max_retries:
            return format_action("The tools keep failing; I give up.", "Finish", {"return_type": "give_up_and_restart"})
        if done >= len(task.reference_chain) or (history and rng.random() < self.early_finish):
            # The answer is only as good as the calls: any wrong, skipped or missing call spoils it.
            made = [parse_action(a).args for a, r in history if r is not None and r.ok]
            clean = made == [args for _, args in task.reference_chain]
            answer = task.answer if clean else "I could not determine the answer."
            return format_action("I have the answer.", "Finish", {"return_type": "give_answer", "final_answer": answer})
        if rng.random() < self.skip_step and done + 1 < len(task.reference_chain):
            done += 1
        tool, args = task.reference_chain[done]
        thought = THOUGHTS.get(tool, "I call {tool}.").format(tool=tool, **args)
        if rng.random() < self.wrong_tool:
            tool = rng.choice([t for t in task.tools if t != tool] or [tool])
        if rng.random() < self.wrong_arg and args:
            key = rng.choice(sorted(args))
            args = {**args, key: rng.choice(_CITIES) if isinstance(args[key], str) else args[key] + 1}
        return format_action(thought, tool, args)


def expert_episode(task: Task, env, expert: Expert | None = None, max_steps: int = 12) -> list:
    """Run the expert to the end: [(action_text, ToolResult or None for Finish)]."""
    expert = expert or Expert()
    history = []
    for _ in range(max_steps):
        text = expert.act(task, history)
        action = parse_action(text)
        if action.tool == "Finish":
            history.append((text, None))  # Finish: no tool runs
            break
        history.append((text, env.call(action.tool, action.args)))
    return history


def final_answer_of(history: list) -> str:
    """The final answer of an expert episode; "" if it gave up or never finished."""
    action = parse_action(history[-1][0]) if history else None
    if action is None or action.tool != "Finish" or action.args is None:
        return ""
    return action.args.get("final_answer", "")


# ----------------------------------------------------------------------------------------------------------------------
# Tool recall and the suite fingerprint


def relevant_tool_recall(called_tools, task: Task) -> float:
    """Fraction of the task's relevant tools the agent called at least once."""
    if not task.relevant_tools:
        return 1.0
    return len(set(called_tools) & set(task.relevant_tools)) / len(set(task.relevant_tools))


def suite_fingerprint() -> str:
    """A short hash of the world and the task types: caches built from the task suite (the SFT warm start) are
    keyed by it, so changing the suite never reuses a stale model."""
    blob = json.dumps([sorted(WORLD.cities), sorted(WORLD.people), sorted(WORLD.films), sorted(WORLD.companies),
                       sorted(f"{k}" for k in POOLS.items())])
    return hashlib.sha256(blob.encode()).hexdigest()[:12]

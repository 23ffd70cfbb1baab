"""The judge, tools.check_answer: Solved only for an answer that commits to every fact. The expert's answer is Solved
on every task of both suites; answers that spread their bets (a negation or a hedge, every temperature of the world,
every year, every city) are Unsolved although they contain the facts; a unit glued to the number is read as the
number; a committed partial answer is Unsure. JUDGE_VERSION is pinned to a hash of the judge's code.
Pure Python, a few seconds."""
import ast
import functools
import hashlib
import inspect
import os
import re
import textwrap

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tools import (JUDGE_VERSION, SOLVED, UNSOLVED, UNSURE, Task, check_answer, expert_episode, final_answer_of,
                   load_toolbench, make_suite, mentions, written_numbers)
from tools import judge, tasks
from tools.judge import fact_present, rounds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY, LARGE = make_suite("tiny"), make_suite("large")
SAMPLED = 2000                    # tasks drawn from each sampled split (tiny: all; large: sft, train)
WORLDS = {"tiny": judge.WORLD, "large": LARGE.worlds["test"]}     # the world of each suite's test split


@functools.lru_cache(maxsize=None)
def split_tasks(suite: str, split: str) -> list:
    if suite == "large" and split in ("val", "test"):
        return LARGE.tasks(split)                                 # the fixed lists, whole
    return make_suite(suite).tasks(split, SAMPLED, seed=0)


def tasks_of(suite: str, kind: str) -> list:
    """The suite's test tasks of one type."""
    return [t for t in split_tasks(suite, "test") if t.kind == kind]


# ----------------------------------------------------------------------------------------------------------------------
# Reading numbers


@pytest.mark.parametrize("text, numbers", [
    ("It is 33.6C.", [(33.6, 0.05)]),                                  # a unit glued to the number
    ("836.8BEQ", [(836.8, 0.05)]),
    ("482,310 inhabitants", [(482310.0, 0.5)]),                        # thousands separators; precision: units
    ("836.80", [(836.8, 0.005)]),                                      # a written zero is written precision
    ("482310 - 302020", [(482310.0, 0.5), (302020.0, 0.5)]),           # a minus after a number is an operator
    ("The difference is -202020.", [(-202020.0, 0.5)]),                # ... elsewhere a sign
    ("every year 1970-2023", [(1970.0, 0.5), (2023.0, 0.5)]),
    ("Lorvikstad, The Ostkel", []),
])
def test_numbers_are_read_with_the_precision_they_are_written_to(text, numbers):
    found = written_numbers(text)
    assert [x for x, _ in found] == pytest.approx([x for x, _ in numbers])
    assert [half for _, half in found] == pytest.approx([half for _, half in numbers])


def test_a_written_number_rounds_a_value_within_half_a_unit_of_its_last_decimal_place():
    # "836.8": half a unit is 0.05, so 836.801 (0.001 away) is what it says and 836.86 (0.06 away) is not
    assert rounds(written_numbers("836.8")[0], 836.801) and not rounds(written_numbers("836.8")[0], 836.86)
    # "121": half a unit is 0.5, so 121.1 and 120.5 round to it and 121.6 does not
    assert rounds(written_numbers("121")[0], 121.1) and rounds(written_numbers("121")[0], 120.5)
    assert not rounds(written_numbers("121")[0], 121.6)
    assert mentions("It costs 836.8 BEQ", 836.801) and mentions("The Ostkel", "ostkel") and not mentions("x", 8.0)


# ----------------------------------------------------------------------------------------------------------------------
# What the judge accepts


@pytest.mark.parametrize("suite, split", [("tiny", "train"), ("tiny", "val"), ("tiny", "test"), ("large", "sft"),
                                          ("large", "train"), ("large", "val"), ("large", "test")])
def test_the_experts_answer_is_solved_on_every_task_of_every_split_of_both_suites(suite, split):
    tasks = split_tasks(suite, split)
    assert {t.group for t in tasks} == {1, 2, 3} and len({t.kind for t in tasks}) == 13
    unsolved = [(t.query, t.answer) for t in tasks if check_answer(t.answer, t) != SOLVED]
    assert not unsolved, unsolved[:5]
    env = make_suite(suite).environment()                         # task.answer is what the expert answers
    assert all(final_answer_of(expert_episode(t, env)) == t.answer for t in tasks[:30])


@pytest.mark.parametrize("suite", ["tiny", "large"])
def test_answers_that_commit_to_nothing_are_unsolved_although_they_contain_every_fact(suite):
    world = WORLDS[suite]
    weather, film, capital = (tasks_of(suite, kind)[0] for kind in ("weather", "film_year", "capital"))
    t, year, city = weather.facts[0], film.facts[0], capital.facts[0]
    other_city = next(c for c in sorted(world.cities) if c != city)
    wrong = [
        (weather, [f"It is not {t} C; I do not know.", f"It is {t} C or so.", f"Maybe {t} C.",
                  "Temperatures: " + ", ".join(str(c.temp_c) for c in world.cities.values())]),
        (film, [" ".join(str(y) for y in range(1970, 2024)), f"Perhaps {year}.", f"I don't know, {year}?"]),
        (capital, [", ".join(sorted(world.cities)), f"The capital is not {other_city}; it is {city}.",
                   f"It is either {city} or {other_city}.", f"{city}, {other_city}", f"The capital might be {city}."]),
    ]
    assert len(wrong[0][1][-1].split(", ")) == len(world.cities) >= 24                      # the whole world's list
    for task, answers in wrong:
        for answer in answers:
            assert all(fact_present(f, answer) for f in task.facts), answer          # yesterday's judge: Solved
            assert check_answer(answer, task) == UNSOLVED, answer


@pytest.mark.parametrize("suite", ["tiny", "large"])
def test_a_unit_glued_to_the_number_is_read_as_the_number(suite):
    weather, price, fahrenheit = (tasks_of(suite, k)[0] for k in ("weather", "company_price_local",
                                                                     "director_weather_f"))
    code = price.entities[1]
    for answer, task in [(f"{weather.facts[0]}C", weather), (f"It is {weather.facts[0]}C.", weather),
                         (f"{price.facts[0]}{code}", price), (f"It costs {price.facts[0]}{code}.", price),
                         (f"{fahrenheit.facts[0]}F", fahrenheit)]:
        assert check_answer(answer, task) == SOLVED, answer


def test_the_answer_may_name_what_the_query_and_the_reference_chain_touch():
    capital = tasks_of("large", "capital_weather")[0]
    country, = capital.entities
    c = LARGE.world.countries[country]
    t, city = capital.facts
    # the currency code and the country's population are returned by get_country, a call of the chain
    assert check_answer(f"It is {t} C in {city}, capital of {country} ({c.currency}, {c.population} people).",
                        capital) == SOLVED
    # ... the capital's population is not (get_city is no call of this chain): a second candidate number
    assert check_answer(f"It is {t} C in {city} ({LARGE.world.cities[city].population} people).", capital) == UNSOLVED
    price = next(t for t in tasks_of("large", "company_price_local") if " one " in t.query)
    name, code = price.entities
    # "one" in the query is a number of the query; the chain's values (price, rate, product) may be shown
    assert check_answer(f"1 share of {name} costs {price.facts[0]} {code}.", price) == SOLVED
    expression = price.reference_chain[3][1]["expression"]
    assert check_answer(f"{expression} = {price.facts[0]} {code}", price) == SOLVED


def test_a_committed_partial_answer_is_unsure_and_a_hedged_one_unsolved():
    for task in tasks_of("large", "capital_weather")[:10] + tasks_of("tiny", "director_birthplace")[:10]:
        first, second = task.facts
        for part in (first, second):
            assert check_answer(f"The answer is {part}.", task) == UNSURE, (task.query, part)
            assert check_answer(f"The answer is perhaps {part}.", task) == UNSOLVED, (task.query, part)


def test_a_task_without_facts_cannot_be_judged_unless_the_answer_is_empty_or_hedged():
    task = load_toolbench(os.path.join(ROOT, "tests", "data", "toolbench_sample.json"))[1][0]
    assert task.facts == []
    assert check_answer("Brackenford has 3 trains.", task) == UNSURE
    assert check_answer("Maybe 3 trains.", task) == UNSOLVED and check_answer("  ", task) == UNSOLVED


# ----------------------------------------------------------------------------------------------------------------------
# Properties: a fact with another candidate beside it, or under a hedge, is never Solved


POOL = [(suite, t) for suite in ("tiny", "large") for t in split_tasks(suite, "test")[:600]]
FACTS = {}                       # (suite, kind, fact position) -> the facts at that position over the suite's tasks
for _suite in ("tiny", "large"):
    for _t in split_tasks(_suite, "test") + split_tasks(_suite, "train")[:1000]:
        for _i, _f in enumerate(_t.facts):
            FACTS.setdefault((_suite, _t.kind, _i), set()).add(_f)


def touched(task):
    """Words and numbers the task's query, chain and facts make known, read as plainly as possible."""
    strings = [task.query] + [v for v in task.chain_values + tuple(task.facts) if isinstance(v, str)]
    words = {w for s in strings for w in re.findall(r"[a-z0-9]+", s.lower())}
    numbers = [v for v in task.chain_values + tuple(task.facts) if isinstance(v, (int, float))]
    numbers += [float(n) for s in strings for n in re.findall(r"\d+(?:\.\d+)?", s)]
    return words, numbers


def other_of_the_same_kind(suite, task, i, fact, data):
    """Another task's fact at position i of the same kind: another city, another temperature, another year..."""
    words, numbers = touched(task)
    pool = sorted((f for f in FACTS[(suite, task.kind, i)]
                   if (isinstance(fact, str) and not set(re.findall(r"[a-z0-9]+", f.lower())) <= words)
                   or (not isinstance(fact, str) and all(abs(f - v) > 1.0 for v in numbers))), key=str)
    return data.draw(st.sampled_from(pool))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_a_fact_with_another_candidate_of_its_kind_beside_it_is_unsolved(data):
    suite, task = data.draw(st.sampled_from(POOL))
    i = data.draw(st.integers(0, len(task.facts) - 1))
    other = other_of_the_same_kind(suite, task, i, task.facts[i], data)
    form = data.draw(st.sampled_from(["{answer} {other}", "{other}. {answer}", "{answer} Also {other}.",
                                      "{fact}, {other}", "{other}, {fact}"]))
    answer = form.format(answer=task.answer, fact=task.facts[i], other=other)
    assert fact_present(task.facts[i], answer)
    assert check_answer(answer, task) == UNSOLVED, answer


@settings(max_examples=300, deadline=None)
@given(task=st.sampled_from([t for _, t in POOL]), form=st.sampled_from([
    "Maybe {a}", "{a} Perhaps.", "I am not sure, but {a}", "{a} Or not.", "I don't know. {a}", "It might be: {a}",
    "Either {a} or something else.", "It is not true that {a}", "{a} (unsure)", "Possibly {a}", "NO. {a}",
    "{a} I guess.", "I can't tell; {a}", "{a} Probably.", "Nobody knows, {a}"]))
def test_a_correct_answer_under_a_negation_or_a_hedge_is_unsolved(task, form):
    answer = form.format(a=task.answer)
    assert check_answer(task.answer, task) == SOLVED
    assert check_answer(answer, task) == UNSOLVED, answer


# ----------------------------------------------------------------------------------------------------------------------
# The judge's version


def code_hash(*objects) -> str:
    """A hash of the code of functions, classes and modules (without docstrings, comments and assignments to a
    *_VERSION name) and of the value of anything else (sets sorted)."""
    parts = []
    for obj in objects:
        if inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isfunction(inspect.unwrap(obj)):
            tree = ast.parse(textwrap.dedent(inspect.getsource(obj)))
            for node in ast.walk(tree):
                if isinstance(getattr(node, "body", None), list):
                    node.body = [s for s in node.body if not (
                        isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant) and isinstance(s.value.value, str)
                        or isinstance(s, ast.Assign)
                        and any(getattr(t, "id", "").endswith("_VERSION") for t in s.targets)
                    )] or [ast.Pass()]
            parts.append(ast.unparse(tree))
        else:
            parts.append(repr(sorted(obj) if isinstance(obj, (set, frozenset)) else obj))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


JUDGE_CODE = [judge.check_answer, judge.other_candidate, judge._touched, judge._entity_names, judge.fact_present,
              judge._near, judge.mentions, judge.hedged, judge.written_numbers, judge.rounds, judge._normalise,
              judge._is_number, tasks.build_task, tasks._scalars, tasks._fixed_arguments, judge.HEDGES,
              judge._NUMBER_WORDS, judge._GENERIC, judge._GLUE.pattern, judge._NUMBER.pattern, judge._ARTICLES.pattern,
              judge._CODE.pattern]
# Bump tools.JUDGE_VERSION with any change to what the judge decides, then pin the new hash here.
PINNED_JUDGE = {"strict-1": "3c302211433feaf6"}


def test_the_judge_code_is_pinned_to_its_version():
    found = code_hash(*JUDGE_CODE)
    assert PINNED_JUDGE.get(JUDGE_VERSION) == found, (
        f"the judge's code changed: bump tools.JUDGE_VERSION (now {JUDGE_VERSION!r}) and pin the new hash in "
        f"tests/test_judge.py: PINNED_JUDGE = {{<new version>: {found!r}}}")


def documented():
    def f(x):
        """Doc."""
        return x + 1    # comment
    return f


def bare():
    def f(x):
        return x + 1
    return f


def changed():
    def f(x):
        return x + 2
    return f


def test_the_hash_ignores_docstrings_and_comments_but_not_code():
    assert code_hash(documented()) == code_hash(bare()) != code_hash(changed())
    assert code_hash(frozenset("ab")) == code_hash(frozenset("ba")) != code_hash(frozenset("abc"))

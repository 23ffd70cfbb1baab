"""The two task suites behind tools.make_suite: "tiny" is exactly make_tasks as it always was; "large" has
entity-disjoint sft / train / val / test splits, fixed lists of unique val and test tasks balanced over groups, and
one tool list for every task. CPU only, pure Python, about a second."""
import os
import subprocess
import sys
from collections import Counter
from dataclasses import asdict

import pytest

from tools import SCHEMAS, SOLVED, SUITE_SPLITS, check_answer, expert_episode, final_answer_of, make_suite, make_tasks
from tools import suite_fingerprint
from tools.tasks import LargeSuite

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LARGE = make_suite("large")
SAMPLED = 2000                     # tasks drawn from each of the sampled splits (sft, train) when checking them


def large_tasks(split):
    return LARGE.tasks(split) if split in ("val", "test") else LARGE.tasks(split, SAMPLED, seed=0)


def strings_of(value):
    """Every string inside a (nested) response."""
    if isinstance(value, dict):
        return [x for v in value.values() for x in strings_of(v)]
    if isinstance(value, list):
        return [x for v in value for x in strings_of(v)]
    return [value] if isinstance(value, str) else []


def entities_touched(tasks, env) -> set:
    """Every entity a task names or its reference chain touches: string arguments of the calls (not the
    arithmetic, the units or USD, which every split shares), string facts, and every entity name in the responses."""
    world = LARGE.world
    names = set(world.cities) | set(world.countries) | set(world.people) | set(world.films) | \
        set(world.companies) | set(world.tickers) | set(world.currencies)
    touched = set()
    for task in tasks:
        for tool, args in task.reference_chain:
            touched |= {v for k, v in args.items()
                        if isinstance(v, str) and k not in ("expression", "from_unit", "to_unit") and v != "USD"}
            touched |= {s for s in strings_of(env.call(tool, args).response) if s in names and s != "USD"}
        touched |= {f for f in task.facts if isinstance(f, str)}
    return touched


# ----------------------------------------------------------------------------------------------------------------------
# The tiny suite is the old behaviour


@pytest.mark.parametrize("split, old_split", [("sft", "train"), ("train", "train"), ("val", "val"), ("test", "test")])
def test_the_tiny_suite_returns_exactly_what_make_tasks_returns(split, old_split):
    tiny = make_suite("tiny")
    for n, seed in [(50, 0), (120, 1), (7, 3)]:
        assert [asdict(t) for t in tiny.tasks(split, n, seed)] == [asdict(t) for t in make_tasks(old_split, n, seed)]
    env = tiny.environment()
    task = make_tasks("test", 1, seed=0)[0]
    assert env.call(*task.reference_chain[0]).ok


def test_the_tiny_suite_fingerprint_is_unchanged_so_cached_warm_starts_stay_valid():
    assert suite_fingerprint() == "dffc756ea2ae"              # the value before the large suite existed
    assert make_suite("tiny").fingerprint() == suite_fingerprint()


# ----------------------------------------------------------------------------------------------------------------------
# The large suite


def test_no_entity_of_one_large_split_appears_in_another():
    env = LARGE.environment()
    touched = {split: entities_touched(large_tasks(split), env) for split in SUITE_SPLITS}
    assert all(len(touched[split]) > 40 for split in SUITE_SPLITS)      # the val world is the smallest: 48 names
    for i, a in enumerate(SUITE_SPLITS):
        for b in SUITE_SPLITS[i + 1:]:
            assert not touched[a] & touched[b], (a, b, sorted(touched[a] & touched[b])[:5])
    worlds = list(LARGE.worlds.values())                        # and the worlds themselves share no name
    for table in ("cities", "countries", "people", "films", "companies", "tickers"):
        names = [set(getattr(w, table)) for w in worlds]
        assert sum(map(len, names)) == len(set.union(*names)), table


def test_val_and_test_are_fixed_lists_of_unique_tasks_balanced_over_groups():
    test, val = LARGE.tasks("test"), LARGE.tasks("val")
    groups = Counter(t.group for t in test)
    assert len(test) >= 500 and all(groups[g] >= 150 for g in (1, 2, 3))
    assert 140 <= len(val) <= 160 and len(set(Counter(t.group for t in val).values())) == 1
    for tasks in (test, val):
        assert len({(t.kind, t.query) for t in tasks}) == len(tasks)                 # no repeats
        assert len({t.id for t in tasks}) == len(tasks)
        for n in range(3, len(tasks) + 1, 3):                                        # every prefix is balanced
            assert set(Counter(t.group for t in tasks[:n]).values()) == {n // 3}
    assert test[42].id == "test-00042" and val[0].id == "val-00000"
    assert all(len({t.kind for t in test if t.group == g}) == 5 - 2 * (g == 3) for g in (1, 2, 3))


def test_the_fixed_lists_are_the_same_for_every_call_seed_and_fresh_suite():
    fresh = LargeSuite()
    for split in ("val", "test"):
        first = [asdict(t) for t in LARGE.tasks(split)]
        assert [asdict(t) for t in LARGE.tasks(split, seed=7)] == first
        assert [asdict(t) for t in fresh.tasks(split)] == first
        assert [asdict(t) for t in LARGE.tasks(split, 30)] == first[:30]
    assert fresh.fingerprint() == LARGE.fingerprint() != make_suite("tiny").fingerprint()


def test_sampled_large_splits_are_deterministic_from_the_seed_and_have_unique_ids():
    a, b = LARGE.tasks("train", 300, seed=1), LARGE.tasks("train", 300, seed=1)
    assert [asdict(t) for t in a] == [asdict(t) for t in b]
    assert [t.query for t in a] != [t.query for t in LARGE.tasks("train", 300, seed=2)]
    assert len({t.id for t in a}) == 300 and {t.group for t in a} == {1, 2, 3}
    assert {t.split for t in LARGE.tasks("sft", 10)} == {"sft"}


def test_every_large_task_shows_the_same_tools_in_the_same_order():
    for split in SUITE_SPLITS:
        assert all(t.tools == list(SCHEMAS) for t in large_tasks(split)), split


@pytest.mark.parametrize("split", SUITE_SPLITS)
def test_the_expert_solves_every_large_task_of_every_split_with_faults_off(split):
    env = LARGE.environment()
    tasks = large_tasks(split)[:600]
    for task in tasks:
        assert check_answer(final_answer_of(expert_episode(task, env)), task) == SOLVED, task.query


def test_the_suites_reject_unknown_names_splits_and_oversized_requests_with_a_clear_message():
    with pytest.raises(ValueError, match="unknown suite 'huge'"):
        make_suite("huge")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        LARGE.tasks("dev", 3)
    with pytest.raises(ValueError, match="test list has 540 tasks; 541 asked for"):
        LARGE.tasks("test", 541)
    with pytest.raises(ValueError, match="give n"):
        make_suite("tiny").tasks("val")
    with pytest.raises(ValueError, match="give n"):
        LARGE.tasks("train")


def test_the_command_line_expert_solves_the_whole_large_val_list():
    out = subprocess.run([sys.executable, "-m", "tools", "solve", "--suite", "large", "--split", "val"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.splitlines()[-1] == "all: 100.0% of 150"

"""The mocked environment: determinism, validation, faults, task splits, the expert, the answer checker, ToolBench
import, and the command line. CPU only, pure Python, a few seconds."""
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict

import pytest

from tools import (FAULT_KINDS, SCHEMAS, SOLVED, UNSOLVED, UNSURE, Environment, Expert, FaultConfig, Task,
                   calculate, check_answer, expert_episode, final_answer_of, load_toolbench, make_tasks)
from tools.apis import ToolError
from tools.tasks import POOLS, SPLITS, TASK_TYPES, split_of
from tools.world import WORLD

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "tests", "data", "toolbench_sample.json")
CITY, COUNTRY = sorted(WORLD.cities)[0], sorted(WORLD.countries)[0]


def scalars(value):
    """Every non-container value inside a response, recursively."""
    if isinstance(value, dict):
        return [x for v in value.values() for x in scalars(v)]
    if isinstance(value, list):
        return [x for v in value for x in scalars(v)]
    return [value]


# ----------------------------------------------------------------------------------------------------------------------
# The catalogue and determinism


def test_the_catalogue_has_at_least_twelve_tools_over_four_categories_with_openai_schemas():
    assert len(SCHEMAS) >= 12
    assert len({s["category"] for s in SCHEMAS.values()}) >= 4
    for schema in Environment().schemas():
        assert set(schema) == {"name", "description", "parameters"}          # "category" is not shown to the model
        params = schema["parameters"]
        assert params["type"] == "object" and set(params["required"]) <= set(params["properties"])


def test_the_same_call_gives_the_same_response_in_a_fresh_environment():
    calls = [("get_weather", {"city": CITY}), ("get_forecast", {"city": CITY, "days": 3}),
             ("web_search", {"query": "rivers of " + COUNTRY}), ("calculator", {"expression": "2 * (3 + 4)"})]
    first = [Environment().call(name, args) for name, args in calls]
    assert all(r.ok for r in first)
    env = Environment()
    for _ in range(2):
        assert [env.call(name, args).text for name, args in calls] == [r.text for r in first]
    assert first[1].response["days"][2]["day"] == 3 and len(first[1].response["days"]) == 3


def test_task_generation_is_a_function_of_split_and_seed():
    a, b = make_tasks("test", 60, seed=3), make_tasks("test", 60, seed=3)
    assert [asdict(t) for t in a] == [asdict(t) for t in b]
    assert [t.query for t in a] != [t.query for t in make_tasks("test", 60, seed=4)]
    assert all(t.group == 2 for t in make_tasks("val", 40, seed=0, group=2))


def test_task_generation_makes_thousands_of_tasks():
    assert len(make_tasks("train", 5000, seed=0)) == 5000    # how fast: bench.py, not a wall-clock assert here


def test_make_tasks_rejects_an_unknown_split_or_group():
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        make_tasks("dev", 3)
    with pytest.raises(ValueError, match="group must be 1, 2 or 3"):
        make_tasks("test", 3, group=4)


# ----------------------------------------------------------------------------------------------------------------------
# Validation: once, by the framework, against the schema


@pytest.mark.parametrize("name, args, message", [
    ("teleport", {"to": "Mars"}, "unknown tool 'teleport'"),
    ("get_weather", {}, "missing required argument(s): city"),
    ("get_forecast", {"city": CITY}, "missing required argument(s): days"),
    ("get_weather", {"city": CITY, "units": "C"}, "unexpected argument(s): units"),
    ("get_weather", {"city": 3}, "argument 'city' must be of type string, got int"),
    ("get_forecast", {"city": CITY, "days": "2"}, "argument 'days' must be of type integer, got str"),
    ("get_forecast", {"city": CITY, "days": 2.5}, "argument 'days' must be of type integer, got float"),
    ("get_forecast", {"city": CITY, "days": True}, "argument 'days' must be of type integer, got bool"),
    ("convert_units", {"value": False, "from_unit": "C", "to_unit": "F"}, "'value' must be of type number, got bool"),
    ("convert_units", {"value": 1, "from_unit": "C", "to_unit": "parsec"}, "argument 'to_unit' must be one of"),
    ("web_search", {"query": "x" * 201}, "is too long (max 200 characters)"),
    ("get_weather", ["Paris"], "arguments must be a JSON object"),
    # domain errors: the arguments fit the schema, the values are outside the tool's world
    ("get_weather", {"city": "Atlantis"}, "city 'Atlantis' not found"),
    ("get_country", {"country": "Narnia"}, "country 'Narnia' not found"),
    ("get_stock_quote", {"ticker": "ZZZZ"}, "ticker 'ZZZZ' not found"),
    ("get_exchange_rate", {"base": "USD", "target": "XXX"}, "currency 'XXX' not found"),
    ("get_forecast", {"city": CITY, "days": 9}, "days must be between 1 and 5"),
    ("get_local_time", {"utc_offset": 2, "utc_time": "9 o'clock"}, "utc_time must be HH:MM"),
    ("convert_units", {"value": 1, "from_unit": "C", "to_unit": "km"}, "cannot convert temperature (C) to length"),
    ("calculator", {"expression": "1 / 0"}, "division by zero"),
])
def test_each_invalid_call_is_an_error_response_a_model_can_learn_from(name, args, message):
    result = Environment().call(name, args)
    assert not result.ok and result.invalid and not result.fault
    assert message in result.error
    assert json.loads(result.text) == {"error": result.error, "response": ""}      # ToolBench-shaped


def test_an_integer_is_a_valid_number_and_a_valid_call_is_not_flagged():
    result = Environment().call("convert_units", {"value": 100, "from_unit": "C", "to_unit": "F"})
    assert result.ok and not result.invalid and result.error == ""
    assert result.response == {"value": 212.0, "unit": "F"}


# ----------------------------------------------------------------------------------------------------------------------
# The calculator parses arithmetic itself


@pytest.mark.parametrize("expression, value", [
    ("(2 + 3) * 4 / -2", -10.0),
    ("17.2 * 3.1", 53.32),
    ("1 - 2 - 3", -4.0),                  # left associative
    ("2 * (3 + (4 - 1))", 12.0),
    ("2 + 3 * 4", 14.0),                  # precedence
    ("48.64 * 7.93", 385.7152),
    ("--3", 3.0),
    ("1 / 3", 0.3333),                    # rounded to 4 places
])
def test_the_calculator_computes_hand_checked_expressions(expression, value):
    assert calculate(expression) == pytest.approx(value)


@pytest.mark.parametrize("junk", ["2 ** 3", "abs(-1)", "1 +", "(1 + 2", "1 + 2)", "1 / 0", "", "   ", "7 7", "1.2.3",
                                  "1e3", "0x10", "2 ^ 3", "x", "1" * 201])
def test_the_calculator_rejects_junk(junk):
    with pytest.raises(ToolError):
        calculate(junk)


# ----------------------------------------------------------------------------------------------------------------------
# No tool evaluates its input as code

PAYLOADS = ["__import__('os').system('echo pwned')", "; rm -rf /tmp/steptool_canary", "$(touch /tmp/pwned_steptool)",
            "`touch /tmp/pwned_steptool`", "{{7*7}}", "${7*7}", "1; import os"]


def string_arguments(env):
    """(tool, argument, valid filler arguments) for every free-text string argument of every tool."""
    filler = {"string": "x", "integer": 1, "number": 1.0, "boolean": True, "array": [], "object": {}}
    for name in env.tool_names:
        props = env.tools[name][0]["parameters"]["properties"]
        for arg, spec in props.items():
            if spec["type"] == "string" and "enum" not in spec:
                yield name, arg, {k: v["enum"][0] if "enum" in v else filler[v["type"]] for k, v in props.items()}


@pytest.mark.parametrize("environment", ["mocked", "toolbench"])
def test_code_injection_payloads_come_back_as_errors_or_plain_data_with_nothing_executed(environment, tmp_path):
    canary = "/tmp/steptool_canary"
    os.makedirs(canary, exist_ok=True)
    if os.path.exists("/tmp/pwned_steptool"):
        os.remove("/tmp/pwned_steptool")
    env = Environment() if environment == "mocked" else load_toolbench(SAMPLE)[0]
    checked = 0
    for name, arg, base in string_arguments(env):
        for payload in PAYLOADS:
            result = env.call(name, {**base, arg: payload})
            checked += 1
            assert 49 not in scalars(result.response) and "49" not in scalars(result.response), (name, payload)
            if name == "calculator":
                assert not result.ok and result.invalid          # only digits, + - * / ( ) are arithmetic
            assert not result.ok or json.loads(result.text)["response"] == result.response
    assert checked >= 5 * len(PAYLOADS)                          # at least five string arguments
    assert not os.path.exists("/tmp/pwned_steptool") and os.path.isdir(canary)
    assert calculate("7*7") == 49.0                              # the same arithmetic, typed as arithmetic, works


# ----------------------------------------------------------------------------------------------------------------------
# Faults


def fault_run(seed, rate=0.3, kinds=FAULT_KINDS):
    env = Environment(faults=FaultConfig(rate=rate, kinds=kinds, seed=seed))
    return [env.call("get_city", {"city": c}) for c in sorted(WORLD.cities) * (3000 // len(WORLD.cities) + 1)]


def test_fault_rate_matches_the_setting_and_every_kind_occurs():
    results = fault_run(seed=1)
    assert len(results) >= 3000
    faults = [r.fault for r in results if r.fault]
    assert abs(len(faults) / len(results) - 0.3) < 0.03                   # ±3.5 standard deviations
    assert set(faults) == set(FAULT_KINDS)
    assert all(not r.ok and not r.invalid for r in results if r.fault)
    assert all(r.ok for r in results if not r.fault)
    truncated = next(r for r in results if r.fault == "truncated")
    with pytest.raises(json.JSONDecodeError):
        json.loads(truncated.text)
    assert not any(r.fault for r in fault_run(seed=1, rate=0.0))
    assert all(r.fault == "timeout" for r in fault_run(seed=1, rate=1.0, kinds=("timeout",)))


def test_faults_are_reproducible_from_the_seed_and_reset_restores_the_sequence():
    first = [r.text for r in fault_run(seed=1)]
    assert [r.text for r in fault_run(seed=1)] == first
    assert [r.text for r in fault_run(seed=2)] != first
    env = Environment(faults=FaultConfig(rate=0.3, seed=5))
    calls = [("get_city", {"city": c}) for c in sorted(WORLD.cities)] * 3
    before = [env.call(n, a).fault for n, a in calls]
    assert any(before) and not all(before)
    env.reset()
    assert [env.call(n, a).fault for n, a in calls] == before


def test_a_retried_call_can_succeed_after_a_fault():
    env = Environment(faults=FaultConfig(rate=0.5, seed=0))
    outcomes = [env.call("get_weather", {"city": CITY}).ok for _ in range(40)]
    assert True in outcomes and False in outcomes


# ----------------------------------------------------------------------------------------------------------------------
# Task suites and the scripted expert


@pytest.mark.parametrize("split", SPLITS)
def test_the_expert_solves_every_task_of_every_split_with_faults_off(split):
    env, tasks = Environment(), make_tasks(split, 300, seed=0)
    assert {t.group for t in tasks} == {1, 2, 3}
    for task in tasks:
        history = expert_episode(task, env)
        assert all(r.ok for _, r in history[:-1]) and len(history) == len(task.reference_chain) + 1
        assert history[-1][0].startswith("Thought: ") and "\nAction: Finish\nAction Input: " in history[-1][0]
        assert check_answer(final_answer_of(history), task) == SOLVED, task.query


@pytest.mark.parametrize("noise", [{"skip_step": 0.3}, {"wrong_arg": 0.3}, {"wrong_tool": 0.3},
                                   {"early_finish": 0.3}])
def test_each_noise_option_makes_the_expert_solve_fewer_tasks(noise):
    env, tasks = Environment(), make_tasks("train", 200, seed=1)
    solved = sum(check_answer(final_answer_of(expert_episode(t, env, Expert(seed=1, **noise))), t) == SOLVED
                 for t in tasks)
    assert solved < len(tasks)


def test_the_expert_retries_through_faults_and_mostly_still_solves():
    env, tasks = Environment(faults=FaultConfig(rate=0.3, seed=0)), make_tasks("test", 150, seed=0)
    solved = [check_answer(final_answer_of(expert_episode(t, env)), t) == SOLVED for t in tasks]
    assert 0.7 * len(tasks) < sum(solved) < len(tasks)


def test_groups_have_the_documented_chain_lengths_and_later_calls_use_earlier_results():
    env = Environment()
    for task in make_tasks("train", 300, seed=2):
        n = len(task.reference_chain)
        assert {1: n == 1, 2: 2 <= n <= 3, 3: 3 <= n <= 5}[task.group], task.kind
        assert task.relevant_tools == list(dict.fromkeys(tool for tool, _ in task.reference_chain))
        assert set(task.relevant_tools) <= set(task.tools) and len(task.tools) > len(task.relevant_tools)
        if task.group == 1:
            continue
        seen, uses_earlier = set(), False
        for tool, args in task.reference_chain:
            words = {str(v) for v in args.values()} | set(str(args.get("expression", "")).split())
            uses_earlier |= bool(words & seen)
            seen |= {str(v) for v in scalars(env.call(tool, args).response)}
        assert uses_earlier, task.query
    g3 = make_tasks("train", 100, seed=0, group=3)
    assert all(len({SCHEMAS[tool]["category"] for tool in t.relevant_tools}) >= 2 for t in g3)   # across categories


def test_splits_share_no_entity_template_pair_and_two_entity_pairs_are_unseen_in_training():
    for kind, (_, domains, _) in TASK_TYPES.items():
        pools = {s: set(POOLS[kind, s]) for s in SPLITS}
        assert not pools["train"] & pools["val"] and not pools["train"] & pools["test"]
        assert not pools["val"] & pools["test"]
        if len(domains) == 2:                        # the entity pair alone decides the split, whatever the phrasing
            pairs = {s: {e for e, _ in pools[s]} for s in SPLITS}
            assert not pairs["train"] & pairs["test"] and not pairs["train"] & pairs["val"]
    queries = {s: {(t.kind, t.query) for t in make_tasks(s, 2000, seed=0)} for s in SPLITS}
    assert not queries["train"] & queries["test"] and not queries["train"] & queries["val"]
    assert not queries["val"] & queries["test"]
    assert split_of("capital_population_diff", ("A", "B"), 0) == split_of("capital_population_diff", ("A", "B"), 2)


# ----------------------------------------------------------------------------------------------------------------------
# The answer checker


def task_with(facts, query="What is it?"):
    return Task("t", 1, "test", query, [], "", facts, [], [])


@pytest.mark.parametrize("answer, facts, expected", [
    ("It is 18.5 C in Lorvik.", [18.5], SOLVED),                # units after the number
    ("18.5", [18.5], SOLVED),                                   # the bare number
    ("Roughly 18.5 degrees Celsius, I believe.", [18.5], SOLVED),   # extra words
    ("It costs 2017.44 in that currency.", [2017.436], SOLVED),  # rounding within tolerance
    ("It costs 2018.4 in that currency.", [2017.436], UNSOLVED),  # ... but not beyond it
    ("Lorvik has 482,310 inhabitants.", [482310], SOLVED),      # thousands separators
    ("Lorvik has 482310.", [482310], SOLVED),                   # trailing period
    ("Lorvik has 4823100 inhabitants.", [482310], UNSOLVED),    # the right digits inside a wrong number
    ("Lorvik has 1482310 inhabitants.", [482310], UNSOLVED),
    ("Lorvik has 482300 inhabitants.", [482310], UNSOLVED),     # integers must match exactly
    ("The difference is -202020.", [-202020], SOLVED),          # negative numbers
    ("The difference is 202020.", [-202020], UNSOLVED),
    ("the CAPITAL is lorvik!", ["Lorvik"], SOLVED),             # case and punctuation
    ("The capital is Lorvik.", ["Lorvik"], SOLVED),             # trailing period on a string fact
    ("The capital is The Ostkel", ["The Ostkel"], SOLVED),      # articles
    ("capital: Ostkel", ["The Ostkel"], SOLVED),
    ("Lorvikstad is nice", ["Lorvik"], UNSOLVED),               # whole words only
    ("It is 18.5 C somewhere.", [18.5, "Lorvik"], UNSURE),      # some facts but not all
    ("It is 18.5 C in Lorvik.", [18.5, "Lorvik"], SOLVED),
    ("I do not know.", [18.5, "Lorvik"], UNSOLVED),
    ("", [18.5], UNSOLVED),
    ("anything", [], UNSURE),                                   # nothing to judge
])
def test_the_answer_checker_on_tricky_cases(answer, facts, expected):
    assert check_answer(answer, task_with(facts)) == expected


# ----------------------------------------------------------------------------------------------------------------------
# ToolBench import


def test_toolbench_import_names_apis_as_toolbench_does_and_deduplicates_clashes():
    env, tasks = load_toolbench(SAMPLE)
    assert env.tool_names == ["departures_for_rail_board", "seats_for_rail_board", "status_for_library_hours",
                              "status_for_library_hours_2", "random_fact_for_trivia_box"]
    assert [t.tools for t in tasks] == [["departures_for_rail_board", "seats_for_rail_board"],
                                        ["status_for_library_hours", "status_for_library_hours_2"],
                                        ["departures_for_rail_board", "random_fact_for_trivia_box"]]
    assert [t.query for t in tasks][1] == "Is the Quillmere library open on Sundays?"
    assert [t.id for t in tasks] == ["7101", "7102", "7103"]


def test_toolbench_schemas_map_types_and_keep_optional_parameters_optional():
    env, _ = load_toolbench(SAMPLE)
    schemas = {s["name"]: s for s in env.schemas()}
    departures = schemas["departures_for_rail_board"]["parameters"]
    assert departures["required"] == ["station"]
    assert {p: v["type"] for p, v in departures["properties"].items()} == {"station": "string", "limit": "number",
                                                                          "date": "string"}
    seats = schemas["seats_for_rail_board"]["parameters"]["properties"]
    assert seats["car"]["type"] == "integer"
    assert schemas["status_for_library_hours"]["parameters"]["properties"]["open_now"]["type"] == "boolean"
    assert schemas["random_fact_for_trivia_box"]["parameters"]["properties"]["topic"]["type"] == "string"   # ENUM
    assert env.tools["seats_for_rail_board"][0]["category"] == "Transportation" and "category" not in schemas[
        "seats_for_rail_board"]
    assert env.call("departures_for_rail_board", {"station": "B", "limit": 2}).ok          # optional given
    assert not env.call("departures_for_rail_board", {"limit": 2}).ok                      # required missing
    assert "must be of type integer" in env.call("seats_for_rail_board", {"train_id": "t", "car": "2"}).error


def test_toolbench_responses_follow_the_template_deterministically():
    env, _ = load_toolbench(SAMPLE)
    r = env.call("departures_for_rail_board", {"station": "Brackenford"})
    assert r.ok and set(r.response) == {"station", "count", "departures"}
    assert isinstance(r.response["station"], str) and isinstance(r.response["count"], int)
    assert len(r.response["departures"]) == 3                                    # _list_length 3
    assert all(len(d["stops"]) == 2 and isinstance(d["delayed"], bool) for d in r.response["departures"])   # nested
    assert all(isinstance(s["minutes"], int) for d in r.response["departures"] for s in d["stops"])
    again = load_toolbench(SAMPLE)[0]
    assert again.call("departures_for_rail_board", {"station": "Brackenford"}).text == r.text
    assert env.call("departures_for_rail_board", {"station": "Quillmere"}).text != r.text
    a = env.call("departures_for_rail_board", {"station": "B", "limit": 2}).text
    assert a == env.call("departures_for_rail_board", {"limit": 2, "station": "B"}).text    # canonical arguments
    seats = env.call("seats_for_rail_board", {"train_id": "t1", "car": 2}).response
    assert seats["note"] is None and seats["status"] == "OK" and isinstance(seats["price"], float)
    assert env.call("status_for_library_hours", {"library": "Q", "open_now": True}).response == {}   # empty template
    hours = env.call("status_for_library_hours_2", {}).response                  # a template stored as a JSON string
    assert len(hours["hours"]) == 2 and isinstance(hours["weekday"], str)
    facts = env.call("random_fact_for_trivia_box", {"topic": "trains"}).response  # a list template, literal kept
    assert isinstance(facts, list) and all(f["score"] == 7 for f in facts)


@pytest.mark.parametrize("template", [None, "", [], {}, 5, True, "str", "plain text", "{not json", [[["int"]]],
                                      {"_list_length": "three", "x": "int"}, {"_list_length": 10 ** 9, "x": "int"},
                                      {"a": [{"_list_length": 50, "b": [{"_list_length": 50, "c": [
                                          {"_list_length": 50, "d": [{"_list_length": 50, "e": "int"}]}]}]}]}])
def test_odd_toolbench_templates_do_not_crash_and_stay_small(template, tmp_path):
    entry = {"query": "q", "query_id": 1, "relevant APIs": [["T", "a"]],
             "api_list": [{"category_name": "C", "tool_name": "T", "api_name": "a", "template_response": template}]}
    path = tmp_path / "odd.json"
    path.write_text(json.dumps([entry]))
    env, _ = load_toolbench(str(path))
    result = env.call("a_for_t", {})
    assert result.ok
    assert len(result.text) <= 1000
    if template in (None, "", [], {}):
        assert result.response == {}


def test_toolbench_tasks_map_relevant_apis_and_cannot_be_judged():
    env, tasks = load_toolbench(SAMPLE)
    assert [t.group for t in tasks] == [0, 0, 0]                  # no G1/G2/G3 in the file name
    assert tasks[0].relevant_tools == ["departures_for_rail_board", "seats_for_rail_board"]
    # ["Nowhere", "missing"] is not in the entry's api_list: dropped
    assert tasks[2].relevant_tools == ["departures_for_rail_board", "random_fact_for_trivia_box"]
    assert tasks[0].reference_chain == [("departures_for_rail_board", {"station": "Brackenford"}),
                                        ("seats_for_rail_board", {"train_id": "example", "car": 2})]   # defaults
    assert tasks[1].reference_chain == [("status_for_library_hours", {"library": "example", "open_now": True})]
    for task in tasks:
        assert task.facts == [] and task.answer == ""
        assert all(env.call(tool, args).ok for tool, args in task.reference_chain)
        assert check_answer("Brackenford has 3 trains.", task) == UNSURE


def test_the_group_comes_from_the_file_name(tmp_path):
    path = tmp_path / "G3_instruction.json"
    path.write_text(open(SAMPLE).read())
    assert {t.group for t in load_toolbench(str(path))[1]} == {3}
    assert {t.group for t in load_toolbench(os.path.join(ROOT, "tests", "data", "toolbench_G2_sample.json"))[1]} == {2}


@pytest.mark.parametrize("content, message", [
    ('[\n{"query": "q",\n "api_list": [}\n]', "not valid JSON (line 3"),
    ('{"query": "q", "api_list": []}', "expected a JSON list of queries, got a JSON dict"),
    ('[{"query": "q", "api_list": []}, {"api_list": []}]', "entry 1 needs 'query' and an 'api_list' list"),
    ('[{"query": "q"}]', "entry 0 needs 'query' and an 'api_list' list"),
    ('[{"query": "q", "api_list": ["x"]}]', "entry 0, api_list[0] needs 'tool_name' and 'api_name'"),
    ('[{"query": "q", "api_list": [{"tool_name": "T", "api_name": "a", "required_parameters": 3}]}]',
     "entry 0, api_list[0]: 'required_parameters' must be a list"),
    ('[{"query": "q", "api_list": [], "relevant APIs": ["T"]}]', "entry 0: 'relevant APIs' must be a list of"),
])
def test_a_broken_toolbench_file_is_a_one_line_error_naming_the_file_and_the_entry(tmp_path, content, message):
    path = tmp_path / "queries.json"
    path.write_text(content)
    with pytest.raises(ValueError) as e:
        load_toolbench(str(path))
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value) and "\n" not in str(e.value)


def test_a_missing_toolbench_file_is_named():
    with pytest.raises(FileNotFoundError, match="nope.json: no such ToolBench query file"):
        load_toolbench("nope.json")


# ----------------------------------------------------------------------------------------------------------------------
# The command line


def cli(*args):
    return subprocess.run([sys.executable, "-m", "tools", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_the_command_line_lists_the_schemas_as_a_json_array():
    out = cli("list")
    schemas = json.loads(out.stdout)
    assert out.returncode == 0 and isinstance(schemas, list) and len(schemas) >= 12
    assert [s["name"] for s in schemas] == list(SCHEMAS)
    assert len({SCHEMAS[s["name"]]["category"] for s in schemas}) >= 4
    imported = json.loads(cli("list", "--tasks", f"toolbench:{SAMPLE}").stdout)
    assert [s["name"] for s in imported][:2] == ["departures_for_rail_board", "seats_for_rail_board"]


def test_the_command_line_samples_tasks_as_json_lines_reproducibly():
    out = cli("sample", "--split", "test", "--n", "4", "--seed", "0", "--group", "2")
    lines = out.stdout.splitlines()
    assert out.returncode == 0 and len(lines) == 4
    assert all(json.loads(x)["group"] == 2 and json.loads(x)["split"] == "test" for x in lines)
    assert cli("sample", "--split", "test", "--n", "4", "--seed", "0", "--group", "2").stdout == out.stdout
    assert [json.loads(x)["query"] for x in lines] == [t.query for t in make_tasks("test", 4, 0, 2)]
    imported = cli("sample", "--n", "2", "--tasks", f"toolbench:{SAMPLE}").stdout.splitlines()
    assert [json.loads(x)["id"] for x in imported] == ["7101", "7102"]


def test_the_command_line_calls_a_tool_and_fails_cleanly_on_bad_input():
    ok = cli("call", "calculator", '{"expression": "(2+3)*4"}')
    assert ok.returncode == 0 and json.loads(ok.stdout)["response"]["result"] == 20.0
    unknown = cli("call", "teleport", "{}")
    assert unknown.returncode == 1 and "unknown tool 'teleport'" in unknown.stderr
    bad = cli("call", "get_weather", "{bad")
    assert bad.returncode == 1 and "not valid JSON" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert "Traceback" not in bad.stderr
    missing = cli("list", "--tasks", "toolbench:nope.json")
    assert missing.returncode == 1 and "nope.json" in missing.stderr and "Traceback" not in missing.stderr
    assert cli("sample", "--n", "-1").returncode == 1
    assert cli("sample", "--split", "dev").returncode == 2                 # argparse usage error
    imported = cli("call", "seats_for_rail_board", '{"train_id": "t1", "car": 2}', "--tasks", f"toolbench:{SAMPLE}")
    assert imported.returncode == 0 and json.loads(imported.stdout)["response"]["status"] == "OK"


def test_the_command_line_expert_solves_every_group_with_faults_off():
    out = cli("solve", "--split", "test", "--n", "150")
    lines = out.stdout.splitlines()
    assert out.returncode == 0 and [x.split(":")[0] for x in lines] == ["G1", "G2", "G3", "all"]
    assert all(": 100.0% of " in x for x in lines)
    faulty = cli("solve", "--split", "test", "--n", "150", "--fault-rate", "0.3").stdout
    assert "all: 100.0%" not in faulty

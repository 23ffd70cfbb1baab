"""The mocked environment: determinism, validation, faults, task splits, the expert, and the answer checker."""
import json
import os

import pytest

from tools import (FAULT_KINDS, SCHEMAS, SOLVED, UNSOLVED, UNSURE, Environment, Expert, FaultConfig, Task,
                   calculate, check_answer, expert_episode, final_answer_of, make_tasks)
from tools.apis import ToolError
from tools.tasks import split_of


def test_the_catalogue_has_at_least_twelve_tools_over_four_categories():
    assert len(SCHEMAS) >= 12
    assert len({s["category"] for s in SCHEMAS.values()}) >= 4
    for schema in Environment().schemas():
        assert set(schema) == {"name", "description", "parameters"}
        assert schema["parameters"]["type"] == "object"


def test_the_same_call_gives_the_same_response_and_task_generation_is_seeded():
    a, b = Environment(), Environment()
    assert a.call("get_weather", {"city": "Seljun"}).text == b.call("get_weather", {"city": "Seljun"}).text or \
        not a.call("get_weather", {"city": "Seljun"}).ok
    city = sorted(__import__("tools").world.WORLD.cities)[0]
    assert a.call("get_forecast", {"city": city, "days": 3}).text == b.call("get_forecast", {"city": city, "days": 3}).text
    assert [t.query for t in make_tasks("test", 50, seed=3)] == [t.query for t in make_tasks("test", 50, seed=3)]
    assert [t.query for t in make_tasks("test", 50, seed=3)] != [t.query for t in make_tasks("test", 50, seed=4)]


@pytest.mark.parametrize("name, args, message", [
    ("teleport", {"to": "Mars"}, "unknown tool 'teleport'"),
    ("get_weather", {}, "missing required argument(s): city"),
    ("get_weather", {"city": "X", "units": "C"}, "unexpected argument(s): units"),
    ("get_weather", {"city": 3}, "argument 'city' must be of type string, got int"),
    ("get_forecast", {"city": "X", "days": True}, "argument 'days' must be of type integer, got bool"),
    ("convert_units", {"value": 1, "from_unit": "C", "to_unit": "parsec"}, "argument 'to_unit' must be one of"),
    ("web_search", {"query": "x" * 201}, "too long"),
    ("get_weather", {"city": "Atlantis"}, "city 'Atlantis' not found"),
    ("convert_units", {"value": 1, "from_unit": "C", "to_unit": "km"}, "cannot convert temperature"),
    ("get_weather", ["Paris"], "arguments must be a JSON object"),
])
def test_each_invalid_call_is_an_error_response_a_model_can_learn_from(name, args, message):
    result = Environment().call(name, args)
    assert not result.ok and result.invalid and message in result.error
    assert json.loads(result.text)["error"] == result.error


def test_the_calculator_parses_arithmetic_itself():
    assert calculate("(2 + 3) * 4 / -2") == -10.0
    assert calculate("17.2 * 3.1") == pytest.approx(53.32)
    assert calculate("1 - 2 - 3") == -4.0          # left associative
    assert calculate("2 * (3 + (4 - 1))") == 12.0
    for junk in ["2 ** 3", "abs(-1)", "1 +", "(1 + 2", "1 / 0", "", "7 7"]:
        with pytest.raises(ToolError):
            calculate(junk)


PAYLOADS = ["__import__('os').system('echo pwned')", "; rm -rf /tmp/steptool_canary", "$(touch /tmp/pwned_steptool)",
            "`touch /tmp/pwned_steptool`", "{{7*7}}", "1; import os"]


def test_code_injection_payloads_come_back_as_invalid_input_or_plain_data_with_nothing_executed():
    env = Environment()
    for name, schema in SCHEMAS.items():
        props = schema["parameters"]["properties"]
        for arg, spec in props.items():
            if spec["type"] != "string" or "enum" in spec:
                continue
            for payload in PAYLOADS:
                args = {k: (payload if k == arg else {"string": "x", "integer": 1, "number": 1.0}[v["type"]]
                            if "enum" not in v else v["enum"][0]) for k, v in props.items()}
                result = env.call(name, args)
                assert "49" not in result.text or name == "web_search" and False
                assert not os.path.exists("/tmp/pwned_steptool")
                if name == "calculator":
                    assert not result.ok and result.invalid


def test_fault_rates_match_the_setting_and_are_reproducible():
    def run(seed):
        env = Environment(faults=FaultConfig(rate=0.3, seed=seed))
        return [env.call("get_city", {"city": c}) for c in sorted(__import__("tools").world.WORLD.cities) * 125]
    results = run(1)
    faults = [r.fault for r in results if r.fault]
    assert abs(len(faults) / len(results) - 0.3) < 0.03                     # 3,000 calls
    assert set(faults) == set(FAULT_KINDS)
    assert all(not r.ok for r in results if r.fault)
    assert [r.text for r in run(1)] == [r.text for r in results]
    assert [r.text for r in run(2)] != [r.text for r in results]
    env = Environment(faults=FaultConfig(rate=0.3, seed=5))
    first = [env.call("get_city", {"city": "x" + str(i)}).text for i in range(50)]
    env.reset()
    assert [env.call("get_city", {"city": "x" + str(i)}).text for i in range(50)] == first


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_the_expert_solves_every_task_of_every_split_without_faults(split):
    env = Environment()
    tasks = make_tasks(split, 300, seed=0)
    assert {t.group for t in tasks} == {1, 2, 3}
    assert all(check_answer(final_answer_of(expert_episode(t, env)), t) == SOLVED for t in tasks)


def test_noisy_experts_solve_fewer_tasks():
    env, tasks = Environment(), make_tasks("train", 200, seed=1)
    noisy = Expert(wrong_arg=0.3, skip_step=0.2, seed=1)
    solved = sum(check_answer(final_answer_of(expert_episode(t, env, noisy)), t) == SOLVED for t in tasks)
    assert solved < 180


def test_groups_have_the_documented_chain_lengths_and_later_calls_use_earlier_results():
    env = Environment()
    for task in make_tasks("train", 300, seed=2):
        n = len(task.reference_chain)
        assert {1: n == 1, 2: 2 <= n <= 3, 3: 3 <= n <= 5}[task.group]
        if task.group > 1:
            seen = set()
            uses_earlier = False
            for tool, args in task.reference_chain:
                if any(str(v) in seen for v in args.values()) or any(
                        s in str(args.get("expression", "")) for s in seen if s.replace(".", "").isdigit()):
                    uses_earlier = True
                response = env.call(tool, args).response
                seen |= {str(v) for v in response.values() if not isinstance(v, (list, dict))}
            assert uses_earlier, task.query


def test_splits_share_no_entity_template_pair():
    keys = {}
    for split in ("train", "val", "test"):
        for t in make_tasks(split, 2000, seed=0):
            keys.setdefault(split, set()).add((t.kind, t.query))
    assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"] and not keys["val"] & keys["test"]
    # two-entity G3 types: the entity pair decides the split whatever the phrasing
    assert split_of("capital_population_diff", ("A", "B"), 0) == split_of("capital_population_diff", ("A", "B"), 2)


def task_with(facts):
    return Task("t", 1, "test", "q", [], "", facts, [], [])


@pytest.mark.parametrize("answer, facts, expected", [
    ("It is 18.5 C in Lorvik.", [18.5], SOLVED),              # units after the number
    ("18.5", [18.5], SOLVED),                                   # the bare number
    ("It costs 2017.44 DUQ.", [2017.436], SOLVED),              # rounding within tolerance
    ("Lorvik has 482,310 inhabitants.", [482310], SOLVED),      # thousands separators
    ("Lorvik has 482310.", [482310], SOLVED),                   # trailing period
    ("Lorvik has 4823100 inhabitants.", [482310], UNSOLVED),    # the right digits inside a wrong number
    ("Lorvik has 482300 inhabitants.", [482310], UNSOLVED),     # integers must match exactly
    ("The difference is -202020.", [-202020], SOLVED),          # negative numbers
    ("The difference is 202020.", [-202020], UNSOLVED),
    ("the CAPITAL is lorvik!", ["Lorvik"], SOLVED),             # case and punctuation
    ("The capital is The Ostkel", ["The Ostkel"], SOLVED),      # articles
    ("It is 18.5 C somewhere.", [18.5, "Lorvik"], UNSURE),      # some facts but not all
    ("Lorvikstad is nice", ["Lorvik"], UNSOLVED),               # whole words only
    ("anything", [], UNSURE),                                   # nothing to judge
])
def test_the_answer_checker_on_tricky_cases(answer, facts, expected):
    assert check_answer(answer, task_with(facts)) == expected


SAMPLE = os.path.join(os.path.dirname(__file__), "data", "toolbench_G2_sample.json")


def test_toolbench_import_names_apis_as_toolbench_and_mocks_their_templates():
    from tools import load_toolbench
    env, tasks = load_toolbench(SAMPLE)
    assert env.tool_names == ["get_museum_for_museum_finder", "forecast_for_sky_cast", "ping_for_empty_thing",
                              "ping_for_empty_thing_2"]                     # snake case, clash de-duplicated
    assert [t.group for t in tasks] == [2, 2] and tasks[0].relevant_tools == ["get_museum_for_museum_finder",
                                                                            "forecast_for_sky_cast"]
    schema = env.schemas(["forecast_for_sky_cast"])[0]
    assert schema["parameters"]["required"] == ["city", "days"]
    assert schema["parameters"]["properties"]["days"]["type"] == "number"
    museum = env.call("get_museum_for_museum_finder", {"name": "Ravenwood"})
    assert museum.ok and len(museum.response["exhibits"]) == 3                 # _list_length
    assert isinstance(museum.response["exhibits"][0]["year"], int)
    assert museum.text == env.call("get_museum_for_museum_finder", {"name": "Ravenwood"}).text
    assert museum.text != env.call("get_museum_for_museum_finder", {"name": "Other"}).text
    days = env.call("forecast_for_sky_cast", {"city": "R", "days": 2}).response["days"]
    assert len(days) == 2 and isinstance(days[0]["rain"], bool)               # nested list of objects
    assert env.call("ping_for_empty_thing", {}).response == {}                 # empty template
    assert not env.call("get_museum_for_museum_finder", {}).ok                # still validated
    assert check_answer("anything", tasks[0]) == UNSURE                      # no facts: cannot be judged


@pytest.mark.parametrize("content, message", [("[{\"query\": 1}]", "entry 0 needs"), ("{\"a\": 1}", "expected a JSON list"),
                                              ("[\n{", "not valid JSON")])
def test_a_broken_toolbench_file_names_the_file_and_the_problem(tmp_path, content, message):
    from tools import load_toolbench
    path = tmp_path / "queries.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as e:
        load_toolbench(str(path))
    assert str(path) in str(e.value)


def test_the_command_line_lists_samples_calls_and_solves():
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def run(*args):
        return subprocess.run([sys.executable, "-m", "tools", *args], cwd=root, capture_output=True, text=True)
    schemas = json.loads(run("list").stdout)
    assert len(schemas) == len(SCHEMAS)
    lines = run("sample", "--split", "test", "--n", "3", "--group", "2").stdout.splitlines()
    assert len(lines) == 3 and all(json.loads(x)["group"] == 2 for x in lines)
    assert json.loads(run("call", "calculator", '{"expression": "(2+3)*4"}').stdout)["response"]["result"] == 20.0
    bad = run("call", "get_weather", "{bad")
    assert bad.returncode == 2 and "not valid JSON" in bad.stderr
    solved = run("solve", "--split", "test", "--n", "120").stdout
    assert solved.count("100.0%") == 4
    assert "museum" in run("list", "--tasks", f"toolbench:{SAMPLE}").stdout

"""parse_action never raises, explains every failure, and round-trips every valid action."""
import json

from hypothesis import given, settings, strategies as st

from tools import format_action, parse_action

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
json_objects = st.dictionaries(st.text(min_size=1, max_size=12), json_scalars, max_size=5)
tool_names = st.from_regex(r"[a-z][a-z_]{0,20}", fullmatch=True)
thoughts = st.text(alphabet=st.characters(blacklist_characters="\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"),
                   max_size=40).filter(lambda s: "Action" not in s)


@settings(max_examples=1000, deadline=None)
@given(st.text(max_size=300))
def test_random_strings_never_raise_and_failures_say_why(text):
    action = parse_action(text)
    assert action.error or (action.tool and isinstance(action.args, dict))
    if action.error:
        assert action.error.startswith("Invalid action:")


@settings(max_examples=1000, deadline=None)
@given(thoughts, tool_names, json_objects)
def test_valid_actions_round_trip(thought, tool, args):
    action = parse_action(format_action(thought, tool, args))
    assert action.error == ""
    assert action.tool == tool
    assert action.args == json.loads(json.dumps(args))


@settings(max_examples=1000, deadline=None)
@given(thoughts, tool_names, json_objects, st.integers(0, 10**6), st.text(max_size=8), st.sampled_from(
    ["delete", "insert", "truncate", "duplicate"]))
def test_mutated_valid_actions_never_raise(thought, tool, args, where, junk, how):
    text = format_action(thought, tool, args)
    i = where % (len(text) + 1)
    text = {"delete": text[:i] + text[i + 1:], "insert": text[:i] + junk + text[i:], "truncate": text[:i],
            "duplicate": text + text}[how]
    action = parse_action(text)
    assert action.error or isinstance(action.args, dict)


def test_each_malformed_action_gets_its_own_message():
    cases = {
        "Thought: hmm, no action here": "missing 'Action",
        "Action: get_weather\n": "missing 'Action Input",
        'Action: get_weather\nAction Input: {"city": "Paris"': "not valid JSON",
        'Action: get_weather\nAction Input: ["Paris"]': "must be a JSON object",
        'Action: get_weather\nAction Input: {"city": "Paris"} and then some': "unexpected text after",
        'Action: Finish\nAction Input: {"final_answer": "3"}': "return_type",
        'Action: Finish\nAction Input: {"return_type": "give_answer"}': "final_answer",
    }
    for text, expected in cases.items():
        assert expected in parse_action(text).error, text
    assert "cut off" in parse_action('Action: get_weather\nAction Input: {"ci', truncated=True).error


def test_finish_with_an_answer_parses():
    action = parse_action('Thought: done\nAction: Finish\nAction Input: {"return_type": "give_answer", '
                          '"final_answer": "42"}')
    assert (action.tool, action.args["final_answer"], action.thought, action.error) == ("Finish", "42", "done", "")

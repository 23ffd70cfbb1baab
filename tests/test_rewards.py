"""Rewards on literal, hand-built trajectories; every expected number is worked out by hand in the comments."""
import dataclasses

import pytest

from rewards import (RewardConfig, contribution_lcs, contribution_reference, contribution_used, final_reward,
                     lcs_length, step_grained_reward, succ_calling)
from rollout import Episode, Step
from tools import Task, ToolResult

TASK = Task(id="t", group=2, split="test", query="What is the temperature in the capital of Norland?",
            tools=["get_country", "get_weather"], answer="It is 18.5 C in Lorvik.", facts=[18.5, "Lorvik"],
            relevant_tools=["get_country", "get_weather"], reference_chain=[])


def ok(tool, args, response):
    return Step(f"Action: {tool}", tool, args, "obs", True, "", ToolResult(True, "", response, "obs"))


def failed(tool, args, error):
    return Step(f"Action: {tool}", tool, args, error, False, error, ToolResult(False, error, None, error, invalid=True))


def finish(answer):
    return Step("Action: Finish", "Finish", {"return_type": "give_answer", "final_answer": answer}, "", True)


def episode(steps, answer=None, stop="finish"):
    return Episode(TASK, steps=steps, final_answer=answer, stop_reason=stop)


SOLVED_WITH_A_DETOUR = episode([
    ok("get_country", {"country": "Norland"},
       {"country": "Norland", "capital": "Lorvik", "currency": "NOX", "population": 123000}),
    failed("get_weather", {"town": "Lorvik"}, "missing required argument(s): city"),
    ok("get_weather", {"city": "Lorvik"}, {"city": "Lorvik", "temp_c": 18.5, "condition": "rain"}),
    finish("It is 18.5 C in Lorvik."),
], "It is 18.5 C in Lorvik.")

USELESS_CALL_WRONG_ANSWER = episode([
    ok("web_search", {"query": "weather"}, {"query": "weather", "results": [{"id": "r1", "title": "weather page"}]}),
    finish("It is 20 C."),
], "It is 20 C.")

NO_FINISH = episode([ok("get_country", {"country": "Norland"}, {"country": "Norland", "capital": "Lorvik"})],
                    None, "max_steps")


def test_step_grained_rewards_match_hand_computation():
    cfg = RewardConfig(alpha=0.5, scale=0.5, contribution="used")
    # step 0: succeeded (α·1 = 0.5), learned "Lorvik", used by a later call's arguments (Contribution 1):
    #         0.5 · (0.5 + 1) = 0.75
    # step 1: invalid call: SuccCalling 0, nothing learned: 0
    # step 2: succeeded, learned 18.5, which is in the final answer: 0.5 · (0.5 + 1) = 0.75
    # step 3: Finish, both facts (18.5 and Lorvik) present: IsSolved = 1
    assert step_grained_reward(SOLVED_WITH_A_DETOUR, cfg) == pytest.approx([0.75, 0.0, 0.75, 1.0])
    # step 0: succeeded, but nothing it learned ("r1", "weather page") reaches the answer: 0.5 · 0.5 = 0.25
    # step 1: 20 is not 18.5 and Lorvik is missing: IsSolved = 0
    assert step_grained_reward(USELESS_CALL_WRONG_ANSWER, cfg) == pytest.approx([0.25, 0.0])
    # no Finish: the one step is intermediate, its result used by nothing: 0.5 · 0.5 = 0.25, and no IsSolved
    assert step_grained_reward(NO_FINISH, cfg) == pytest.approx([0.25])


def test_alpha_and_scale_enter_the_formula_as_written():
    cfg = RewardConfig(alpha=1.0, scale=1.0)
    # r_t = α·SuccCalling + Contribution: 1 + 1 = 2 for steps 0 and 2, 0 for step 1
    assert step_grained_reward(SOLVED_WITH_A_DETOUR, cfg) == pytest.approx([2.0, 0.0, 2.0, 1.0])


def test_final_only_reward_puts_is_solved_on_the_last_step_and_zero_elsewhere():
    cfg = RewardConfig()
    assert final_reward(SOLVED_WITH_A_DETOUR, cfg) == [0.0, 0.0, 0.0, 1.0]
    assert final_reward(USELESS_CALL_WRONG_ANSWER, cfg) == [0.0, 0.0]
    assert final_reward(NO_FINISH, cfg) == [0.0]


def test_a_partly_right_answer_is_unsure_and_earns_half():
    half = episode([finish("It is 18.5 C somewhere.")], "It is 18.5 C somewhere.")
    assert step_grained_reward(half, RewardConfig()) == [0.5]
    assert final_reward(half, RewardConfig()) == [0.5]


def test_an_invalid_call_gets_succ_calling_zero_and_a_valid_one_one():
    steps = SOLVED_WITH_A_DETOUR.steps
    assert [succ_calling(s) for s in steps[:3]] == [1.0, 0.0, 1.0]


def test_contribution_ignores_values_the_agent_already_knew():
    # The response repeats the argument "Norland"; Norland in the answer is not a contribution.
    steps = [ok("get_country", {"country": "Norland"}, {"country": "Norland", "capital": "Lorvik"}),
             finish("Norland is a country.")]
    assert contribution_used(steps, 0, "Norland is a country.", TASK.query) == 0.0
    assert contribution_used(steps, 0, "The capital is Lorvik.", TASK.query) == 1.0


def test_lcs_length_on_textbook_examples():
    assert lcs_length("ABCBDAB", "BDCABA") == 4
    assert lcs_length("", "abc") == 0
    assert lcs_length("same", "same") == 4


def test_lcs_contribution_uses_the_ratio_threshold():
    steps = SOLVED_WITH_A_DETOUR.steps
    # Response of step 2 as text contains "lorvik" and "18.5" in order: LCS with the answer is long.
    assert contribution_lcs(steps, 2, "18.5 Lorvik", TASK.query, threshold=0.3) == 1.0
    # A failed step contributes nothing whatever the text.
    assert contribution_lcs(steps, 1, "Lorvik", TASK.query) == 0.0
    # "zzzz" shares nothing with any response.
    assert contribution_lcs(steps, 2, "zzzz", TASK.query) == 0.0
    cfg = RewardConfig(alpha=0.5, scale=0.5, contribution="lcs", lcs_threshold=0.3)
    assert step_grained_reward(SOLVED_WITH_A_DETOUR, cfg)[1] == 0.0


def test_reference_contribution_pays_the_solution_calls_once_and_not_a_wrong_argument():
    chain = [("get_country", {"country": "Norland"}), ("get_weather", {"city": "Lorvik"})]
    task = dataclasses.replace(TASK, reference_chain=chain)
    wrong_city = Episode(task, steps=[
        ok("get_country", {"country": "Norland"}, {"country": "Norland", "capital": "Lorvik"}),
        ok("get_weather", {"city": "Kalo"}, {"city": "Kalo", "temp_c": 5.3}),       # copied the wrong city
        finish("It is 5.3 C in Kalo."),
    ], final_answer="It is 5.3 C in Kalo.", stop_reason="finish")
    # "used" has it backwards. Step 0 learned Lorvik, which nothing later uses: 0.5·0.5 = 0.25. The wrong call
    # succeeded (α·1 = 0.5) and its 5.3 reached the answer (Contribution 1): 0.5·(0.5 + 1) = 0.75
    assert step_grained_reward(wrong_city, RewardConfig(contribution="used")) == pytest.approx([0.25, 0.75, 0.0])
    # "reference": get_country(Norland) is a call of the solution: 0.5·(0.5 + 1) = 0.75; get_weather(Kalo) is
    # not, only SuccCalling counts: 0.5·0.5 = 0.25; the answer has neither 18.5 nor Lorvik: IsSolved 0
    assert step_grained_reward(wrong_city, RewardConfig(contribution="reference")) == pytest.approx([0.75, 0.25, 0.0])
    # case and number formatting do not matter; a failed call and a repeat of a paid call earn nothing
    repeat = [ok("get_weather", {"city": "lorvik"}, {"temp_c": 18.5}),
              failed("get_weather", {"city": "Lorvik"}, "500 Internal Server Error"),
              ok("get_weather", {"city": "Lorvik"}, {"temp_c": 18.5})]
    assert [contribution_reference(repeat, t, chain) for t in range(3)] == [1.0, 0.0, 0.0]
    # a retry after a fault is the first success: paid
    retry = [repeat[1], repeat[2]]
    assert [contribution_reference(retry, t, chain) for t in range(2)] == [0.0, 1.0]

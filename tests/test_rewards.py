"""Rewards on literal, hand-built trajectories; every expected number is worked out by hand in the comments.
The defaults: α = 0.5, scale = 0.5, SuccCalling as a penalty, so
r_t = 0.5 · (0.5 · (SuccCalling − 1) + Contribution): a needed call 0.5, an unneeded one 0, a failed or repeated one
−0.25. Farming on real tasks: test_reward_farming.py."""
import dataclasses

import pytest

import rewards
from rewards import (REWARD_VERSION, RewardConfig, calls_reward, contribution_lcs, contribution_reference,
                     contributions_used, final_reward, lcs_length, step_grained_reward, succ_calling)
from rollout import Episode, Step
from test_judge import code_hash
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
    # step 0: succeeded (α·(1 − 1) = 0), learned "Lorvik", which the final answer names (Contribution 1):
    #         0.5 · (0 + 1) = 0.5
    # step 1: invalid call: SuccCalling 0, nothing learned: 0.5 · (0.5 · (0 − 1) + 0) = −0.25
    # step 2: succeeded, learned 18.5, which is in the final answer: 0.5 · (0 + 1) = 0.5
    # step 3: Finish, both facts (18.5 and Lorvik) present, committed, nothing else named: IsSolved = 1
    assert step_grained_reward(SOLVED_WITH_A_DETOUR, cfg) == pytest.approx([0.5, -0.25, 0.5, 1.0])
    # step 0: succeeded, but nothing it learned ("r1", "weather page") reaches the answer: 0.5 · (0 + 0) = 0
    # step 1: 20 is not 18.5 (and a number no call returned) and Lorvik is missing: IsSolved = 0
    assert step_grained_reward(USELESS_CALL_WRONG_ANSWER, cfg) == pytest.approx([0.0, 0.0])
    # no Finish: the one step is intermediate, its result used by nothing: 0.5 · (0 + 0) = 0, and no IsSolved
    assert step_grained_reward(NO_FINISH, cfg) == pytest.approx([0.0])


def test_alpha_and_scale_enter_the_formula_as_written():
    # penalty: r_t = α·(SuccCalling − 1) + Contribution: 0 + 1 = 1 for steps 0 and 2, 1·(0 − 1) + 0 = −1 for
    # step 1
    assert step_grained_reward(SOLVED_WITH_A_DETOUR, RewardConfig(alpha=1.0, scale=1.0)) == \
        pytest.approx([1.0, -1.0, 1.0, 1.0])
    # the paper's bonus: r_t = α·SuccCalling + Contribution: 1 + 1 = 2 for steps 0 and 2, 0 for step 1
    assert step_grained_reward(SOLVED_WITH_A_DETOUR, RewardConfig(alpha=1.0, scale=1.0, succ_calling="bonus")) == \
        pytest.approx([2.0, 0.0, 2.0, 1.0])
    with pytest.raises(ValueError, match="succ_calling must be one of"):
        step_grained_reward(SOLVED_WITH_A_DETOUR, RewardConfig(succ_calling="reward"))


def test_the_two_succ_calling_forms_differ_by_alpha_on_every_intermediate_step():
    for ep in (SOLVED_WITH_A_DETOUR, USELESS_CALL_WRONG_ANSWER, NO_FINISH):
        penalty = step_grained_reward(ep, RewardConfig())
        bonus = step_grained_reward(ep, RewardConfig(succ_calling="bonus"))
        n = len(ep.steps) - (ep.stop_reason == "finish")                       # intermediate steps
        assert [b - p for b, p in zip(bonus, penalty)] == pytest.approx([0.5 * 0.5] * n + [0.0] * (len(ep.steps) - n))


def test_the_papers_bonus_form_pays_an_unneeded_call_and_the_penalty_form_does_not():
    get_city = ok("get_city", {"city": "Lorvik"}, {"city": "Lorvik", "country": "Norland", "population": 482310})
    concise = episode([SOLVED_WITH_A_DETOUR.steps[0], SOLVED_WITH_A_DETOUR.steps[2], finish("It is 18.5 C in Lorvik.")],
                      "It is 18.5 C in Lorvik.")
    padded = episode(concise.steps[:2] + [get_city] + concise.steps[2:], concise.final_answer)
    # bonus: [0.75, 0.75, 1] -> 2.5 for the concise episode; the unneeded get_city learned only 482310 (Lorvik is
    # in its arguments, Norland in the query), which the answer does not name, yet it earns α·1·scale = 0.25: 2.75
    bonus = RewardConfig(succ_calling="bonus")
    assert sum(step_grained_reward(concise, bonus)) == pytest.approx(2.5)
    assert sum(step_grained_reward(padded, bonus)) == pytest.approx(2.75)
    # penalty: [0.5, 0.5, 1] -> 2.0 both, the unneeded call earns 0 (and its discount makes it a loss)
    assert sum(step_grained_reward(concise, RewardConfig())) == pytest.approx(2.0)
    assert step_grained_reward(padded, RewardConfig()) == pytest.approx([0.5, 0.5, 0.0, 1.0])


@pytest.mark.parametrize("rule", ["used", "lcs", "reference"])
def test_a_repeated_call_earns_neither_succ_calling_nor_contribution_under_every_rule(rule):
    chain = [("get_country", {"country": "Norland"}), ("get_weather", {"city": "Lorvik"})]
    weather = ok("get_weather", {"city": "Lorvik"}, {"city": "Lorvik", "temp_c": 18.5})
    ep = Episode(dataclasses.replace(TASK, reference_chain=chain),
                 steps=[SOLVED_WITH_A_DETOUR.steps[0], weather, dataclasses.replace(weather),
                        finish("It is 18.5 C in Lorvik.")],
                 final_answer="It is 18.5 C in Lorvik.", stop_reason="finish")
    # the repeat (step 2, same tool and arguments as the successful step 1): 0.5 · (0.5 · (0 − 1) + 0) = −0.25;
    # steps 0 and 1 are paid under every rule (their values are in the answer; they are the reference calls; their
    # responses share "lorvik"/"18.5" with the answer, LCS ratio ≥ 0.3): 0.5 · (0 + 1) = 0.5
    assert step_grained_reward(ep, RewardConfig(contribution=rule)) == pytest.approx([0.5, 0.5, -0.25, 1.0])
    # with the paper's bonus the repeat earns 0 instead of α·scale = 0.25
    assert step_grained_reward(ep, RewardConfig(contribution=rule, succ_calling="bonus"))[2] == 0.0


def test_the_calls_control_pays_a_constant_per_successful_fresh_call_on_top_of_is_solved():
    cfg = RewardConfig(call_bonus=0.2)
    # steps 0 and 2 succeeded: 0.2 each; step 1 failed: 0; Finish: IsSolved = 1
    assert calls_reward(SOLVED_WITH_A_DETOUR, cfg) == pytest.approx([0.2, 0.0, 0.2, 1.0])
    repeat = episode(SOLVED_WITH_A_DETOUR.steps[:1] * 2 + SOLVED_WITH_A_DETOUR.steps[3:], "It is 18.5 C in Lorvik.")
    assert calls_reward(repeat, cfg) == pytest.approx([0.2, 0.0, 1.0])          # a repeat is not paid
    assert calls_reward(NO_FINISH, cfg) == pytest.approx([0.2])                  # no Finish, no IsSolved
    assert calls_reward(SOLVED_WITH_A_DETOUR, RewardConfig()) == final_reward(SOLVED_WITH_A_DETOUR, RewardConfig())


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
    assert contributions_used(steps, "Norland is a country.", TASK.query) == [0.0, 0.0]
    assert contributions_used(steps, "The capital is Lorvik.", TASK.query) == [1.0, 0.0]
    # get_city(Lorvik) returns the country's name, a word of the query ("... capital of Norland?"): not learned
    steps = [ok("get_city", {"city": "Lorvik"}, {"city": "Lorvik", "country": "Norland", "population": 482310}),
             finish("...")]
    assert contributions_used(steps, "Lorvik is the capital of Norland.", TASK.query) == [0.0, 0.0]
    assert contributions_used(steps, "Lorvik has 482,310 inhabitants.", TASK.query) == [1.0, 0.0]


def test_contribution_flows_back_from_the_answer_through_the_calls_that_contribute():
    query = "What does one share of Kalo Corp cost in BEQ?"
    steps = [ok("get_stock_quote", {"ticker": "KALX"}, {"ticker": "KALX", "price": 121.1, "currency": "USD"}),
             ok("get_exchange_rate", {"base": "USD", "target": "BEQ"}, {"base": "USD", "target": "BEQ", "rate": 6.91}),
             ok("calculator", {"expression": "121.1 * 6.91"}, {"expression": "121.1 * 6.91", "result": 836.801}),
             finish("...")]
    # the calculator learned 836.801, which "836.8" rounds; it took 121.1 (step 0) and 6.91 (step 1) inside its
    # expression: all three contribute
    assert contributions_used(steps, "It costs 836.8 BEQ.", query, ("USD",)) == [1.0, 1.0, 1.0, 0.0]
    # an answer without the result: the calculator contributes nothing, so neither does what flowed into it; USD, a
    # constant of the task, does not credit get_stock_quote for feeding get_exchange_rate
    assert contributions_used(steps, "It costs 836 BEQ.", query, ("USD",)) == [0.0, 0.0, 0.0, 0.0]
    assert contributions_used(steps, "The rate is 6.91.", query, ("USD",)) == [0.0, 1.0, 0.0, 0.0]
    # without the constant, USD (learned by get_stock_quote) flows into get_exchange_rate, which contributes
    assert contributions_used(steps, "The rate is 6.91.", query) == [1.0, 1.0, 0.0, 0.0]


def test_a_value_credits_only_the_first_step_that_learned_it_and_never_a_failed_call():
    query = TASK.query
    steps = [ok("get_country", {"country": "Norland"}, {"country": "Norland", "capital": "Lorvik"}),
             ok("list_cities", {"country": "Norland"}, {"country": "Norland", "cities": ["Kalo", "Lorvik"]}),
             failed("get_weather", {"city": "Kalo"}, "500 Internal Server Error"),
             finish("...")]
    # Lorvik was learned by step 0; step 1 learned only Kalo, which reaches only a failed call
    assert contributions_used(steps, "The capital is Lorvik.", query) == [1.0, 0.0, 0.0, 0.0]
    assert contributions_used(steps, "It is Kalo.", query) == [0.0, 1.0, 0.0, 0.0]
    assert contributions_used(steps, "It is 20 C.", query) == [0.0, 0.0, 0.0, 0.0]   # Kalo only fed the failed call


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
    assert step_grained_reward(SOLVED_WITH_A_DETOUR, cfg)[1] == -0.25          # failed: 0.5 · (0.5 · (0 − 1) + 0)


def test_reference_contribution_pays_the_solution_calls_once_and_not_a_wrong_argument():
    chain = [("get_country", {"country": "Norland"}), ("get_weather", {"city": "Lorvik"})]
    task = dataclasses.replace(TASK, reference_chain=chain)
    wrong_city = Episode(task, steps=[
        ok("get_country", {"country": "Norland"}, {"country": "Norland", "capital": "Lorvik"}),
        ok("get_weather", {"city": "Kalo"}, {"city": "Kalo", "temp_c": 5.3}),       # copied the wrong city
        finish("It is 5.3 C in Kalo."),
    ], final_answer="It is 5.3 C in Kalo.", stop_reason="finish")
    # "used" has it backwards. Step 0 learned Lorvik, which nothing later uses: 0.5·(0 + 0) = 0. The wrong call
    # succeeded (α·(1 − 1) = 0) and its 5.3 reached the answer (Contribution 1): 0.5·(0 + 1) = 0.5
    assert step_grained_reward(wrong_city, RewardConfig(contribution="used")) == pytest.approx([0.0, 0.5, 0.0])
    # "reference": get_country(Norland) is a call of the solution: 0.5·(0 + 1) = 0.5; get_weather(Kalo) is
    # not: 0.5·(0 + 0) = 0; the answer has neither 18.5 nor Lorvik: IsSolved 0
    assert step_grained_reward(wrong_city, RewardConfig(contribution="reference")) == pytest.approx([0.5, 0.0, 0.0])
    # case and number formatting do not matter; a failed call and a repeat of a paid call earn nothing
    repeat = [ok("get_weather", {"city": "lorvik"}, {"temp_c": 18.5}),
              failed("get_weather", {"city": "Lorvik"}, "500 Internal Server Error"),
              ok("get_weather", {"city": "Lorvik"}, {"temp_c": 18.5})]
    assert [contribution_reference(repeat, t, chain) for t in range(3)] == [1.0, 0.0, 0.0]
    # a retry after a fault is the first success: paid
    retry = [repeat[1], repeat[2]]
    assert [contribution_reference(retry, t, chain) for t in range(2)] == [0.0, 1.0]


# Bump rewards.REWARD_VERSION with any change to what a reward function returns, then pin the new hash here.
PINNED_REWARD = {"flow-penalty-1": "5922a308222fd835"}


def test_the_reward_code_is_pinned_to_its_version():
    found = code_hash(rewards)
    assert PINNED_REWARD.get(REWARD_VERSION) == found, (
        f"rewards.py changed: bump rewards.REWARD_VERSION (now {REWARD_VERSION!r}) and pin the new hash in "
        f"tests/test_rewards.py: PINNED_REWARD = {{<new version>: {found!r}}}")

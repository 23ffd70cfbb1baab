"""The step-grained reward cannot be farmed: on real tasks of the large suite, with real tool responses (each call run
through the suite's Environment by rollout.execute, as in a rollout), the correct concise episode earns a strictly
higher return than the same episode padded with an unneeded call, with a repeated call, with the farmed values pasted
into the answer, or with a wrong answer; pasting the chain's own values into the answer gains nothing; the expert's
every reference call contributes. The paper's bonus form is farmable. Pure Python, about a second."""
import pytest

from advantages import AdvantageConfig
from rewards import REWARDS, RewardConfig, contributions_used
from rollout import Episode, execute
from tools import Action, expert_episode, make_suite, parse_action

LARGE = make_suite("large")
ENV = LARGE.environment()
WORLD = LARGE.world
GAMMA = AdvantageConfig().gamma                  # 0.99


def episode(task, calls, answer) -> Episode:
    """The episode of these calls, then Finish with `answer`: each step as rollout.execute records it."""
    steps = [execute(Action(tool, args), f"Action: {tool}", ENV) for tool, args in calls]
    assert all(s.success for s in steps)
    steps.append(execute(Action("Finish", {"return_type": "give_answer", "final_answer": answer}), "Finish", ENV))
    return Episode(task, steps=steps, final_answer=answer, stop_reason="finish")


def returns(ep, cfg=None) -> tuple[float, float]:
    """(discounted return sum of γ^t r_t, undiscounted return) of the step-grained reward (default: RewardConfig())."""
    rewards = REWARDS["step"](ep, cfg or RewardConfig())
    return sum(GAMMA ** t * r for t, r in enumerate(rewards)), sum(rewards)


def capital_cases():
    """A G1 capital task: the concise episode and its farmed variants, get_city(capital) being the unneeded call."""
    task = next(t for t in LARGE.tasks("test") if t.kind == "capital")
    country, = task.entities
    capital = WORLD.countries[country].capital
    city = WORLD.cities[capital]
    other = next(c for c in sorted(LARGE.worlds["test"].cities) if c != capital)
    chain, get_city = task.reference_chain, ("get_city", {"city": capital})
    return task, {
        "concise": episode(task, chain, task.answer),
        "unneeded": episode(task, chain + [get_city], task.answer),
        "repeated": episode(task, chain + [get_city, get_city], task.answer),
        "pasted": episode(task, chain + [get_city, get_city],
                          f"{task.answer} {capital} has {city.population} inhabitants, UTC offset {city.utc_offset}."),
        "wrong": episode(task, chain + [get_city, get_city], f"The capital of {country} is {other}."),
    }


def price_cases():
    """A G3 company_price_local task (search_company -> get_stock_quote -> get_exchange_rate(USD, code) ->
    calculator "price * rate"), search_person(CEO) being the unneeded call."""
    task = next(t for t in LARGE.tasks("test") if t.kind == "company_price_local")
    name, code = task.entities
    ceo = WORLD.people[WORLD.companies[name].ceo]
    chain, person = task.reference_chain, ("search_person", {"name": ceo.name})
    farmed = chain[:1] + [person, person] + chain[1:]
    return task, {
        "concise": episode(task, chain, task.answer),
        "unneeded": episode(task, chain[:1] + [person] + chain[1:], task.answer),
        "repeated": episode(task, farmed, task.answer),
        "pasted": episode(task, farmed, f"{task.answer} Its CEO {ceo.name} was born in {ceo.born_city} in "
                                        f"{ceo.birth_year}, a {ceo.profession}."),
        "wrong": episode(task, farmed, f"One share of {name} costs {WORLD.companies[name].price_usd} {code}."),
    }


@pytest.mark.parametrize("contribution", ["used", "reference"])
@pytest.mark.parametrize("cases", [capital_cases, price_cases])
def test_no_farmed_episode_earns_as_much_as_the_correct_concise_one(cases, contribution):
    task, eps = cases()
    cfg = RewardConfig(contribution=contribution)
    best, best_sum = returns(eps["concise"], cfg)
    for farm in ("unneeded", "repeated", "pasted", "wrong"):
        assert returns(eps[farm], cfg)[0] < best, (task.kind, farm, returns(eps[farm], cfg), best)
    # undiscounted, an unneeded call costs nothing (only its discount and the step budget), everything else costs
    assert returns(eps["unneeded"], cfg)[1] == pytest.approx(best_sum)
    for farm in ("repeated", "pasted", "wrong"):
        assert returns(eps[farm], cfg)[1] < best_sum, (task.kind, farm)


def test_the_capital_farming_cases_earn_the_hand_computed_rewards():
    _, eps = capital_cases()
    step = lambda name: REWARDS["step"](eps[name], RewardConfig())            # noqa: E731
    # get_country learned the capital, which the answer names: 0.5·(0.5·(1 − 1) + 1) = 0.5; Solved: 1
    assert step("concise") == pytest.approx([0.5, 1.0])
    # get_city(capital) learned the population and the UTC offset (the country is a word of the query): unused, 0
    assert step("unneeded") == pytest.approx([0.5, 0.0, 1.0])
    # its repeat earns neither part: 0.5·(0.5·(0 − 1) + 0) = −0.25
    assert step("repeated") == pytest.approx([0.5, 0.0, -0.25, 1.0])
    # the population pasted into the answer credits get_city (0.5) but is a second candidate: Unsolved, 0
    assert step("pasted") == pytest.approx([0.5, 0.5, -0.25, 0.0])
    # a wrong capital: nothing get_country learned reaches the answer (0), Unsolved
    assert step("wrong") == pytest.approx([0.0, 0.0, -0.25, 0.0])


def test_pasting_the_chains_own_values_into_the_answer_does_not_raise_the_return():
    task, eps = price_cases()
    values = [ENV.call(*call).response for call in task.reference_chain[1:]]
    shown = f"{values[0]['price']}, {values[1]['rate']}, {values[2]['result']}"        # "121.1, 6.91, 836.801"
    pasted = episode(task, task.reference_chain, f"{task.answer} ({shown})")
    assert returns(pasted) == returns(eps["concise"])


def test_every_reference_call_of_the_experts_episode_contributes():
    for task in LARGE.tasks("val") + LARGE.tasks("test"):
        history = expert_episode(task, ENV)
        ep = Episode(task, steps=[execute(parse_action(text), text, ENV) for text, _ in history],
                     final_answer=task.answer, stop_reason="finish")
        assert [(s.tool, s.args) for s in ep.steps[:-1]] == task.reference_chain
        used = contributions_used(ep.steps, ep.final_answer, task.query, task.constants)
        assert used == [1.0] * len(task.reference_chain) + [0.0], (task.kind, task.query, used)


def test_the_papers_bonus_form_pays_for_an_unneeded_call():
    bonus = RewardConfig(succ_calling="bonus")
    for cases in (capital_cases, price_cases):
        _, eps = cases()
        assert returns(eps["unneeded"], bonus)[0] > returns(eps["concise"], bonus)[0]

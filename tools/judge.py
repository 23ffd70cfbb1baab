"""The judge: IsSolved(q, a_T) of a final answer, `check_answer(final_answer, task)`.

Who calls it: rollout.py (Episode.solved, the pass rate), rewards.py (r_T = IsSolved; `mentions` for Contribution),
experiment.py (re-judging committed answers), tools/__main__.py.

Why a file of its own: the judge decides what RL maximises, so its behaviour is versioned (JUDGE_VERSION, pinned by a
hash of this code in tests/test_judge.py) and kept apart from the suite and the expert: a warm start is keyed by the
code that makes its demonstrations (sft.WARM_START_CODE), which this file is not part of, while every cached
evaluation is keyed by it. It needs no environment: each Task records its reference chain's values when it is built.
"""
from __future__ import annotations

import functools
import re

from .tasks import SOLVED, UNSOLVED, UNSURE, Task, make_suite
from .world import COMPANY_ENDINGS, FILM_ENDINGS, FIRST_NAMES, WORLD



JUDGE_VERSION = "strict-1"
"""The name of the judge's behaviour. Bump it with any change to what check_answer decides: tests/test_judge.py pins a
hash of the judge's code to it, and pass rates from two judges must never be compared as one."""

_GLUE = re.compile(r"(?<=\d)(?=[^\W\d_])|(?<=[^\W\d_])(?=\d)")      # a letter against a digit: "33.6C", "836.8BEQ"
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\w])")
_ARTICLES = re.compile(r"\b(the|a|an)\b")
_CODE = re.compile(r"\b[A-Z]{3,4}\b")                  # currency codes and tickers, as the tools write them
_NUMBER_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
                 "ten": 10}
HEDGES = frozenset("""not no never none nothing nobody neither nor cannot dont doesnt didnt isnt wasnt arent cant
    wont maybe perhaps possibly probably likely unlikely might may could either or unsure unknown uncertain unclear
    guess""".split())
"""Words (whole, any case) that take an answer's commitment away: negations, and hedges between candidates; so does
any word ending in n't (don't, isn't, can't)."""
_GENERIC = frozenset(w.lower() for w in FIRST_NAMES + FILM_ENDINGS + COMPANY_ENDINGS)     # words names share


@functools.lru_cache(maxsize=1 << 14)
def written_numbers(text: str) -> tuple[tuple[float, float], ...]:
    """The numbers written in `text`, each as (value, half a unit of its last written decimal place): "836.8" is
    (836.8, 0.05), "482,310" (482310, 0.5). A unit glued to a number is read apart ("33.6C" is 33.6); a minus after a
    number or ")" is an operator ("482310 - 302020" is two positive numbers)."""
    text, out = _GLUE.sub(" ", text), []
    for m in _NUMBER.finditer(text):
        written = m.group(0).replace(",", "")
        if written[0] == "-" and text[:m.start()].rstrip()[-1:] in tuple("0123456789)"):
            written = written[1:]
        out.append((float(written), 0.5 * 10.0 ** -len(written.partition(".")[2])))
    return tuple(out)


def rounds(written: tuple[float, float], value: float) -> bool:
    """Is `value` what the written number says, to its written precision? "836.8" rounds 836.801, "121" rounds 121.1."""
    x, half_unit = written
    return abs(x - value) <= half_unit * (1 + 1e-9)


@functools.lru_cache(maxsize=1 << 14)
def _normalise(text: str) -> str:
    text = re.sub(r"[^\w\s]", " ", _GLUE.sub(" ", text).lower())
    return " ".join(_ARTICLES.sub(" ", text).split())


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def mentions(text: str, value) -> bool:
    """Does `text` mention `value`? A number when a number written in the text rounds it; anything else as whole
    words of the normalised text (case, punctuation and articles aside). The judge and the reward read alike."""
    if _is_number(value):
        return any(rounds(w, value) for w in written_numbers(text))
    words = _normalise(str(value))
    return bool(words) and f" {words} " in f" {_normalise(text)} "


def hedged(text: str) -> bool:
    """Does the answer negate or hedge (HEDGES, or a word ending in n't)?"""
    words = re.findall(r"[a-z]+(?:'t)?", text.lower().replace("\u2019", "'"))
    return any(w in HEDGES or w.endswith("n't") for w in words)


@functools.lru_cache(maxsize=None)
def _entity_names() -> tuple[frozenset, frozenset]:
    """(name words, codes) of every world of the suites (WORLD and the large suite's): the words of each city,
    country, person, film and company name in lower case (first names and "Road", "Corp"... only in one-word names:
    they are shared), and the currency codes and tickers as written (some are English words in lower case: TOY,
    LAND)."""
    words, codes = set(), set()
    for world in [WORLD, *make_suite("large").worlds.values()]:
        for name in [*world.cities, *world.countries, *world.people, *world.films, *world.companies]:
            name_words = set(_normalise(name).split())
            words |= name_words if len(name_words) == 1 else name_words - _GENERIC
        codes |= set(world.currencies) | set(world.tickers)
    return frozenset(words), frozenset(codes)


def other_candidate(answer: str, task: Task) -> str:
    """What in the answer could be a second answer ("" if nothing): a number that neither rounds a value of the task's
    query or reference chain nor matches a fact, or an entity name of any world that neither the query, the chain
    nor a fact touches."""
    known, touched_words, touched_codes = _touched(task.query, (*task.chain_values, *task.facts))
    for written in written_numbers(answer):
        if not any(rounds(written, v) for v in known) and not any(_near(written[0], f) for f in task.facts):
            return f"the number {written[0]:g}"
    name_words, codes = _entity_names()
    others = (set(_normalise(answer).split()) & name_words) - touched_words
    others |= (set(_CODE.findall(_GLUE.sub(" ", answer))) & codes) - touched_codes
    return f"the name {sorted(others)[0]!r}" if others else ""


@functools.lru_cache(maxsize=1 << 16)
def _touched(query: str, values: tuple) -> tuple[tuple, frozenset, frozenset]:
    """What the query and the chain's values and facts make known: (numbers, name words, codes)."""
    strings = [query, *(v for v in values if isinstance(v, str))]
    numbers = [v for v in values if _is_number(v)] + [x for s in strings for x, _ in written_numbers(s)]
    query_words = _normalise(query).split()
    numbers += [n for w, n in _NUMBER_WORDS.items() if w in query_words]
    words = frozenset(w for s in strings for w in _normalise(s).split())
    return tuple(numbers), words, frozenset(c for s in strings for c in _CODE.findall(_GLUE.sub(" ", s)))


def _near(x: float, fact) -> bool:
    """Is the number x the numeric fact, within the facts' tolerance (integers exact; decimals ±0.011 + 0.01%)?"""
    if not _is_number(fact):
        return False
    return abs(x - fact) <= (0.5 if isinstance(fact, int) else 0.011 + 1e-4 * abs(fact))


def fact_present(fact, answer: str) -> bool:
    """Numbers: a number written in the answer within the facts' tolerance (_near). Strings: the normalised fact as
    whole words of the normalised answer."""
    if _is_number(fact):
        return any(_near(x, fact) for x, _ in written_numbers(answer))
    return mentions(answer, fact)


def check_answer(final_answer: str, task: Task) -> float:
    """IsSolved, the judge: SOLVED (1) when the answer commits to every fact, UNSURE (0.5) when it commits to some
    but not all, UNSOLVED (0) otherwise. IsSolved is the reward RL maximises, so an answer that spreads its bets
    must never score: listing candidates or hedging costs everything, not half.

    An answer commits when
      - it neither negates nor hedges: no word of HEDGES ("not", "no", "or", "maybe", "unsure", ...) nor any n't word,
        anywhere ("It is not 33.6 C; I do not know" and "Losel or Berlan" are UNSOLVED);
      - it names no other candidate (other_candidate): every number in it is a fact (within the facts' tolerance),
        a number of the query (digits or one..ten) or rounds a value the reference chain takes or returns (Task.
        chain_values: "836.8" for the calculator's 836.801, the share price on the way), and every entity name of
        any world of the suites in it is touched by the query, the chain or a fact (a list of all temperatures, of
        every year, of all cities: UNSOLVED). Values of the chain are allowed because showing one's work is not a
        second answer; anything else in a world the agent could have looked up is one;
      - it is not empty.
    A unit glued to a number reads as the number ("33.6C", "836.8BEQ"). A task with no facts (ToolBench imports)
    cannot be judged: UNSURE, unless the answer is empty or hedges."""
    answer = final_answer or ""
    if not answer.strip() or hedged(answer):
        return UNSOLVED
    if not task.facts:
        return UNSURE
    if other_candidate(answer, task):
        return UNSOLVED
    present = [fact_present(f, answer) for f in task.facts]
    return SOLVED if all(present) else UNSURE if any(present) else UNSOLVED

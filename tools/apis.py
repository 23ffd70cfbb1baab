"""The mocked APIs: OpenAI function schemas, deterministic implementations, one schema validator, a fault injector.

`Environment.call(name, args)` is the only entry point. It never raises and never evaluates its input:
  1. unknown tool / malformed arguments -> an error response (validated once here, against the schema);
  2. the tool runs on the seeded world (Environment's `world`, by default the tiny suite's WORLD); a value outside
     its domain -> an error response naming the value;
  3. the fault injector may replace the response by a timeout, server error, malformed or truncated body, empty
     result or rate limit (seeded: a pure function of the seed, the call and how often it was made before).
Responses are shaped like ToolBench's: {"error": "", "response": {...}}.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from .world import WORLD, World

MAX_OBSERVATION_CHARS = 1000


def _schema(tool_name, description, category, **params):
    """params: name -> (json type, description[, enum]); every parameter is required."""
    props = {}
    for p, spec in params.items():
        props[p] = {"type": spec[0], "description": spec[1]}
        if len(spec) > 2:
            props[p]["enum"] = spec[2]
    return {"name": tool_name, "description": description, "category": category,
            "parameters": {"type": "object", "properties": props, "required": list(params)}}


UNITS = {"C": "temperature", "F": "temperature", "K": "temperature", "km": "length", "mi": "length",
         "kg": "mass", "lb": "mass"}

SCHEMAS = {s["name"]: s for s in [
    _schema("get_city", "Facts about a city: country, population, UTC offset.", "geography",
            city=("string", "city name")),
    _schema("get_country", "Facts about a country: capital, currency, population.", "geography",
            country=("string", "country name")),
    _schema("list_cities", "Cities of a country.", "geography", country=("string", "country name")),
    _schema("get_weather", "Current weather in a city.", "weather", city=("string", "city name")),
    _schema("get_forecast", "Forecast for a city, 1 to 5 days ahead.", "weather",
            city=("string", "city name"), days=("integer", "days ahead, 1-5")),
    _schema("get_exchange_rate", "Exchange rate between two currency codes.", "finance",
            base=("string", "currency code, e.g. USD"), target=("string", "currency code")),
    _schema("get_stock_quote", "Latest stock price for a ticker, in USD.", "finance",
            ticker=("string", "stock ticker")),
    _schema("search_company", "Look up a company by name.", "finance", name=("string", "company name")),
    _schema("calculator", "Evaluate arithmetic with + - * / and parentheses.", "math",
            expression=("string", "e.g. (2 + 3) * 4")),
    _schema("convert_units", "Convert a value between units.", "math", value=("number", "the value"),
            from_unit=("string", "unit", list(UNITS)), to_unit=("string", "unit", list(UNITS))),
    _schema("get_local_time", "Local time for a UTC offset at a UTC time.", "calendar",
            utc_offset=("integer", "hours from UTC"), utc_time=("string", "HH:MM")),
    _schema("search_person", "Look up a person: birth city, birth year, profession.", "knowledge",
            name=("string", "full name")),
    _schema("search_film", "Look up a film: director, year, rating.", "knowledge", title=("string", "film title")),
    _schema("web_search", "Search the web; returns titles of pages.", "search", query=("string", "search words")),
]}


class ToolError(Exception):
    """A domain error inside a tool (unknown city, bad expression...): becomes an error response."""


# ----------------------------------------------------------------------------------------------------------------------
# Arithmetic without eval: a recursive-descent parser for + - * / ( ) and decimal numbers.


def calculate(expression: str) -> float:
    tokens, i = [], 0
    text = expression
    if not text.strip() or len(text) > 200:
        raise ToolError("expression must be 1-200 characters")
    while i < len(text):
        if text[i] in " \t":                     # spaces separate tokens ("7 7" is two numbers, an error)
            i += 1
        elif text[i] in "+-*/()":
            tokens.append(text[i])
            i += 1
        elif text[i].isdigit() or text[i] == ".":
            j = i
            while j < len(text) and (text[j].isdigit() or text[j] == "."):
                j += 1
            try:
                tokens.append(float(text[i:j]))
            except ValueError:
                raise ToolError(f"bad number {text[i:j]!r}") from None
            i = j
        else:
            raise ToolError(f"unexpected character {text[i]!r}; only numbers, + - * / and parentheses")
    pos = 0

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    def take():
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    def expr(depth=0):
        if depth > 50:
            raise ToolError("expression nested too deeply")
        value = term(depth)
        while peek() in ("+", "-"):
            value = value + term(depth) if take() == "+" else value - term(depth)
        return value

    def term(depth):
        value = factor(depth)
        while peek() in ("*", "/"):
            op, rhs = take(), factor(depth)
            if op == "/" and rhs == 0:
                raise ToolError("division by zero")
            value = value * rhs if op == "*" else value / rhs
        return value

    def factor(depth):
        tok = take() if peek() is not None else None
        if tok == "-":
            return -factor(depth)
        if tok == "(":
            value = expr(depth + 1)
            if peek() != ")":
                raise ToolError("missing ')'")
            take()
            return value
        if isinstance(tok, float):
            return tok
        raise ToolError("incomplete expression")

    result = expr()
    if pos != len(tokens):
        raise ToolError(f"unexpected {tokens[pos]!r}")
    return round(result, 4)


def convert(value: float, src: str, dst: str) -> float:
    if UNITS[src] != UNITS[dst]:
        raise ToolError(f"cannot convert {UNITS[src]} ({src}) to {UNITS[dst]} ({dst})")
    to_base = {"C": lambda v: v, "F": lambda v: (v - 32) * 5 / 9, "K": lambda v: v - 273.15,
               "km": lambda v: v, "mi": lambda v: v * 1.609344, "kg": lambda v: v, "lb": lambda v: v * 0.45359237}
    from_base = {"C": lambda v: v, "F": lambda v: v * 9 / 5 + 32, "K": lambda v: v + 273.15,
                 "km": lambda v: v, "mi": lambda v: v / 1.609344, "kg": lambda v: v, "lb": lambda v: v / 0.45359237}
    return round(from_base[dst](to_base[src](value)), 2)


def _lookup(table: dict, key: str, kind: str):
    if key not in table:
        raise ToolError(f"{kind} '{key}' not found")
    return table[key]


def _stable_int(*parts) -> int:
    return int.from_bytes(hashlib.sha256(json.dumps(parts).encode()).digest()[:8], "big")


def _forecast(world, city: str, days: int):
    c = _lookup(world.cities, city, "city")
    out = []
    for d in range(1, days + 1):
        h = _stable_int("forecast", city, d)
        out.append({"day": d, "temp_c": round(c.temp_c + (h % 61 - 30) / 10, 1),
                    "condition": ["sunny", "cloudy", "rain", "snow", "fog", "windy"][h % 6]})
    return {"city": city, "days": out}


def _local_time(utc_offset: int, utc_time: str):
    offset = utc_offset
    parts = utc_time.split(":")
    if len(parts) != 2 or not all(p.isdigit() and len(p) == 2 for p in parts):
        raise ToolError(f"utc_time must be HH:MM, got '{utc_time}'")
    h, m = int(parts[0]), int(parts[1])
    if h > 23 or m > 59 or not -12 <= offset <= 14:
        raise ToolError("time or offset out of range")
    total = (h * 60 + m + offset * 60) % (24 * 60)
    return {"utc_offset": offset, "local_time": f"{total // 60:02d}:{total % 60:02d}"}


def _web_search(query: str):
    h = _stable_int("search", query.lower())
    words = [w for w in query.split() if w.isalnum()][:4] or ["nothing"]
    return {"query": query, "results": [{"id": f"r{(h >> (8 * i)) % 1000}", "title": f"{' '.join(words)} - page {i + 1}"}
                                        for i in range(2)]}


def implementations(world) -> dict:
    """name -> function(**args) answering from `world` (a tools.world.World)."""
    return {
        "get_city": lambda city: (lambda c: {"city": c.name, "country": c.country, "population": c.population,
                                             "utc_offset": c.utc_offset})(_lookup(world.cities, city, "city")),
        "get_country": lambda country: (lambda c: {"country": c.name, "capital": c.capital, "currency": c.currency,
                                                   "population": c.population, "continent": c.continent})(
            _lookup(world.countries, country, "country")),
        "list_cities": lambda country: {"country": _lookup(world.countries, country, "country").name,
                                        "cities": sorted(c.name for c in world.cities.values()
                                                         if c.country == country)},
        "get_weather": lambda city: (lambda c: {"city": c.name, "temp_c": c.temp_c, "condition": c.condition,
                                                "humidity": c.humidity})(_lookup(world.cities, city, "city")),
        "get_forecast": lambda city, days: _forecast(world, city, days) if 1 <= days <= 5 else
        (_ for _ in ()).throw(ToolError("days must be between 1 and 5")),
        "get_exchange_rate": lambda base, target: {
            "base": base, "target": target,
            "rate": round(_lookup(world.currencies, target, "currency") /
                          _lookup(world.currencies, base, "currency"), 4)},
        "get_stock_quote": lambda ticker: (lambda c: {"ticker": c.ticker, "price": c.price_usd, "currency": "USD"})(
            _lookup(world.tickers, ticker, "ticker")),
        "search_company": lambda name: (lambda c: {"name": c.name, "ticker": c.ticker, "hq_city": c.hq_city,
                                                   "ceo": c.ceo})(_lookup(world.companies, name, "company")),
        "calculator": lambda expression: {"expression": expression, "result": calculate(expression)},
        "convert_units": lambda value, from_unit, to_unit: {"value": convert(value, from_unit, to_unit),
                                                            "unit": to_unit},
        "get_local_time": _local_time,
        "search_person": lambda name: (lambda p: {"name": p.name, "born_city": p.born_city, "birth_year": p.birth_year,
                                                  "profession": p.profession})(_lookup(world.people, name, "person")),
        "search_film": lambda title: (lambda f: {"title": f.title, "director": f.director, "year": f.year,
                                                 "rating": f.rating})(_lookup(world.films, title, "film")),
        "web_search": _web_search,
    }


# ----------------------------------------------------------------------------------------------------------------------
# Validation against the schema, done once for every tool


_TYPES = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,), "object": (dict,),
          "array": (list,)}


def validate(schema: dict, args) -> str:
    """Return "" if args fit the schema, else a message a model can learn from."""
    if not isinstance(args, dict):
        return "arguments must be a JSON object"
    params = schema["parameters"]
    props, required = params["properties"], params.get("required", [])
    missing = [p for p in required if p not in args]
    if missing:
        return f"missing required argument(s): {', '.join(missing)}"
    extra = [a for a in args if a not in props]
    if extra:
        return f"unexpected argument(s): {', '.join(map(str, extra))}; allowed: {', '.join(props)}"
    for name, value in args.items():
        spec = props[name]
        ok = isinstance(value, _TYPES.get(spec["type"], (object,))) and not (
            isinstance(value, bool) and spec["type"] in ("integer", "number"))
        if not ok:
            return f"argument '{name}' must be of type {spec['type']}, got {type(value).__name__}"
        if "enum" in spec and value not in spec["enum"]:
            return f"argument '{name}' must be one of {', '.join(map(str, spec['enum']))}"
        if isinstance(value, str) and len(value) > 200:
            return f"argument '{name}' is too long (max 200 characters)"
    return ""


# ----------------------------------------------------------------------------------------------------------------------
# Faults


FAULT_KINDS = ("timeout", "server_error", "malformed", "truncated", "empty", "rate_limit")


@dataclass
class FaultConfig:
    rate: float = 0.0
    """Probability that a call fails with a fault."""
    kinds: tuple = FAULT_KINDS
    """Which kinds can happen, drawn uniformly."""
    seed: int = 0


@dataclass
class ToolResult:
    ok: bool              # SuccCalling: valid call, tool answered without error
    error: str            # "" when ok
    response: object      # the parsed response (None when the body is malformed)
    text: str             # the observation the model sees (bounded length)
    fault: str = ""       # the injected fault kind, if any
    invalid: bool = False  # the call itself was invalid (unknown tool, bad arguments)


def _dump(error: str, response) -> str:
    text = json.dumps({"error": error, "response": response}, separators=(",", ":"), ensure_ascii=False)
    return text if len(text) <= MAX_OBSERVATION_CHARS else text[:MAX_OBSERVATION_CHARS - 14] + "...[truncated]"


class Environment:
    """The registry of tools. `tools`: name -> (schema, implementation); defaults to the mocked APIs above,
    answering from `world` (the tiny suite's WORLD unless given; tools.make_suite(...).environment() passes its own)."""

    def __init__(self, faults: FaultConfig | None = None, tools: dict | None = None, world: World = WORLD):
        if tools is None:
            answer = implementations(world)
            tools = {n: (SCHEMAS[n], answer[n]) for n in SCHEMAS}
        self.tools = tools
        self.faults = faults
        self.reset()

    def reset(self, seed: int | None = None):
        """Forget how often each call was made (and optionally reseed the faults): start of an iteration."""
        self._counts: dict[str, int] = {}
        if seed is not None and self.faults is not None:
            self.faults = FaultConfig(self.faults.rate, self.faults.kinds, seed)

    @property
    def tool_names(self) -> list[str]:
        return list(self.tools)

    def schemas(self, names=None) -> list[dict]:
        """OpenAI function-calling schemas (name, description, parameters) of these tools."""
        return [{k: v for k, v in self.tools[n][0].items() if k != "category"} for n in (names or self.tools)]

    def call(self, name, args) -> ToolResult:
        if not isinstance(name, str) or name not in self.tools:
            shown = ", ".join(self.tool_names[:20])
            msg = f"unknown tool '{name}'; available tools: {shown}"
            return ToolResult(False, msg, None, _dump(msg, ""), invalid=True)
        schema, fn = self.tools[name]
        problem = validate(schema, args)
        if problem:
            msg = f"invalid arguments for {name}: {problem}"
            return ToolResult(False, msg, None, _dump(msg, ""), invalid=True)
        try:
            response = fn(**args)
        except ToolError as e:
            msg = f"{name}: {e}"
            return ToolResult(False, msg, None, _dump(msg, ""), invalid=True)
        return self._fault(name, args, response) or ToolResult(True, "", response, _dump("", response))

    def _fault(self, name: str, args: dict, response) -> ToolResult | None:
        if self.faults is None or self.faults.rate <= 0:
            return None
        key = json.dumps([name, args], sort_keys=True)
        attempt = self._counts[key] = self._counts.get(key, 0) + 1
        h = _stable_int(self.faults.seed, key, attempt)
        if (h % 1_000_000) / 1_000_000 >= self.faults.rate:
            return None
        kind = self.faults.kinds[(h >> 24) % len(self.faults.kinds)]
        messages = {"timeout": "Timeout: the API did not answer in time", "server_error": "500 Internal Server Error",
                    "rate_limit": "429 Too Many Requests: rate limit exceeded, retry later"}
        if kind in messages:
            return ToolResult(False, messages[kind], None, _dump(messages[kind], ""), fault=kind)
        if kind == "empty":
            return ToolResult(False, "empty response", {}, _dump("", {}), fault=kind)
        body = _dump("", response)
        text = body[: len(body) // 2] if kind == "truncated" else body.replace('"', "'").replace(":", " ")[:-1]
        return ToolResult(False, f"{kind} response body", None, text, fault=kind)

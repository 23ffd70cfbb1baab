"""Import of ToolBench / StableToolBench query files as mocked tools and tasks.

Called by `python -m tools ... --tasks toolbench:FILE.json` and by `train.py --eval-only --tasks toolbench:FILE.json`.
A file is a JSON list of entries: `query`, `query_id`, `api_list` (each with `category_name`, `tool_name`,
`api_name`, `api_description`, `required_parameters`, `optional_parameters` as lists of {name, type, description,
default}, `method`, `template_response`) and `relevant APIs` (pairs [tool_name, api_name]).

Where this deviates from ToolBench / StableToolBench:
 1. No API server, real or simulated by an LLM: every API becomes a mocked tool whose response is generated from its
    `template_response`. Type names ("str", "int", "float", "bool", "NoneType", ...) become values drawn from a hash
    of (tool, canonical arguments, path in the template) — the same call always gives the same response, with no
    clock. Nested objects are followed; a list's length comes from its `_list_length` key (default 2, capped at 5,
    and at most MAX_NODES values per response). Empty or odd templates give {} or plain strings, never a crash.
 2. Names as ToolBench builds them: `{api_name}_for_{tool_name}` in lower snake case, cut to 64 characters (the
    OpenAI limit); a clash between different APIs gets a numeric suffix (`_2`, `_3`, ...).
 3. ToolBench types (STRING, NUMBER, INTEGER, BOOLEAN, ARRAY, OBJECT, ENUM, "DATE (YYYY-MM-DD)", ...) map to JSON
    types by their first word; unknown types are strings. Optional parameters are allowed but not required.
 4. Tasks carry no ground truth (facts == [], answer == ""): check_answer returns UNSURE for all of them, so an
    evaluation reports how many tasks it could judge (none here) next to the recall of the relevant APIs. Their
    reference chain calls the relevant APIs with the required parameters filled from `default` (or a placeholder of
    the right type); it exercises the tools, it is not a solution.
"""
from __future__ import annotations

import hashlib
import json
import os
import re

from .apis import Environment
from .tasks import Task

TYPES = {"string": "string", "str": "string", "enum": "string", "number": "number", "float": "number",
         "double": "number", "integer": "integer", "int": "integer", "boolean": "boolean", "bool": "boolean",
         "array": "array", "list": "array", "object": "object", "dict": "object"}
PLACEHOLDER = {"string": "example", "number": 1.0, "integer": 1, "boolean": True, "array": [], "object": {}}
MAX_LIST, MAX_NODES = 5, 200


def snake(text: str) -> str:
    """'Get Museum!' -> 'get_museum'."""
    return re.sub(r"[^a-z0-9]+", "_", str(text).lower()).strip("_") or "api"


def json_type(toolbench_type) -> str:
    """'STRING' -> 'string', 'DATE (YYYY-MM-DD)' -> 'string', 'NUMBER' -> 'number'."""
    words = str(toolbench_type or "string").lower().split()
    return TYPES.get(words[0] if words else "string", "string")


def _hash(*parts) -> int:
    return int.from_bytes(hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).digest()[:8], "big")


def fill(template, seed: int, path: str = "", budget: list | None = None):
    """A deterministic value of the template's shape; `budget` counts values left (guards nested-list blow-up)."""
    budget = [MAX_NODES] if budget is None else budget
    budget[0] -= 1
    if budget[0] < 0:
        return None
    if isinstance(template, dict):
        n = template.get("_list_length")
        body = {k: v for k, v in template.items() if k != "_list_length"}
        if isinstance(n, int) and not isinstance(n, bool):   # {"_list_length": 3, ...item...} -> 3 items
            return [fill(body, seed, f"{path}[{i}]", budget) for i in range(max(0, min(n, MAX_LIST)))]
        return {k: fill(v, seed, f"{path}.{k}", budget) for k, v in body.items()}
    if isinstance(template, list):
        if not template:
            return []
        item = template[0]
        if isinstance(item, dict) and "_list_length" in item:
            return fill(item, seed, path, budget)            # [{"_list_length": n, ...}] -> n items
        return [fill(item, seed, f"{path}[{i}]", budget) for i in range(2)]
    if not isinstance(template, str):                    # a literal number / bool / null in the template: keep it
        return template
    h = _hash(seed, path)
    name = template.strip().lower()
    if name in ("nonetype", "none", "null"):
        return None
    kind = TYPES.get(name)
    if kind == "integer":
        return h % 1000
    if kind == "number":
        return round((h % 100000) / 100, 2)
    if kind == "boolean":
        return bool(h % 2)
    if kind is None:                                     # a literal string in the template ("OK", "success")
        return template[:200]
    return f"{path.strip('.').split('.')[-1].split('[')[0] or 'value'}_{h % 10000}"


def _mock(name: str, template):
    """The tool's implementation. A closure, so a parameter can be called anything (even `name` or `template`)."""
    if isinstance(template, str) and template.strip()[:1] in ("{", "["):
        try:                                          # some files store the template as a JSON string
            template = json.loads(template)
        except json.JSONDecodeError:
            pass                                      # then it is a literal string response
    template = {} if template in (None, "", [], {}) else template

    def call(**args):
        return fill(template, _hash(name, args))
    return call


def _schema(name: str, api: dict, where: str) -> dict:
    props, required = {}, []
    for group, is_required in (("required_parameters", True), ("optional_parameters", False)):
        params = api.get(group) or []
        if not isinstance(params, list):
            raise ValueError(f"{where}: '{group}' must be a list")
        for p in params:
            if not isinstance(p, dict) or not p.get("name") or str(p["name"]) in props:
                continue                                  # nameless or repeated parameters are dropped
            props[str(p["name"])] = {"type": json_type(p.get("type")),
                                     "description": str(p.get("description") or "")[:200]}
            if is_required:
                required.append(str(p["name"]))
    return {"name": name, "description": str(api.get("api_description") or api.get("api_name") or "")[:300],
            "category": str(api.get("category_name") or ""),
            "parameters": {"type": "object", "properties": props, "required": required}}


def _example_args(schema: dict, api: dict) -> dict:
    """Required parameters filled from their `default` when it has the right type, else a placeholder."""
    defaults = {str(p.get("name")): p.get("default") for p in api.get("required_parameters") or []
                if isinstance(p, dict)}
    args = {}
    for p in schema["parameters"]["required"]:
        kind, value = schema["parameters"]["properties"][p]["type"], defaults.get(p)
        if kind in ("integer", "number") and isinstance(value, str):
            try:
                value = int(value) if kind == "integer" else float(value)
            except ValueError:
                value = None
        fits = {"string": str, "number": (int, float), "integer": int, "boolean": bool, "array": list,
                "object": dict}[kind]
        ok = isinstance(value, fits) and not (isinstance(value, bool) and kind != "boolean") and value != ""
        args[p] = value if ok and len(str(value)) <= 200 else PLACEHOLDER[kind]
    return args


def load_toolbench(path: str):
    """(Environment with one mocked tool per API, list of Task) from a ToolBench query file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such ToolBench query file")
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list of queries, got a JSON {type(entries).__name__}")
    group = next((int(g) for g in re.findall(r"G([123])", os.path.basename(path))), 0)
    tools, names, examples, tasks = {}, {}, {}, []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "query" not in entry or not isinstance(entry.get("api_list"), list):
            raise ValueError(f"{path}: entry {i} needs 'query' and an 'api_list' list")
        shown = []
        for j, api in enumerate(entry["api_list"]):
            if not isinstance(api, dict) or not api.get("api_name") or not api.get("tool_name"):
                raise ValueError(f"{path}: entry {i}, api_list[{j}] needs 'tool_name' and 'api_name'")
            key = (str(api["tool_name"]), str(api["api_name"]))
            if key not in names:
                name = base = snake(f"{key[1]}_for_{key[0]}")[:64]
                k = 2
                while name in tools:                       # a different API with the same snake-case name
                    name, k = f"{base[:64 - len(str(k)) - 1]}_{k}", k + 1
                names[key] = name
                schema = _schema(name, api, f"{path}: entry {i}, api_list[{j}]")
                tools[name] = (schema, _mock(name, api.get("template_response")))
                examples[name] = _example_args(schema, api)
            if names[key] not in shown:
                shown.append(names[key])
        pairs = entry.get("relevant APIs") or []
        if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
            raise ValueError(f"{path}: entry {i}: 'relevant APIs' must be a list of [tool_name, api_name] pairs")
        relevant = [n for n in dict.fromkeys(names.get((str(t), str(a))) for t, a in pairs) if n in shown]
        chain = [(n, dict(examples[n])) for n in relevant]
        tasks.append(Task(str(entry.get("query_id", i)), group, "toolbench", str(entry["query"]), shown, "", [],
                          relevant, chain, "toolbench"))
    return Environment(tools=tools), tasks

"""Import of ToolBench / StableToolBench query files as mocked tools and tasks.

A file is a JSON list of entries: `query`, `query_id`, `api_list` (each with `category_name`, `tool_name`,
`api_name`, `api_description`, `required_parameters`, `optional_parameters` as lists of {name, type, description,
default}, `method`, `template_response`) and `relevant APIs` (pairs [tool_name, api_name]).

Choices:
 1. Every API becomes a tool named as ToolBench does, `{api_name}_for_{tool_name}` in lower snake case; a clash gets
    a numeric suffix. Required parameters are required; ToolBench types map to JSON types (unknown -> string).
 2. The response is generated from `template_response`: type names ("str", "int", "float", "bool", ...) become
    values drawn from a hash of (tool, arguments, path) — the same call always gives the same response; nested
    objects and lists are followed, a list's length comes from a `_list_length` key (default 2, at most 5). Empty or
    odd templates give {} instead of failing.
 3. Tasks carry no ground-truth facts (facts == []): their pass rate cannot be judged here (check_answer -> UNSURE);
    evaluation reports how many tasks it could judge, and the recall of the relevant APIs.
"""
from __future__ import annotations

import hashlib
import json
import os
import re

from .apis import Environment
from .tasks import Task

TYPES = {"string": "string", "str": "string", "number": "number", "float": "number", "integer": "integer",
         "int": "integer", "boolean": "boolean", "bool": "boolean", "array": "array", "list": "array",
         "object": "object", "dict": "object"}


def snake(text: str) -> str:
    return re.sub(r"_+", "_", re.sub(r"[^a-z0-9]+", "_", str(text).lower())).strip("_") or "api"


def _hash(*parts) -> int:
    return int.from_bytes(hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).digest()[:8], "big")


def fill(template, seed: int, path: str = ""):
    """A deterministic value of the template's shape."""
    if isinstance(template, dict):
        n = template.get("_list_length")
        body = {k: v for k, v in template.items() if k != "_list_length"}
        if isinstance(n, int):                       # {"_list_length": 3, ...item template...} -> a list of items
            return [fill(body, seed, f"{path}[{i}]") for i in range(max(0, min(n, 5)))]
        return {k: fill(v, seed, f"{path}.{k}") for k, v in body.items()}
    if isinstance(template, list):
        if not template:
            return []
        item = template[0]
        if isinstance(item, dict) and isinstance(item.get("_list_length"), int):
            return fill(item, seed, path)            # [{"_list_length": n, ...}] -> n items
        return [fill(item, seed, f"{path}[{i}]") for i in range(2)]
    h = _hash(seed, path)
    kind = TYPES.get(str(template).strip().lower(), "string") if isinstance(template, str) else "string"
    if kind == "integer":
        return h % 1000
    if kind == "number":
        return round((h % 100000) / 100, 2)
    if kind == "boolean":
        return bool(h % 2)
    return f"{path.strip('.').split('.')[-1] or 'value'}_{h % 10000}"


def _schema(name: str, api: dict) -> dict:
    props, required = {}, []
    for group, is_required in (("required_parameters", True), ("optional_parameters", False)):
        for p in api.get(group) or []:
            if not isinstance(p, dict) or not p.get("name"):
                continue
            props[p["name"]] = {"type": TYPES.get(str(p.get("type", "string")).lower(), "string"),
                                "description": str(p.get("description", ""))[:200]}
            if is_required:
                required.append(p["name"])
    return {"name": name, "description": str(api.get("api_description") or api.get("api_name", ""))[:300],
            "category": api.get("category_name", ""),
            "parameters": {"type": "object", "properties": props, "required": required}}


def load_toolbench(path: str):
    """(Environment with one mocked tool per API, list of Task) from a ToolBench query file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such ToolBench query file")
    try:
        with open(path) as f:
            entries = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list of queries")
    group = next((int(g) for g in re.findall(r"G([123])", os.path.basename(path))), 0)
    tools, names, tasks = {}, {}, []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "query" not in entry or not isinstance(entry.get("api_list"), list):
            raise ValueError(f"{path}: entry {i} needs 'query' and an 'api_list' list")
        shown = []
        for api in entry["api_list"]:
            key = (api.get("tool_name", ""), api.get("api_name", ""))
            if key not in names:
                name = snake(f"{key[1]}_for_{key[0]}")
                base, k = name, 2
                while name in tools:
                    name, k = f"{base}_{k}", k + 1
                names[key] = name
                template = api.get("template_response")
                tools[name] = (_schema(name, api),
                               lambda _n=name, _t=template, **args: fill(_t if _t not in (None, "") else {},
                                                                         _hash(_n, args)))
            shown.append(names[key])
        relevant = [names[tuple(p)] for p in entry.get("relevant APIs", []) if tuple(p) in names]
        chain = [(n, {p: "value" for p in tools[n][0]["parameters"]["required"]}) for n in relevant]
        tasks.append(Task(str(entry.get("query_id", i)), group, "toolbench", str(entry["query"]), shown, "", [],
                          relevant, chain, "toolbench"))
    return Environment(tools=tools), tasks

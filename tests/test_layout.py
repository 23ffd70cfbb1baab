"""The teaching floor stays readable: files and the two functions a reader forks stay within their sizes, and no
private PyTorch op or libc call appears in the files a reader studies. Speed work goes to cpu_speed.py (the fast floor),
applied to the plain model and loop from outside behind one switch (--cpu-speed). Parsed with ast, not regexes, so
a comment that names an op is fine."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_FLOOR = "speed work goes to cpu_speed.py (the fast floor, behind --cpu-speed), not into the teaching floor"

MAX_LINES = {"model.py": 450, "train.py": 350, "ppo.py": 300, "rollout.py": 380, "rewards.py": 300}
MAX_FUNCTION = {("ppo.py", "ppo_update"): (50, 4), ("train.py", "main"): (100, None)}   # (lines, nesting depth)
TEACHING_FLOOR = ["model.py", "ppo.py", "train.py", "rollout.py", "rewards.py", "advantages.py", "batching.py",
                  "sft.py", "hf.py", "evaluation.py"]
BLOCKS = (ast.For, ast.AsyncFor, ast.While, ast.If, ast.With, ast.AsyncWith, ast.Try)


def parse(name):
    with open(os.path.join(ROOT, name)) as f:
        return ast.parse(f.read(), name)


def depth(node) -> int:
    """Nesting depth of for/while/if/with/try blocks under `node`; an `elif` is not a level of its own."""
    deepest = 0
    for child in ast.iter_child_nodes(node):
        elif_ = isinstance(node, ast.If) and isinstance(child, ast.If) and node.orelse == [child]
        deepest = max(deepest, depth(child) + (isinstance(child, BLOCKS) and not elif_))
    return deepest


@pytest.mark.parametrize("name, limit", sorted(MAX_LINES.items()))
def test_each_file_a_reader_studies_stays_within_its_length(name, limit):
    with open(os.path.join(ROOT, name)) as f:
        n = len(f.read().splitlines())
    assert n <= limit, f"{name} has {n} lines, more than {limit}: split it by concern, or {FAST_FLOOR}"


@pytest.mark.parametrize("name, function", sorted(MAX_FUNCTION))
def test_the_update_and_the_training_loop_stay_short_and_flat(name, function):
    max_lines, max_depth = MAX_FUNCTION[name, function]
    node = next(n for n in parse(name).body if isinstance(n, ast.FunctionDef) and n.name == function)
    lines = node.end_lineno - node.lineno + 1
    assert lines <= max_lines, f"{name}:{function} has {lines} lines, more than {max_lines}: move a part into a " \
                               f"named function above it, or {FAST_FLOOR}"
    if max_depth is not None:
        assert depth(node) <= max_depth, f"{name}:{function} nests {depth(node)} blocks deep, more than {max_depth}"


def private_torch_and_libc(tree) -> list[str]:
    """What the teaching floor must not use: torch.ops.*, aten._* (private ops), ctypes (libc calls)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            if node.attr == "ops" and isinstance(node.value, ast.Name) and node.value.id == "torch":
                found.append(f"torch.ops (line {node.lineno})")
            if node.attr.startswith("_") and isinstance(node.value, ast.Attribute) and node.value.attr == "aten":
                found.append(f"aten.{node.attr} (line {node.lineno})")
        elif isinstance(node, ast.Import) and any(a.name.split(".")[0] == "ctypes" for a in node.names):
            found.append(f"import ctypes (line {node.lineno})")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("ctypes", "torch.ops"):
            found.append(f"from {node.module} import (line {node.lineno})")
    return found


@pytest.mark.parametrize("name", TEACHING_FLOOR)
def test_the_teaching_floor_uses_no_private_torch_op_and_no_libc_call(name):
    found = private_torch_and_libc(parse(name))
    assert not found, f"{name} uses {', '.join(found)}: {FAST_FLOOR}"


def test_the_guard_sees_private_ops_and_libc_calls_in_code_but_not_in_comments():
    code = ("import ctypes\nx = torch.ops.mkldnn._linear_pointwise\ny = torch.ops.aten._scaled_dot_product_flash\n"
            "# torch.ops.aten._foo in a comment is fine\n")
    assert len(private_torch_and_libc(ast.parse(code))) == 4    # import, two torch.ops, one aten._
    assert private_torch_and_libc(ast.parse("# torch.ops.aten._foo, ctypes\ns = 'torch.ops'\n")) == []
    assert depth(ast.parse("if a:\n    pass\nelif b:\n    for x in y:\n        with z:\n            pass\n")) == 3

"""Batched multi-step rollouts of a policy against the mocked tools, and their evaluation.

Who calls it: sft.py (the scripted expert's demonstrations, ScriptedPolicy), train.py and evaluation.py (RL rollouts,
evaluation), offline.py (Episode, Step for offline rows), bench.py; cpu_speed.ModelPolicy is ModelPolicy with the
shared prompt computed once and packed decode weights. Its episodes become tensors in batching.collate.

One episode is a ReAct conversation rendered in a chat template:

    <|im_start|>system ... tool schemas ...<|im_end|>\n<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n
    Thought: ...\nAction: tool\nAction Input: {...}<|im_end|>          <- step 0, sampled (action_mask 1)
    \n<|im_start|>function\n{observation}<|im_end|>\n<|im_start|>assistant\n   <- forced tokens (action_mask 0)
    Thought: ...\nAction: Finish\nAction Input: {"return_type": "give_answer", "final_answer": "..."}<|im_end|>

B episodes run in lock-step: one batched `decode` samples the next action of every live episode, actions are parsed
(tools.parse_action, the format's one home) and executed, and each observation is appended with `extend`, so
decoding continues from the KV cache and the prefix is never recomputed. Finished episodes leave the batch
(`KVCache.keep`).

Choices and deviations (numbered, as the paper leaves them open):
 1. Token ids are the ones the policy sampled; observations are tokenised on their own and appended. Text is never
    re-tokenised across turns (re-tokenising would silently change the ids and break the PPO ratio).
 2. A step that fails to parse (no Action, bad JSON, extra text, truncation) is still a step: it gets an error
    observation telling the model what was wrong, SuccCalling 0, and the episode goes on.
 3. `step_id` marks a step's action tokens *and* the observation that follows them; the prompt is -1. The value of
    the state before step t is read at the token just before the step's first action token (advantages.py).
 4. Pass rate counts Solved only (IsSolved == 1); Unsure (0.5) is reported separately. An invalid action is one
    that did not parse or that the tools rejected (unknown tool, bad arguments, value outside the domain); an
    injected fault is not the agent's fault and does not count.
"""
from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

import torch
from tqdm import tqdm

from model import KVCache, decode, extend
from tools import SOLVED, Action, check_answer, parse_action, relevant_tool_recall

# ----------------------------------------------------------------------------------------------------------------------
# Conversation format


@dataclass(frozen=True)
class ChatTemplate:
    """How turns are rendered. `end_of_turn` closes every turn and is the policy's stop token."""
    name: str
    prompt: str          # format(system=..., user=...): everything up to the opening of the first assistant turn
    observation: str     # format(observation=...): the tool turn and the opening of the next assistant turn
    end_of_turn: str


TEMPLATES = {
    "chatml": ChatTemplate(
        "chatml",
        "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n",
        "\n<|im_start|>function\n{observation}<|im_end|>\n<|im_start|>assistant\n",
        "<|im_end|>"),
    "llama3": ChatTemplate(
        "llama3",
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        "<|start_header_id|>ipython<|end_header_id|>\n\n{observation}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "<|eot_id|>"),
}

SYSTEM_PROMPT = (
    "You can call these tools:\n{tools}\n"
    "Answer with Thought, Action and Action Input (a JSON object). When done, use Action: Finish with "
    '{{"return_type": "give_answer", "final_answer": "..."}}.')


def compact_schema(schema: dict) -> str:
    """One line per tool: `name(arg: type, ...) - description`. The same facts as the JSON schema in ~40% of the
    tokens (all parameters are required in the mocked APIs; enums are listed)."""
    props = schema["parameters"]["properties"]
    args = ", ".join(f"{k}: {v['type']}" + (f" [{'|'.join(map(str, v['enum']))}]" if "enum" in v else "")
                     for k, v in props.items())
    return f"{schema['name']}({args}) - {schema['description']}"


SCHEMA_FORMATS = {"json": lambda s: json.dumps(s, separators=(",", ":")), "compact": compact_schema}


def system_prompt(env, task, schema_format: str = "compact") -> str:
    return SYSTEM_PROMPT.format(tools="\n".join(map(SCHEMA_FORMATS[schema_format], env.schemas(task.tools))))


# ----------------------------------------------------------------------------------------------------------------------
# Episode records


@dataclass
class Step:
    action_text: str
    tool: str | None
    args: dict | None
    observation: str          # what the model saw next ("" after Finish)
    success: bool             # SuccCalling: parsed, known tool, valid arguments, no error
    error: str = ""
    result: object = None     # the tools.ToolResult, when a tool ran


@dataclass
class Episode:
    task: object
    token_ids: list = field(default_factory=list)
    action_mask: list = field(default_factory=list)   # 1 on tokens the policy generated
    step_id: list = field(default_factory=list)       # step of each token (action + its observation); -1 = prompt
    logprobs: list = field(default_factory=list)      # sampling log-prob on action tokens, 0.0 elsewhere
    steps: list = field(default_factory=list)
    final_answer: str | None = None
    stop_reason: str = ""     # finish | give_up | max_steps | token_budget
    rewards: list = field(default_factory=list)       # one per step, filled by rewards.py

    def append(self, ids, is_action: bool, step: int, logprobs=None):
        self.token_ids += ids
        self.action_mask += [int(is_action)] * len(ids)
        self.step_id += [step] * len(ids)
        self.logprobs += list(logprobs) if logprobs is not None else [0.0] * len(ids)

    @property
    def solved(self) -> float:
        return check_answer(self.final_answer or "", self.task)


@dataclass
class RolloutConfig:
    template: str = "chatml"
    """Chat template (TEMPLATES: chatml | llama3) of the SFT demonstrations, the from-scratch tokenizer's special
    tokens and the rollouts."""
    schema_format: str = "compact"
    """How the system prompt lists tools: "compact" signatures or OpenAI "json"."""
    max_steps: int = 8
    """Tool calls + Finish per episode (the longest reference chain is 5 calls + Finish)."""
    max_action_tokens: int = 96
    """Tokens per step (action)."""
    max_total_tokens: int = 1536
    """Prompt + all steps + observations."""
    max_obs_tokens: int = 192
    """Observation tokens beyond this are cut (bounds memory and the KV cache)."""
    temperature: float = 0.7
    """Sampling temperature of the RL rollouts (0 = greedy; evaluation is always greedy). PPO's ratio uses the same
    temperature (train.py passes it to ppo_update)."""
    top_k: int = 0
    """Sample among the k most likely tokens only (0 = all)."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of tokens with mass >= top_p (1 = all)."""


# ----------------------------------------------------------------------------------------------------------------------
# Policies: a model with a KV cache, or a script. Both produce token ids for every live episode.


class ModelPolicy:
    """Samples actions from `model`, keeping one KV cache across the steps of the batch. cpu_speed.ModelPolicy is the
    same with the prompt the batch shares computed once and decode matmuls on packed weights."""

    def __init__(self, model, tokenizer, cfg: RolloutConfig, generator: torch.Generator | None = None):
        self.model, self.cfg, self.generator = model, cfg, generator
        self.stop_ids = [tokenizer.token_to_id(TEMPLATES[cfg.template].end_of_turn)]

    def running(self):                               # the scope of one rollout
        return nullcontext()

    def slots(self, prompt_len: int) -> int:
        """Cache slots in the worst case: every step appends the batch's longest action and longest observation
        (shorter rows leave masked holes), so the bound is per step, not per row."""
        return prompt_len + self.cfg.max_steps * (self.cfg.max_action_tokens + self.cfg.max_obs_tokens + 16)

    def start(self, prompts: list[list[int]]):
        p = next(self.model.parameters())
        self.cache = KVCache(self.model.config, len(prompts), self.slots(max(map(len, prompts))), p.device, p.dtype)
        self.last_logits = extend(self.model, self.cache, prompts)                       # (B, V)

    def act(self, episodes, budgets):
        return decode(self.model, self.cache, self.last_logits, torch.tensor(budgets), self.stop_ids,
                      temperature=self.cfg.temperature, top_k=self.cfg.top_k, top_p=self.cfg.top_p,
                      generator=self.generator)

    def keep(self, rows: list[int]):
        self.cache.keep(torch.tensor(rows, device=self.cache.valid.device))

    def observe(self, chunks: list[list[int]]):
        self.last_logits = extend(self.model, self.cache, chunks)


class ScriptedPolicy:
    """Drives the same loop with a script (the tools' expert): act(task, history) -> action text."""

    def __init__(self, script, tokenizer, cfg: RolloutConfig):
        self.script, self.tokenizer = script, tokenizer
        self.eot = [tokenizer.token_to_id(TEMPLATES[cfg.template].end_of_turn)]

    def running(self):
        return nullcontext()

    def start(self, prompts):
        pass

    def act(self, episodes, budgets):
        tokens = []
        for ep, budget in zip(episodes, budgets):
            text = self.script.act(ep.task, [(s.action_text, s.result) for s in ep.steps])
            tokens.append((self.tokenizer.encode(text) + self.eot)[:budget])
        return tokens, [[0.0] * len(t) for t in tokens]

    def keep(self, rows):
        pass

    def observe(self, chunks):
        pass


# ----------------------------------------------------------------------------------------------------------------------
# The loop


def error_observation(message: str) -> str:
    return json.dumps({"error": message, "response": ""})


@torch.no_grad()
def rollout(policy, tasks, env, tokenizer, cfg: RolloutConfig) -> list[Episode]:
    """Run len(tasks) episodes in lock-step until each finishes, runs out of steps, or out of tokens."""
    template = TEMPLATES[cfg.template]
    eot_id = tokenizer.token_to_id(template.end_of_turn)
    episodes = [Episode(task) for task in tasks]
    for ep in episodes:
        prompt = template.prompt.format(system=system_prompt(env, ep.task, cfg.schema_format), user=ep.task.query)
        ep.append(tokenizer.encode(prompt), False, -1)
    live = list(range(len(episodes)))                           # episode index of each policy row
    with policy.running():
        policy.start([episodes[i].token_ids for i in live])
        for step in range(cfg.max_steps):
            budgets = [max(1, min(cfg.max_action_tokens, cfg.max_total_tokens - len(episodes[i].token_ids)))
                       for i in live]
            tokens, logprobs = policy.act([episodes[i] for i in live], budgets)
            keep, chunks = [], []
            for row, i in enumerate(live):
                ep, ids = episodes[i], tokens[row]
                ep.append(ids, True, step, logprobs[row])
                stopped = len(ids) > 0 and ids[-1] == eot_id
                text = tokenizer.decode(ids[:-1] if stopped else ids)
                ep.steps.append(step_record := execute(parse_action(text, truncated=not stopped), text, env))
                if step_record.tool == "Finish" and step_record.success:
                    ep.final_answer = step_record.args.get("final_answer", "")
                    ep.stop_reason = "finish" if step_record.args["return_type"] == "give_answer" else "give_up"
                    continue
                obs_ids = observation_ids(tokenizer, template, step_record.observation, cfg.max_obs_tokens)
                if len(ep.token_ids) + len(obs_ids) + 8 > cfg.max_total_tokens:
                    ep.stop_reason = "token_budget"
                    continue
                if step == cfg.max_steps - 1:
                    ep.stop_reason = "max_steps"
                    continue
                ep.append(obs_ids, False, step)
                keep.append(row)
                chunks.append(obs_ids)
            if not keep:
                break
            if len(keep) < len(live):                                  # finished episodes leave the batch
                policy.keep(keep)
            live = [live[r] for r in keep]
            policy.observe(chunks)
    return episodes


def observation_ids(tokenizer, template: ChatTemplate, observation: str, max_tokens: int) -> list[int]:
    """The tool turn as forced tokens: template opening + observation (cut to max_tokens) + template closing."""
    before, after = template.observation.split("{observation}")
    return tokenizer.encode(before) + tokenizer.encode(observation)[:max_tokens] + tokenizer.encode(after)


def execute(action: Action, text: str, env) -> Step:
    """Run a parsed action: a tool call through the environment (which validates it), or Finish."""
    if action.error:
        return Step(text, action.tool, action.args, error_observation(action.error), False, action.error)
    if action.tool == "Finish":
        return Step(text, "Finish", action.args, "", True)
    result = env.call(action.tool, action.args)
    return Step(text, action.tool, action.args, result.text, result.ok, result.error, result)


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation


def episode_metrics(episodes: list[Episode]) -> dict:
    """Pass rate (Solved), Unsure rate, recall of relevant tools, average steps, invalid-action rate, and under
    injected faults how often a call hit one and how often the model retried the same call next; per difficulty
    group and overall."""
    def summarise(eps):
        steps = [s for ep in eps for s in ep.steps]
        scores = [ep.solved for ep in eps]
        n = max(len(eps), 1)                         # no episodes (a rank's empty share): zeros, not a crash
        faulted = [(s, nxt) for ep in eps for s, nxt in zip(ep.steps, ep.steps[1:] + [None])
                   if getattr(s.result, "fault", "")]
        calls = sum(s.result is not None for s in steps)
        return {
            "n": len(eps),
            "pass_rate": sum(s == SOLVED for s in scores) / n,
            "unsure_rate": sum(s == 0.5 for s in scores) / n,
            "recall": sum(relevant_tool_recall([s.tool for s in ep.steps if s.tool], ep.task) for ep in eps) / n,
            "avg_steps": len(steps) / n,
            "invalid_action_rate": sum(s.result is None and bool(s.error) or getattr(s.result, "invalid", False)
                                       for s in steps) / max(len(steps), 1),
            "fault_rate": len(faulted) / max(calls, 1),
            "retry_after_fault": sum(nxt is not None and (nxt.tool, nxt.args) == (s.tool, s.args)
                                     for s, nxt in faulted) / max(len(faulted), 1),
        }
    groups = sorted({ep.task.group for ep in episodes})
    out = {f"G{g}": summarise([ep for ep in episodes if ep.task.group == g]) for g in groups}
    out["all"] = summarise(episodes)
    return out


def evaluate(model, tokenizer, env, tasks, cfg: RolloutConfig, batch_size: int = 32, progress: bool = False,
             fault_seed: int | None = None, policy_class=None) -> tuple[dict, list[Episode]]:
    """Greedy rollouts on `tasks` by `policy_class` (ModelPolicy, or cpu_speed.ModelPolicy); returns the metrics of
    `episode_metrics` and the episodes. With `fault_seed` the tools' fault stream restarts from it, so two models
    evaluated with one seed meet the same faults (a paired comparison; two draws of 30% faults alone moved a 300-task
    pass rate by 0.05)."""
    if fault_seed is not None:
        env.reset(seed=fault_seed)
    greedy = replace(cfg, temperature=0.0)
    episodes = []
    for i in tqdm(range(0, len(tasks), batch_size), desc="eval", disable=not progress, leave=False):
        policy = (policy_class or ModelPolicy)(model, tokenizer, greedy)
        episodes += rollout(policy, tasks[i:i + batch_size], env, tokenizer, greedy)
    return episode_metrics(episodes), episodes


def show_episode(ep) -> str:
    lines = [f"[task G{ep.task.group}] {ep.task.query}  (truth: {ep.task.answer})"]
    for t, (s, r) in enumerate(zip(ep.steps, ep.rewards or [None] * len(ep.steps))):
        lines.append(f"  step {t} r={r if r is None else round(r, 3)} ok={s.success}: "
                     f"{s.action_text.strip()[:160]!r}\n    -> {s.observation[:120]!r}")
    return "\n".join(lines)


def results_table(rows: dict) -> str:
    """rows: name -> episode_metrics dict. Markdown table of pass rate and recall per group."""
    groups = [g for g in next(iter(rows.values())) if g != "all"] + ["all"]
    head = "| method | " + " | ".join(f"{g} pass | {g} recall" for g in groups) + " |"
    sep = "|---" * (1 + 2 * len(groups)) + "|"
    body = ["| " + name + " | " + " | ".join(f"{m[g]['pass_rate']:.3f} | {m[g]['recall']:.3f}" for g in groups) + " |"
            for name, m in rows.items()]
    return "\n".join([head, sep] + body)

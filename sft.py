"""The warm start: SFT on scripted-expert trajectories, of a tiny model trained from scratch (with its own
tokenizer) or of a pretrained checkpoint (--model, e.g. SmolLM2, through LoRA).

Who calls it: train.py (`warm_start`, `warm_start_provenance`) before evaluation and RL. The paper also starts RL
from an SFT model (ToolLLaMA); here the SFT model is also the "SFT alone" baseline of the results table.

Why a module of its own: train.py is the RL loop; building a tokenizer and running supervised training would double
its length, and the SFT phase is cached (keyed by a hash of its settings), so a second run skips it entirely.

Choices:
 1. The expert's trajectories go through the *same* rollout loop as the policy (ScriptedPolicy), so SFT sequences
    are tokenised exactly like RL sequences: same template, same observation tokens, same masks.
 2. The loss is token-mean cross-entropy on action tokens only (prompt and observations are context).
 3. The from-scratch tokenizer is a byte-level BPE with digits split one by one and spaces as tokens of their own,
    so a name or a number is the same token sequence wherever it appears: copying a value from the query or an
    earlier observation into an argument — the skill multi-step tool use needs most — is then plain copying.
 4. Micro-batches under --token-budget (batching.Microbatches); with --cpu-speed the prompt every demonstration
    shares runs once per micro-batch (cpu_speed.SharedPromptMicrobatches), counted once in the budget.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time

import torch
from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

import cpu_speed
from batching import Microbatches, collate, predictors, token_logprobs
from checkpoint import provenance, source_hash
from hf import Tokenizer, load_pretrained, save_pretrained
from model import ModelConfig, Transformer, add_lora, store_frozen_weights_in
from rollout import TEMPLATES, ScriptedPolicy, rollout, system_prompt
from tools import Environment, Expert, FaultConfig, expert_episode


def train_tokenizer(texts, vocab_size: int, template: str) -> Tokenizer:
    """Byte-level BPE on the task corpus; the chat template's markers are single special tokens."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] if template == "chatml" else \
        ["<|end_of_text|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = HFTokenizer(models.BPE())
    # Spaces are tokens of their own: "Lorvik" is then the same token in the query ("... of Lorvik?") and in the
    # JSON arguments ('{"city":"Lorvik"}'). With GPT-2-style "ĠLorvik" vs "Lorvik" the model must learn a second
    # token per name before it can copy it; measured: pass rate 0 after SFT without this, see docs/history.md §9.
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(" "), behavior="isolated"),
                                                 pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    eos = tok.token_to_id(TEMPLATES[template].end_of_turn)
    return Tokenizer(tok, bos_id=None, eos_id=eos, pad_id=tok.token_to_id(specials[0]))


def corpus(env, tasks, template: str, schema_format: str = "compact"):
    """The text the tokenizer learns from: prompts, expert actions and observations of the training tasks."""
    t = TEMPLATES[template]
    for task in tasks:
        yield t.prompt.format(system=system_prompt(env, task, schema_format), user=task.query)
        for action, result in expert_episode(task, env):
            yield action + t.end_of_turn
            if result is not None:
                yield t.observation.format(observation=result.text)


# The code a warm start is a function of: the model, the SFT loop and what makes the demonstrations (rollout, tools).
# Its hash is part of the cache key, so a change to any of these files trains a new warm start instead of silently
# reusing one trained by other code (the SmolLM2 results of 2026-11-26 stood on such a stale cache; README).
# The judge (tools/judge.py) is not on this path: a judge fix re-evaluates a warm start (evaluation.py keys its cache
# on the judge) but does not retrain it.
WARM_START_CODE = ["sft.py", "model.py", "hf.py", "cpu_speed.py", "batching.py", "rollout.py", "gguf_import.py",
                   "tools/actions.py", "tools/apis.py", "tools/tasks.py", "tools/world.py"]


def sft_hash(cfg, suite) -> str:
    """Everything the warm start depends on, its code included; a run with the same values and the same code reuses
    the cached SFT model."""
    keys = ["model", "sft_seed", "sft_tasks", "sft_epochs", "sft_batch", "sft_lr", "sft_schedule",
            "sft_fault_rate"]
    keys += ["lora", "lora_r", "lora_alpha", "dtype"] if cfg.model else \
        ["vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"]
    shape = {k: getattr(cfg.rollout, k) for k in ("template", "schema_format", "max_steps", "max_action_tokens",
                                                 "max_total_tokens", "max_obs_tokens")}   # not sampling settings
    blob = json.dumps({**{k: getattr(cfg, k) for k in keys}, **shape, "token_budget": cfg.ppo.token_budget,
                       "suite": suite.fingerprint(), "code": source_hash(WARM_START_CODE)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def demonstration_env(cfg, suite) -> Environment:
    """The tools the expert's demonstrations are recorded against. They fail at --sft-fault-rate, not --fault-rate:
    by default (0) a run with faults starts from the same SFT model as a clean run. With faults the expert retries
    failed calls, and the model trained on its demonstrations learns to retry."""
    return suite.environment(FaultConfig(rate=cfg.sft_fault_rate, seed=cfg.sft_seed) if cfg.sft_fault_rate > 0
                             else None)


def warm_start(cfg, suite, model_dir: str, device, log=print):
    """Return (model, tokenizer, cache directory) of the SFT warm start, training it (and caching it) if needed.

    From scratch (model_dir ""): a tokenizer and a tiny Llama trained on the suite's demonstrations. From a
    pretrained checkpoint: its own tokenizer and chat template, fine-tuned through LoRA (--lora auto/on) or fully
    (--lora off); the adapters are merged before caching, so the cached model is a plain checkpoint and the RL phase
    adds fresh adapters on top of it (its reference policy is then this SFT model, as in the paper)."""
    key = sft_hash(cfg, suite)
    cache_dir = os.path.join(cfg.cache_dir, f"sft-{key}")
    if os.path.exists(os.path.join(cache_dir, "config.json")):
        log(f"SFT warm start: cached at {cache_dir}")
        return (*load_pretrained(cache_dir, device=device), cache_dir)
    t0 = time.time()
    env = demonstration_env(cfg, suite)
    tasks = suite.tasks("sft", cfg.sft_tasks, seed=cfg.sft_seed)
    if model_dir:
        model, tokenizer = load_pretrained(model_dir, device=device)
        if cfg.lora != "off":
            add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, seed=cfg.sft_seed)
            if cfg.dtype != "float32":    # the frozen base in the autocast dtype (saved merged, in float32)
                store_frozen_weights_in(model, getattr(torch, cfg.dtype))
    else:
        tokenizer = train_tokenizer(corpus(env, tasks, cfg.rollout.template, cfg.rollout.schema_format),
                                    cfg.vocab_size, cfg.rollout.template)
        config = ModelConfig(
            model_type="llama", vocab_size=tokenizer.vocab_size, hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
            max_position_embeddings=max(2048, cfg.rollout.max_total_tokens), tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
        torch.manual_seed(cfg.sft_seed)
        model = Transformer(config).to(device=device)
    model.checkpoint_layers = cfg.checkpoint_layers
    if cfg.cpu_speed:                     # the shared prompt once per micro-batch (cpu_speed.py)
        cpu_speed.apply(model)
    # Expert demonstrations, through the same rollout loop and tokenisation as RL.
    episodes = []
    for i in range(0, len(tasks), 256):
        policy = ScriptedPolicy(Expert(), tokenizer, cfg.rollout)
        episodes += rollout(policy, tasks[i:i + 256], env, tokenizer, cfg.rollout)
    losses = sft_train(model, episodes, tokenizer.pad_id, cfg, device, log)
    model.eval()
    save_pretrained(model, tokenizer, cache_dir)          # LoRA merged into the weights
    with open(os.path.join(cache_dir, "provenance.json"), "w") as f:   # which code trained it, where, how long
        json.dump({"key": key, **provenance(), "seconds": round(time.time() - t0), "demonstrations": len(episodes),
                   "first_loss": losses[0], "last_loss": losses[-1]}, f, indent=1)
    log(f"SFT warm start: {len(episodes)} expert episodes, {time.time() - t0:.0f}s, saved to {cache_dir}")
    return (*(load_pretrained(cache_dir, device=device) if model_dir else (model, tokenizer)), cache_dir)


def sft_backward(model, plan, episodes, idx: list, pad_id: int, device, autocast):
    """The gradient of one optimizer step, accumulated over its micro-batches (plan(idx)): token-mean cross-entropy
    over the action tokens of the episodes idx, each micro-batch's sum divided by the step's action-token count, so
    the accumulated gradient is the step's whatever the grouping. -> the step's loss (a device tensor)."""
    n_action = sum(sum(episodes[i].action_mask) for i in idx)
    loss_sum = 0.0
    for rows, _, _, _ in plan(idx):
        batch = collate([episodes[i] for i in rows], pad_id, device)
        ids, am = batch["input_ids"], batch["action_mask"]
        with autocast, plan.forwards():              # the LM head only where it predicts an action token
            logits = model(ids, batch["attention_mask"], logits_to_keep=predictors(am))
        logp = token_logprobs(logits, ids, targets=am)                                         # (b, T)
        loss = -(logp * am).sum() / n_action
        loss.backward()
        loss_sum += loss.detach()
    return loss_sum


def sft_train(model, episodes, pad_id: int, cfg, device, log=print):
    """Token-mean cross-entropy on action tokens, AdamW (β2 0.95), linear warm-up, then a cosine decay to zero
    (`--sft-schedule cosine`, the default) or a constant rate (`constant`). With LoRA on SmolLM2 at 1e-3 both learn
    the format in a few dozen steps, but the constant rate ends wherever its last steps left it: which task types a
    warm start solves then changes from seed to seed (README, "Reproducing the warm start")."""
    plan = (cpu_speed.SharedPromptMicrobatches if cfg.cpu_speed else Microbatches).of_episodes(
        episodes, cfg.ppo.token_budget)                # rows -> micro-batches under the token budget
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.sft_lr, weight_decay=0.0, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(cfg.sft_seed)
    batches_per_epoch = math.ceil(len(episodes) / cfg.sft_batch)
    total = cfg.sft_epochs * batches_per_epoch
    warmup = max(1, total // 20)
    autocast = torch.autocast(torch.device(device).type, dtype=getattr(torch, cfg.dtype),
                              enabled=cfg.dtype != "float32")
    model.train()
    bar = tqdm(total=total, desc="sft", leave=False)
    losses = []                                       # one per optimizer step, on the device until the end
    for epoch in range(cfg.sft_epochs):
        order = torch.randperm(len(episodes), generator=gen).tolist()
        for b in range(batches_per_epoch):
            step = epoch * batches_per_epoch + b
            decay = 1.0 if cfg.sft_schedule == "constant" else 0.5 * (1 + math.cos(math.pi * step / total))
            for g in opt.param_groups:
                g["lr"] = cfg.sft_lr * min(1.0, (step + 1) / warmup) * decay
            loss_sum = sft_backward(model, plan, episodes, order[b * cfg.sft_batch:(b + 1) * cfg.sft_batch], pad_id,
                                    device, autocast)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            bar.update(1)
            losses.append(loss_sum)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{float(loss_sum):.3f}")        # one host sync every 20 steps
        log(f"SFT epoch {epoch + 1}/{cfg.sft_epochs}: loss {float(loss_sum):.4f}")
    bar.close()
    return [round(float(x), 5) for x in losses]


def warm_start_provenance(warm_start_dir: str) -> dict | None:
    """The warm start a run stands on: its cache key and what trained it (sft.py's provenance.json: commit, dirty
    tree, torch, threads, date, losses); None for --model as it is."""
    if not warm_start_dir:
        return None
    path = os.path.join(warm_start_dir, "provenance.json")
    if not os.path.exists(path):                     # a warm start cached before provenance was recorded
        return {"key": os.path.basename(warm_start_dir).removeprefix("sft-"), "commit": None}
    with open(path) as f:
        return json.load(f)

"""The authors' offline format: exact masks for a known row, malformed rows reported by line, truncation, training."""
import csv
import os

import pytest
import torch

from batching import collate
from model import ModelConfig, PolicyWithValue, Transformer, ValueHead
from offline import load_offline, to_episode
from advantages import AdvantageConfig
from ppo import PPOConfig, ppo_update
from sft import train_tokenizer

SAMPLE = os.path.join(os.path.dirname(__file__), "data", "offline_sample.tsv")


@pytest.fixture(scope="module")
def tokenizer():
    with open(SAMPLE) as f:
        text = f.read()
    return train_tokenizer([text] * 3, 400, "chatml")


def test_a_known_row_has_exactly_the_expected_masks_and_step_ids(tokenizer):
    prompts = ["<|im_start|>user\nHow warm is it in Seljun?<|im_end|>\n<|im_start|>assistant\n",
               "\n<|im_start|>function\n{\"temp_c\":21.5}<|im_end|>\n<|im_start|>assistant\n"]
    responses = ['Action: get_weather\nAction Input: {"city":"Seljun"}<|im_end|>',
                 'Action: Finish\nAction Input: {"return_type":"give_answer","final_answer":"21.5"}<|im_end|>']
    ep, truncated = to_episode(prompts, responses, [0.75, 1.0], tokenizer, 10_000)
    p0, r0, p1, r1 = (len(tokenizer.encode(s)) for s in (prompts[0], responses[0], prompts[1], responses[1]))
    assert not truncated
    assert ep.action_mask == [0] * p0 + [1] * r0 + [0] * p1 + [1] * r1
    assert ep.step_id == [-1] * p0 + [0] * (r0 + p1) + [1] * r1
    assert ep.rewards == [0.75, 1.0] and ep.final_answer == "21.5"
    assert [s.tool for s in ep.steps] == ["get_weather", "Finish"]
    assert tokenizer.decode(ep.token_ids) == "".join([prompts[0], responses[0], prompts[1], responses[1]])


def test_malformed_rows_are_reported_with_their_line_numbers_and_skipped(tokenizer):
    messages = []
    episodes = load_offline(SAMPLE, tokenizer, 4096, log=messages.append)
    assert len(episodes) == 2
    skipped = [m for m in messages if ": skipped: " in m]
    # the file: header (line 1), a good row (2), length mismatch (3), not a literal (4), empty lists (5), good (6)
    assert [int(m.split(":")[1]) for m in skipped] == [3, 4, 5]
    assert "list lengths differ" in skipped[0] and "not a Python literal" in skipped[1] and "empty" in skipped[2]
    assert "2 rows loaded, 3 skipped" in messages[-1]
    assert not os.path.exists("pwned")


def test_zero_usable_rows_and_a_wrong_header_are_errors(tmp_path, tokenizer):
    bad = tmp_path / "bad.tsv"
    bad.write_text("prompt\tresponse\treward\n[]\t[]\t[]\n")
    with pytest.raises(ValueError, match="no usable rows"):
        load_offline(str(bad), tokenizer, 100, log=lambda m: None)
    bad.write_text("a\tb\n")
    with pytest.raises(ValueError, match="header must be"):
        load_offline(str(bad), tokenizer, 100, log=lambda m: None)
    with pytest.raises(FileNotFoundError):
        load_offline(str(tmp_path / "missing.tsv"), tokenizer, 100)


def test_long_rows_are_cut_from_the_left_keeping_the_last_step_whole(tokenizer):
    prompts = ["word " * 50, "obs " * 20, "obs " * 20]
    responses = ["Action: a\nAction Input: {}"] * 3
    full, _ = to_episode(prompts, responses, [0.1, 0.2, 0.3], tokenizer, 10_000)
    last_step = len(tokenizer.encode(prompts[2])) + len(tokenizer.encode(responses[2]))
    ep, truncated = to_episode(prompts, responses, [0.1, 0.2, 0.3], tokenizer, last_step + 5)
    assert truncated and len(ep.token_ids) <= last_step + 5 < len(full.token_ids)
    assert ep.rewards == [0.3] and len(ep.steps) == 1
    assert ep.token_ids[-len(tokenizer.encode(responses[2])):] == tokenizer.encode(responses[2])


def test_a_field_longer_than_the_csv_default_limit_parses(tmp_path, tokenizer):
    path = tmp_path / "long.tsv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["prompt", "response", "reward"])
        w.writerow([repr(["x" * 200_000]), repr(["Action: a\nAction Input: {}"]), "[0.5]"])
    [ep] = load_offline(str(path), tokenizer, 100_000, log=lambda m: None)
    assert ep.rewards == [0.5]


def test_one_ppo_iteration_trains_on_the_loaded_rows(tokenizer):
    episodes = load_offline(SAMPLE, tokenizer, 4096, log=lambda m: None)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=1, num_attention_heads=2, tie_word_embeddings=True))
    policy = PolicyWithValue(model, ValueHead(32))
    before = [p.detach().clone() for p in policy.parameters()]
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    stats = ppo_update(policy, optimizer, collate(episodes, tokenizer.pad_id), PPOConfig(ppo_epochs=1, minibatches=1),
                       AdvantageConfig())
    assert stats["optimizer_steps"] == 1 and stats["skipped_steps"] == 0
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))

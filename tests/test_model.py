"""model.py and hf.py (checkpoint files, tokenizer) against transformers (the reference) on tiny random configs, plus
cache, sampling, LoRA and file errors.

transformers is used only here. Each tiny model: hidden 64, 2 layers, vocab 256.
"""
import json
import os

import pytest
import torch
import torch.nn as nn
from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers

import hf as H
import model as M
from helpers import generate

V = 256
transformers = pytest.importorskip("transformers")


def tiny_tokenizer() -> H.Tokenizer:
    """A WordLevel tokenizer over words t0..t249 plus <s>, </s>, <pad>, <eot>, <unk>."""
    vocab = {f"t{i}": i for i in range(250)}
    vocab.update({"<s>": 250, "</s>": 251, "<pad>": 252, "<eot>": 253, "<unk>": 254})
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf.add_special_tokens(["<s>", "</s>", "<pad>", "<eot>"])
    return H.Tokenizer(hf, bos_id=250, eos_id=251, pad_id=252)


HF_CONFIGS = {   # name -> (config class, kwargs)
    "llama_tied_mha": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)),
    "llama_untied_gqa_llama3_rope": ("LlamaConfig", dict(
        num_attention_heads=4, num_key_value_heads=2, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "llama_linear_rope_bias": ("LlamaConfig", dict(
        num_attention_heads=4, num_key_value_heads=1, attention_bias=True, mlp_bias=True,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0})),
    "mistral": ("MistralConfig", dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=None)),
    "qwen2": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32)),
}


def hf_model(name, seed=0):
    cls, kw = HF_CONFIGS[name]
    cfg = getattr(transformers, cls)(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     max_position_embeddings=256, bos_token_id=250, eos_token_id=251, **kw)
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():     # larger-than-default random weights, so logits and greedy paths are not degenerate
        for n, p in hf.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in n else 0.15 * torch.randn_like(p))
    return hf


def hf_checkpoint(name, path, **save_kw):
    hf = hf_model(name)
    hf.save_pretrained(path, **save_kw)
    tiny_tokenizer().save(str(path))
    return hf


def our_model(seed=0, **kw) -> M.Transformer:
    cfg = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(seed)
    model = M.Transformer(M.ModelConfig(**{**cfg, **kw})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(6.0)       # std 0.12: varied greedy continuations
    return model


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def full_greedy(forward, prompt, n):
    """The oracle: recompute the whole sequence for every new token."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(forward(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


IDS = torch.randint(0, 250, (3, 12), generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_logits_and_greedy_continuation_match_transformers(name, tmp_path):
    hf = hf_checkpoint(name, tmp_path)
    ours, tok = H.load_pretrained(str(tmp_path))
    with torch.no_grad():
        assert rel_err(ours(IDS), hf(IDS).logits) <= 1e-5
        prompt = IDS[0].tolist()
        tokens, _ = generate(ours, tok, [prompt], max_new_tokens=20, stop_ids=[], temperature=0)
        assert tokens[0] == full_greedy(lambda x: hf(x).logits, prompt, 20)
    assert len(set(tokens[0])) > 3


@pytest.mark.parametrize("kw", [dict(model_type="qwen3", head_dim=24, tie_word_embeddings=True),
                                dict(model_type="qwen2"), dict(model_type="mistral"), dict(attention_bias=True)])
def test_our_save_loads_in_transformers_with_the_same_logits(kw, tmp_path):
    ours = our_model(**kw)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if n.endswith("bias"):
                p.normal_()
    H.save_pretrained(ours, tiny_tokenizer(), str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["config.json", "generation_config.json", "model.safetensors",
                                            "tokenizer.json", "tokenizer_config.json"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        assert rel_err(hf(IDS).logits, ours(IDS)) <= 1e-5
    fast = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert fast.eos_token == "</s>" and fast.pad_token == "<pad>"


def test_llama3_rope_config_saved_by_us_gives_the_same_logits_in_transformers(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    ours = our_model(rope_theta=500000.0, rope_scaling=scaling)
    H.save_pretrained(ours, tiny_tokenizer(), str(tmp_path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        assert rel_err(hf(IDS).logits, ours(IDS)) <= 1e-5


def test_a_sharded_transformers_checkpoint_loads_with_the_same_logits(tmp_path):
    hf = hf_checkpoint("llama_untied_gqa_llama3_rope", tmp_path, max_shard_size="40KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
    ours, _ = H.load_pretrained(str(tmp_path))
    with torch.no_grad():
        assert rel_err(ours(IDS), hf(IDS).logits) <= 1e-5
    half, _ = H.load_pretrained(str(tmp_path), dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    shard = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))[-1]
    os.remove(tmp_path / shard)
    with pytest.raises(FileNotFoundError, match=f"{shard} not found \\(listed in the index\\)"):
        H.load_pretrained(str(tmp_path))


def test_a_transformers_4_config_with_rope_theta_and_rope_scaling_loads_with_the_same_logits(tmp_path):
    hf = hf_checkpoint("llama_linear_rope_bias", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg.update(rope_theta=rope["rope_theta"], rope_scaling={"type": "linear", "factor": rope["factor"]})
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ours, _ = H.load_pretrained(str(tmp_path))
    assert ours.config.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    with torch.no_grad():
        assert rel_err(ours(IDS), hf(IDS).logits) <= 1e-5


def test_rope_parameters_and_rope_theta_configs_read_the_same():
    base = dict(model_type="llama", vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4)
    v5 = H.config_from_hf({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}})
    v4 = H.config_from_hf({**base, "rope_theta": 5e5, "rope_scaling": None})
    assert v5 == v4 and v5.rope_theta == 5e5 and v5.rope_scaling is None
    assert H.config_from_hf(H.config_to_hf(v5)) == v5


# ---------------------------------------------------------------------------------------- forward / masks
def test_left_padding_changes_nothing():
    model = our_model()
    a, b = IDS[0, :12], IDS[1, :7]
    padded = torch.stack([a, torch.cat([torch.zeros(5, dtype=torch.long), b])])
    mask = torch.tensor([[1] * 12, [0] * 5 + [1] * 7])
    with torch.no_grad():
        out = model(padded, attention_mask=mask)
        torch.testing.assert_close(out[0], model(a[None])[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[1, 5:], model(b[None])[0], rtol=1e-5, atol=1e-5)


def test_right_padding_changes_nothing_on_real_tokens_and_returns_final_hidden():
    model = our_model()
    mask = torch.ones_like(IDS)
    mask[1, 8:] = 0
    with torch.no_grad():
        logits, hidden = model(IDS, attention_mask=mask, return_hidden=True)
        torch.testing.assert_close(logits[1, :8], model(IDS[1:2, :8])[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.lm_head(hidden), logits)


def test_policy_with_value_returns_the_models_logits_and_the_heads_float32_values_in_one_forward():
    model = our_model()
    head = M.ValueHead(64)
    nn.init.normal_(head.proj.weight)
    with torch.no_grad():
        logits, values = M.PolicyWithValue(model, head)(IDS)
        expected_logits, hidden = model(IDS, return_hidden=True)
        torch.testing.assert_close(logits, expected_logits)
        torch.testing.assert_close(values, (hidden @ head.proj.weight[0] + head.proj.bias[0]).float())
    assert logits.shape == (3, 12, V) and values.shape == (3, 12) and values.dtype == torch.float32


# ------------------------------------------------------------------------------------------------ KV cache
def test_cached_greedy_generation_equals_full_recomputation_token_for_token():
    model = our_model()
    prompts = [IDS[0].tolist(), IDS[1, :4].tolist(), IDS[2, :9].tolist()]      # different lengths: left padded
    with torch.no_grad():
        tokens, _ = generate(model, tiny_tokenizer(), prompts, max_new_tokens=20, stop_ids=[], temperature=0)
        for p, t in zip(prompts, tokens):
            assert t == full_greedy(model, p, 20)


def test_extend_after_decode_gives_the_logits_of_one_forward_over_the_whole_sequence():
    model = our_model()
    tok = tiny_tokenizer()
    prompts = [IDS[0, :3].tolist(), IDS[1, :10].tolist(), IDS[2, :6].tolist()]
    gen = torch.Generator().manual_seed(0)
    cache = M.KVCache(model.config, 3, 80)
    last = M.extend(model, cache, prompts)
    seqs = [list(p) for p in prompts]
    for obs_len in ([2, 7, 1], [5, 1, 3]):            # two tool steps; rows differ in length -> holes in the cache
        tokens, _ = M.decode(model, cache, last, torch.tensor([4, 9, 6]), [], generator=gen)
        obs = [IDS[2, :n].tolist() for n in obs_len]
        last = M.extend(model, cache, obs)
        for b in range(3):
            seqs[b] += tokens[b] + obs[b]
            full = model(torch.tensor([seqs[b]]))[0, -1]
            assert rel_err(last[b], full) <= 1e-5
    assert cache.next_pos.tolist() == [len(s) for s in seqs]
    assert cache.valid.sum(1).tolist() == [len(s) for s in seqs]


def test_keep_drops_finished_rows_and_the_rest_continue_unchanged():
    model = our_model()
    prompts = [IDS[0, :5].tolist(), IDS[1, :8].tolist(), IDS[2, :3].tolist()]
    cache = M.KVCache(model.config, 3, 40)
    M.extend(model, cache, prompts)
    cache.keep(torch.tensor([0, 2]))
    last = M.extend(model, cache, [[7, 8], [9]])
    torch.testing.assert_close(last[1], model(torch.tensor([prompts[2] + [9]]))[0, -1], rtol=1e-5, atol=1e-5)


def test_a_cache_that_grows_on_demand_computes_what_a_full_size_one_does():
    """grow_by 3 makes the buffers grow at nearly every call (prompt, keep, several appends); the logits equal
    those of a cache allocated at max_len at once, and the grown cache holds only the slots it needed (+ grow_by)."""
    model = our_model()
    prompts = [IDS[0, :5].tolist(), IDS[1, :8].tolist(), IDS[2, :3].tolist()]
    caches = [M.KVCache(model.config, 3, 60, grow_by=g) for g in (0, 3)]
    outs = [[M.extend(model, c, prompts)] for c in caches]
    for c, out in zip(caches, outs):
        c.keep(torch.tensor([0, 2]))
        out += [M.extend(model, c, [[7, 8], [9]]), M.extend(model, c, [[4], [5, 6, 7, 8]])]
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert caches[0].k[0].shape[2] == 60 and caches[1].k[0].shape[2] == 8 + 2 + 4 + 3 and caches[1].length == 14


def test_a_full_cache_raises_instead_of_overwriting():
    model = our_model()
    cache = M.KVCache(model.config, 1, 10)
    M.extend(model, cache, [list(range(8))])
    with pytest.raises(ValueError, match="KV cache full: 8 used \\+ 3 new slots > max_len 10"):
        M.extend(model, cache, [[1, 2, 3]])


# ------------------------------------------------------------------------------------------------ sampling
def test_rows_stop_at_their_own_stop_id_or_max_and_the_stop_token_is_kept():
    model = our_model()
    prompts = [IDS[0].tolist(), IDS[1].tolist()]
    free, _ = generate(model, tiny_tokenizer(), prompts, max_new_tokens=12, stop_ids=[], temperature=0)
    stop = free[0][5]
    tokens, logprobs = generate(model, tiny_tokenizer(), prompts, max_new_tokens=torch.tensor([12, 3]),
                                stop_ids=[stop], temperature=0)
    row1 = free[1][:3]
    assert tokens[0] == free[0][:free[0].index(stop) + 1]
    assert tokens[1] == (row1[:row1.index(stop) + 1] if stop in row1 else row1)
    assert [len(x) for x in logprobs] == [len(x) for x in tokens]


def test_sampling_is_reproducible_with_a_generator_and_logprobs_are_the_model_logprobs():
    model = our_model()
    prompts = [IDS[0].tolist(), IDS[1, :5].tolist()]
    run = lambda seed, **kw: generate(model, tiny_tokenizer(), prompts, max_new_tokens=10, stop_ids=[],  # noqa
                                        generator=torch.Generator().manual_seed(seed), **kw)
    (t1, lp1), (t2, _), (t3, _) = run(0), run(0), run(1)
    assert t1 == t2 and t1 != t3
    with torch.no_grad():
        seq = prompts[1] + t1[1]
        logp = model(torch.tensor([seq]))[0].log_softmax(-1)[len(prompts[1]) - 1:-1]     # predicts seq[t+1]
        ref = logp.gather(1, torch.tensor(t1[1])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(lp1[1]), ref, rtol=1e-4, atol=1e-5)


def test_top_k_one_is_greedy_and_top_p_logprobs_are_of_the_renormalised_distribution():
    model = our_model()
    prompts = [IDS[0].tolist()]
    greedy, _ = generate(model, tiny_tokenizer(), prompts, max_new_tokens=8, stop_ids=[], temperature=0)
    topk1, lp = generate(model, tiny_tokenizer(), prompts, max_new_tokens=8, stop_ids=[], top_k=1)
    assert topk1 == greedy and lp[0] == [0.0] * 8
    logits = torch.tensor([[3.0, 2.0, 1.0, -5.0]])
    tok, lp = M.sample(logits.expand(200, 4), top_p=0.7, generator=torch.Generator().manual_seed(0))
    p = logits.softmax(-1)[0]
    assert set(tok.tolist()) == {0, 1}                 # p0 = .66 < .7, so token 1 completes the nucleus
    torch.testing.assert_close(lp[tok == 0][0], (p[0] / (p[0] + p[1])).log())


def test_sampled_tokens_follow_the_distribution_and_never_pick_a_token_top_k_removed():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0, 0.5]]).log_softmax(-1)
    n, gen = 40_000, torch.Generator().manual_seed(1)
    tok, lp = M.sample(logits.expand(n, 6), generator=gen)
    p = logits.exp()[0]
    freq = torch.bincount(tok, minlength=6).float() / n
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-4).all()          # within 5 standard errors
    torch.testing.assert_close(lp, logits[0][tok])                                   # the log-prob of each draw
    top3, _ = M.sample(logits.expand(n, 6), top_k=3, generator=gen)
    assert set(top3.tolist()) == {0, 1, 5}                                           # the 3 largest, each drawn


# ----------------------------------------------------------------------------------------------------- LoRA
def test_zero_initialised_lora_leaves_outputs_unchanged_and_trains_only_adapters():
    model = our_model()
    before = model(IDS)
    M.add_lora(model, r=4, alpha=8)
    torch.testing.assert_close(model(IDS), before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)


def lora_model():
    model = our_model()
    base = model(IDS).detach()
    M.add_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, M.LoRALinear):
                m.lora_B.normal_(std=0.1)
    return model, base


def test_disabled_adapters_give_the_base_outputs_and_enabled_ones_come_back():
    model, base = lora_model()
    with torch.no_grad():
        adapted = model(IDS)
        assert rel_err(adapted, base) > 1e-2
        with M.lora_disabled(model):
            torch.testing.assert_close(model(IDS), base)
        torch.testing.assert_close(model(IDS), adapted)


def test_lora_is_merged_into_the_weights_on_save(tmp_path):
    model, _ = lora_model()
    with torch.no_grad():
        adapted = model(IDS)
    H.save_pretrained(model, tiny_tokenizer(), str(tmp_path / "full"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "full")).eval()
    with torch.no_grad():
        assert rel_err(hf(IDS).logits, adapted) <= 1e-4   # float32 rounding of W + ΔW (measured 1.04e-5 here)


# ------------------------------------------------------------------------------------------------ from scratch
def test_a_from_scratch_model_with_its_own_tokenizer_saves_and_loads_like_any_checkpoint(tmp_path):
    tok = tiny_tokenizer()
    cfg = M.ModelConfig(vocab_size=tok.vocab_size, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    model = M.Transformer(cfg)
    assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 5e6
    assert abs(model.model.layers[0].mlp.up_proj.weight.std().item() - 0.02) < 2e-3
    H.save_pretrained(model, tok, str(tmp_path))
    loaded, tok2 = H.load_pretrained(str(tmp_path))
    torch.testing.assert_close(loaded(IDS % 250), model(IDS % 250))
    assert (tok2.bos_id, tok2.eos_id, tok2.pad_id, tok2.eos_ids) == (250, 251, 252, [251])
    assert tok2.encode("t1 t2 <eot>") == [1, 2, 253] and tok2.decode([1, 253]) == "t1 <eot>"


def test_tokenizer_ids_come_from_all_three_config_files(tmp_path):
    tiny_tokenizer().save(str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<eot>"}}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [251, 253], "bos_token_id": 250}))
    tok = H.Tokenizer.from_dir(str(tmp_path), {"eos_token_id": 251})
    assert (tok.bos_id, tok.eos_id, tok.eos_ids, tok.pad_id) == (250, 253, [253, 251], 253)


# ------------------------------------------------------------------------------------------------ bad input
@pytest.fixture
def ckpt(tmp_path):
    H.save_pretrained(our_model(), tiny_tokenizer(), str(tmp_path))
    return tmp_path


def test_missing_directory_config_or_weights_are_named(ckpt, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        H.load_pretrained(str(tmp_path / "nope"))
    (ckpt / "tokenizer.json").rename(ckpt / "tok.json")
    with pytest.raises(FileNotFoundError, match="tokenizer.json not found"):
        H.load_pretrained(str(ckpt))
    os.remove(ckpt / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no model.safetensors or model.safetensors.index.json"):
        H.load_pretrained(str(ckpt))
    os.remove(ckpt / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        H.load_pretrained(str(ckpt))
    (ckpt / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match="config.json: invalid JSON"):
        H.load_pretrained(str(ckpt))


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gpt2"}, "unsupported model_type 'gpt2'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "unsupported rope type 'yarn'"),
    ({"model_type": "mistral", "sliding_window": 128}, "unsupported sliding_window 128 < max_position_embeddings 256"),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 64, "max_window_layers": 1},
     "unsupported sliding_window 64"),
])
def test_unsupported_configs_are_refused_by_name(ckpt, change, message):
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ValueError, match=message):
        H.load_pretrained(str(ckpt))


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused(tmp_path):
    H.save_pretrained(our_model(vocab_size=250), tiny_tokenizer(), str(tmp_path))
    with pytest.raises(ValueError, match="tokenizer has 255 tokens but the model only 250"):
        H.load_pretrained(str(tmp_path))


def test_a_tensor_of_the_wrong_shape_missing_or_unexpected_keys_are_named(ckpt):
    from safetensors.torch import load_file, save_file
    state = load_file(ckpt / "model.safetensors")
    bad = {**state, "model.norm.weight": torch.ones(63)}
    save_file(bad, ckpt / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.norm.weight has shape \(63,\), expected \(64,\)"):
        H.load_pretrained(str(ckpt))
    save_file({k: v for k, v in state.items() if k != "model.norm.weight"}, ckpt / "model.safetensors")
    with pytest.raises(ValueError, match="missing weights model.norm.weight"):
        H.load_pretrained(str(ckpt))
    save_file({**state, "model.extra": torch.ones(1)}, ckpt / "model.safetensors")
    with pytest.raises(ValueError, match="unexpected tensor model.extra"):
        H.load_pretrained(str(ckpt))


def test_a_truncated_safetensors_file_is_named(ckpt):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors: corrupt or truncated safetensors file"):
        H.load_pretrained(str(ckpt))


def test_lora_adapters_are_drawn_from_their_seed_not_from_the_global_rng():
    """The warm start's adapters once came from the global RNG, so a cached and a freshly trained warm start left the
    RL adapters with different initial values: the same command gave another run. Now the seed alone decides."""
    def adapters(seed, draws_before):
        torch.manual_seed(1234)
        torch.rand(draws_before)                      # whatever ran before must not matter
        model = M.Transformer(M.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=1, num_attention_heads=2))
        M.add_lora(model, r=4, alpha=8, seed=seed)
        return torch.cat([p.flatten() for n, p in model.named_parameters() if "lora_A" in n])
    assert torch.equal(adapters(0, 1), adapters(0, 1000))
    assert not torch.equal(adapters(0, 1), adapters(1, 1))

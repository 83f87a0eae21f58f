"""Weights that change between generate calls: the engine must compute with the model as it is at each call and
never reuse KV computed with older weights (prefix-cache hits on prompts seen before the change)."""
import copy

import pytest
import torch

import hf_minivllm
from hf_minivllm import LLM, SamplingParams
from conftest import ScaledLayer, left_padded_batch, tiny_model

MAX_NEW = 12


def greedy(model, ids, mask):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False)


def train_step(model, ids, mask, lr=0.5):
    """One SGD step on the batch (a plain HF training step, on the model's own parameters)."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    labels = ids.masked_fill(mask == 0, -100)
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    model.eval()


def scale_in_place(model):
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_proj.weight.mul_(1.7)
            layer.self_attn.q_proj.weight.mul_(-1.0)


def load_other_weights(model):
    model.load_state_dict(tiny_model(type(model).__name__.replace("ForCausalLM", "").lower(), seed=7).state_dict())


def replace_parameters(model):
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight = torch.nn.Parameter(layer.self_attn.o_proj.weight.detach() * 1.5)
        layer.mlp.gate_proj.weight = torch.nn.Parameter(layer.mlp.gate_proj.weight.detach().flip(0).clone())


CHANGES = {
    "optimizer_step": lambda model, ids, mask: train_step(model, ids, mask),
    "load_state_dict": lambda model, ids, mask: load_other_weights(model),
    "in_place_edit": lambda model, ids, mask: scale_in_place(model),
    "to_dtype": lambda model, ids, mask: model.to(torch.float64),
    "replaced_parameters": lambda model, ids, mask: replace_parameters(model),
}


def unpatched_twin(model, family):
    """A plain HF model holding exactly the accelerated model's current weights."""
    twin = tiny_model(family).to(model.dtype)
    twin.load_state_dict(model.state_dict())
    return twin.eval()


@pytest.mark.parametrize("change", CHANGES)
@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_generate_after_a_weight_change_equals_an_unpatched_twin(family, change):
    model = hf_minivllm.accelerate(tiny_model(family))
    ids, mask = left_padded_batch(lengths=(40, 35, 21, 50))
    first = greedy(model, ids, mask)
    before = hf_minivllm.stats(model)["prefix_cache_hit_tokens"]
    assert torch.equal(greedy(model, ids, mask), first)
    assert hf_minivllm.stats(model)["prefix_cache_hit_tokens"] > before, "the prompts must be cached before the change"

    CHANGES[change](model, ids, mask)
    twin = unpatched_twin(model, family)
    got = greedy(model, ids, mask)
    assert torch.equal(got, greedy(twin, ids, mask))
    if change == "to_dtype":
        assert model._hf_minivllm.llm.model.dtype == torch.float64, "the engine computes in the new dtype"
    else:
        assert not torch.equal(got, first), "the change must matter, or the test proves nothing"
    stats = hf_minivllm.stats(model)
    assert stats["weight_updates"] == 1 and stats["fallbacks"] == 0
    assert stats["rebuilds"] == (1 if change in ("to_dtype", "replaced_parameters") else 0)
    assert torch.equal(greedy(model, ids, mask), got), "no further change: the cache may be used again"


def test_training_keeps_every_parameter_trainable_and_shared():
    """accelerate keeps HF's parameter objects (an optimizer made before it still trains them) and their storage is
    the engine's: no weight is copied."""
    model = tiny_model("qwen3")
    before = {name: param for name, param in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    hf_minivllm.accelerate(model)
    after = dict(model.named_parameters())
    assert all(after[name] is param for name, param in before.items())
    assert all(param.requires_grad for param in after.values())
    ids, mask = left_padded_batch()
    decoder = model._hf_minivllm.llm.model
    q_proj = model.model.layers[0].self_attn.q_proj.weight
    assert q_proj.untyped_storage().data_ptr() == decoder.layers[0].self_attn.qkv_proj.weight.untyped_storage().data_ptr()
    model.train()
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    optimizer.step()
    fused = decoder.layers[0].self_attn.qkv_proj.weight
    assert torch.equal(fused[: q_proj.shape[0]], q_proj.detach()), "optimizer updates land in the engine's storage"


def test_data_edits_need_reset_prefix_cache():
    """``param.data`` edits bypass version counters; reset_prefix_cache is the documented way to say so."""
    model = hf_minivllm.accelerate(tiny_model("llama"))
    twin = copy.deepcopy(tiny_model("llama"))
    ids, mask = left_padded_batch(lengths=(40, 33))
    greedy(model, ids, mask)
    for target in (model, twin):
        for layer in target.model.layers:
            layer.mlp.down_proj.weight.data.mul_(-2.0)
    hf_minivllm.reset_prefix_cache(model)
    assert torch.equal(greedy(model, ids, mask), greedy(twin, ids, mask))


def test_llm_sees_weight_changes_of_the_model_it_serves():
    model = tiny_model("qwen3")
    llm = LLM(model, num_kvcache_blocks=128, kvcache_block_size=4)
    twin = copy.deepcopy(model)
    prompts = [list(range(5, 45)), list(range(7, 30))]
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)
    llm.generate(prompts, params, use_tqdm=False)
    hits = llm.stats.prefix_cache_hit_tokens
    assert hits > 0
    for target in (model, twin):
        scale_in_place(target)
    got = [out["token_ids"] for out in llm.generate(prompts, params, use_tqdm=False)]
    for prompt, tokens in zip(prompts, got):
        expected = twin.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW, do_sample=False)
        assert tokens == expected[0, len(prompt):].tolist()
    assert llm.stats.weight_updates == 1 and llm.stats.prefix_cache_hit_tokens == hits


def test_a_fused_optimizer_step_is_seen_although_it_bumps_no_version_counter():
    """``AdamW(fused=True)`` (HF Trainer's default optimizer) updates parameters without version counters."""
    model = hf_minivllm.accelerate(tiny_model("qwen3"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    ids, mask = left_padded_batch(lengths=(40, 35))
    first = greedy(model, ids, mask)
    versions = [param._version for param in model.parameters()]
    model.train()
    model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    optimizer.step()
    model.eval()
    assert [param._version for param in model.parameters()] == versions
    got = greedy(model, ids, mask)
    assert torch.equal(got, greedy(unpatched_twin(model, "qwen3"), ids, mask)) and not torch.equal(got, first)
    assert hf_minivllm.stats(model)["weight_updates"] == 1


def test_replaced_modules_and_an_untied_lm_head_are_seen():
    model = hf_minivllm.accelerate(tiny_model("qwen3"))  # tied embeddings
    ids, mask = left_padded_batch(lengths=(30, 21))
    greedy(model, ids, mask)
    attn = model.model.layers[0].self_attn
    torch.manual_seed(5)
    attn.q_proj = torch.nn.Linear(attn.q_proj.in_features, attn.q_proj.out_features, bias=False)
    with torch.no_grad():
        attn.q_proj.weight.normal_(0, 0.3)
    assert torch.equal(greedy(model, ids, mask), greedy(unpatched_twin(model, "qwen3"), ids, mask))
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() * -1.0)  # untied now
    got = greedy(model, ids, mask)
    twin = tiny_model("qwen3")  # tied: load everything but the head, then untie it the same way
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    twin.load_state_dict(state, strict=False)
    twin.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    assert torch.equal(got, greedy(twin, ids, mask))
    assert hf_minivllm.stats(model)["rebuilds"] == 2


def test_a_layer_the_engine_cannot_serve_goes_to_hf_until_it_is_gone():
    """A wrapped layer after accelerate (an adapter, a quantizer) must not be served from the old weights: such
    calls go to HF's generate (one warning), and the engine serves again once the layer is plain."""

    model = hf_minivllm.accelerate(tiny_model("llama"))
    ids, mask = left_padded_batch(lengths=(20,))
    expected = greedy(model, ids, mask)
    mlp = model.model.layers[1].mlp
    plain = mlp.up_proj
    mlp.up_proj = ScaledLayer(plain, 2)
    with pytest.warns(UserWarning, match="model.layers.1.mlp.up_proj is a Scaled"):
        wrapped = greedy(model, ids, mask)
    assert torch.equal(greedy(model, ids, mask), wrapped)
    assert torch.equal(wrapped, type(model).generate(model, input_ids=ids, attention_mask=mask,
                                                     max_new_tokens=MAX_NEW, do_sample=False))
    assert not torch.equal(wrapped, expected)
    assert hf_minivllm.stats(model)["fallbacks"] == 2
    mlp.up_proj = plain
    assert torch.equal(greedy(model, ids, mask), expected)
    assert hf_minivllm.stats(model)["fallbacks"] == 2


def test_a_rebuild_with_requests_in_flight_and_in_chunked_prefill_finishes_them_exactly():
    """New tensors while a stream is half done and a prompt is half prefilled: the rebuild recomputes them."""
    from hf_minivllm.engine.sequence import SequenceStatus

    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 320, (n,), generator=generator).tolist() for n in (60, 100, 100)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    engine = dict(num_kvcache_blocks=128, kvcache_block_size=4, max_model_len=128, max_num_batched_tokens=128,
                  enable_prefix_caching=False)
    expected = LLM(tiny_model("llama"), **engine).generate(prompts, params, use_tqdm=False)
    model = tiny_model("llama")
    llm = LLM(model, **engine)
    stream = llm.stream(prompts, params)
    events = [next(stream)]
    assert llm.engine.in_flight is not None and any(seq.block_table for seq in llm.engine.scheduler.waiting)
    o_proj = model.model.layers[0].self_attn.o_proj
    o_proj.weight = torch.nn.Parameter(o_proj.weight.detach().clone())  # same values, new tensor
    assert len(llm.generate([[11, 12, 13]], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)) == 1
    assert llm.stats.rebuilds == 1
    events += list(stream)
    tokens = {}
    for event in events:
        tokens.setdefault(event.index, []).extend(event.token_ids)
    assert [tokens[i] for i in range(3)] == [out["token_ids"] for out in expected]
    manager = llm.engine.scheduler.block_manager
    assert not any(manager.ref_counts) and not llm.engine.has_unfinished()
    assert all(seq.status is not SequenceStatus.RUNNING for seq in llm.engine.scheduler.running)


def test_moe_expert_and_router_edits_and_a_replaced_expert_parameter_are_seen():
    """Qwen3-MoE: one expert's slice of the stacked weights and a router edited in place (storage the engine
    shares: new values, no rebuild), then the stacked experts replaced (a rebuild); each call equals an unpatched
    twin, and prompts cached before a change are not reused."""
    model = hf_minivllm.accelerate(tiny_model("qwen3_moe"))
    ids, mask = left_padded_batch(lengths=(40, 35, 21, 50))
    first = greedy(model, ids, mask)
    layers = model.model.layers
    with torch.no_grad():
        layers[0].mlp.experts.down_proj[3].mul_(-2.0)
    got = greedy(model, ids, mask)
    assert torch.equal(got, greedy(unpatched_twin(model, "qwen3_moe"), ids, mask))
    assert not torch.equal(got, first), "the change must matter, or the test proves nothing"
    with torch.no_grad():
        layers[2].mlp.gate.weight.mul_(4.0)
    routed = greedy(model, ids, mask)
    assert torch.equal(routed, greedy(unpatched_twin(model, "qwen3_moe"), ids, mask))
    assert not torch.equal(routed, got)
    stats = hf_minivllm.stats(model)
    assert stats["weight_updates"] == 2 and stats["rebuilds"] == 0 and stats["fallbacks"] == 0
    experts = layers[2].mlp.experts
    experts.gate_up_proj = torch.nn.Parameter(experts.gate_up_proj.detach().flip(0).clone())
    replaced = greedy(model, ids, mask)
    assert torch.equal(replaced, greedy(unpatched_twin(model, "qwen3_moe"), ids, mask))
    assert not torch.equal(replaced, routed)
    assert hf_minivllm.stats(model)["rebuilds"] == 1


def test_an_in_place_edit_of_the_rotary_frequencies_reaches_the_engine():
    """The decoder turns HF's ``inv_freq`` buffer into its own cos/sin table: new values there (a RoPE scaling
    applied in place) need a rebuild, not only a prefix-cache reset."""
    model = hf_minivllm.accelerate(tiny_model("llama"))
    ids, mask = left_padded_batch(lengths=(40, 33))
    first = greedy(model, ids, mask)
    with torch.no_grad():
        model.model.rotary_emb.inv_freq.mul_(0.25)
    got = greedy(model, ids, mask)
    assert torch.equal(got, type(model).generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW,
                                                 do_sample=False))
    assert not torch.equal(got, first), "the change must matter, or the test proves nothing"
    assert hf_minivllm.stats(model)["rebuilds"] == 1


def test_an_edit_made_while_the_decoder_is_built_is_seen_by_the_first_call(monkeypatch):
    """A training thread may edit the weights while ``LLM`` builds its decoder. The edit lands after the decoder read
    the rotary frequencies into its own table: the first call must still compute with the edited model."""
    model = tiny_model("llama")
    build = LLM._build_decoder

    def build_then_edit(llm):
        decoder = build(llm)
        with torch.no_grad():
            model.model.rotary_emb.inv_freq.mul_(0.25)
        monkeypatch.setattr(LLM, "_build_decoder", build)  # once: a rebuild reads the edited model
        return decoder

    monkeypatch.setattr(LLM, "_build_decoder", build_then_edit)
    ids, mask = left_padded_batch(lengths=(40, 33))
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    llm = LLM(model, num_kvcache_blocks=64, kvcache_block_size=4)
    got = [out["token_ids"] for out in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_NEW,
                                                                          ignore_eos=True), use_tqdm=False)]
    expected = greedy(model, ids, mask)[:, ids.shape[1]:].tolist()
    assert got == expected
    assert llm.stats.rebuilds == 1
    llm.close()


def test_a_sync_that_may_block_is_announced_to_the_server():
    """The server prepares requests on its event loop and moves the weight sync to a thread when it may block: a
    rebuild, or another thread's sync under way. An in-place edit (a prefix-cache reset, no ranks) does not."""
    model = tiny_model("llama")
    llm = LLM(model, num_kvcache_blocks=32, kvcache_block_size=4)
    assert not llm.sync_would_block()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(0.5)
    assert not llm.sync_would_block()
    with llm._weights_lock:  # as another thread's sync holds it
        assert llm.sync_would_block()
    model.model.layers[0].mlp.down_proj.weight = torch.nn.Parameter(model.model.layers[0].mlp.down_proj.weight * 2)
    assert llm.sync_would_block()
    llm.sync_weights()
    assert not llm.sync_would_block() and llm.engine.stats.rebuilds == 1
    llm.close()


def test_a_rebuild_that_failed_for_good_is_not_tried_again(monkeypatch):
    """A rebuild whose new and old decoders both fail to start closes the engine; later calls say so at once,
    without building another decoder first."""
    model = tiny_model("llama")
    llm = LLM(model, num_kvcache_blocks=32, kvcache_block_size=4)
    monkeypatch.setattr(llm.engine, "_start", lambda decoder: 1 / 0)
    builds = []
    build = llm._build_decoder
    monkeypatch.setattr(llm, "_build_decoder", lambda: builds.append(1) or build())
    model.model.layers[0].mlp.down_proj.weight = torch.nn.Parameter(model.model.layers[0].mlp.down_proj.weight * 2)
    with pytest.raises(ZeroDivisionError):
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2), use_tqdm=False)
    assert llm.engine.closed and builds == [1]
    with pytest.raises(RuntimeError, match="could not rebuild its decoder"):
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2), use_tqdm=False)
    assert builds == [1]


@pytest.mark.parametrize("built_in", ["accelerate", "rebuild"])
def test_a_decoder_built_under_inference_mode_leaves_the_model_trainable(built_in):
    """HF's q/k/v and gate/up weights become views of the decoder's fused tensors. Built under the caller's
    ``torch.inference_mode`` (``accelerate`` there, or a rebuild after a weight change run by a call made there),
    those were inference tensors, and the next training step raised."""
    model = tiny_model("qwen3")
    ids, mask = left_padded_batch(lengths=(20, 13))
    if built_in == "accelerate":
        with torch.inference_mode():
            hf_minivllm.accelerate(model)
    else:
        hf_minivllm.accelerate(model)
        replace_parameters(model)
        with torch.inference_mode():
            greedy(model, ids, mask)
        assert hf_minivllm.stats(model)["rebuilds"] == 1
    train_step(model, ids, mask)
    assert torch.equal(greedy(model, ids, mask), greedy(unpatched_twin(model, "qwen3"), ids, mask))

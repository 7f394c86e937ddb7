"""Blocks and stacks: norm placements, the parallel layout, MLP kinds, mixture of experts, multiway MLPs, bias off,
drop-path and gradient checkpointing — each against the formula it stands for.

Shape legend: B batch, T tokens, S memory tokens, D width, H hidden width, E experts, N = B*T tokens.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mmformer.layers import Block, DropPath, MixtureOfExperts, Mlp, Stack, make_mlp, pop_aux_loss

B, T, S, D = 2, 5, 3, 16


def _randomize_norms(module: nn.Module) -> nn.Module:
    """Non-trivial norm affines, so that a norm applied in the wrong place shows."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
                m.weight.copy_(1 + 0.3 * torch.randn_like(m.weight))
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(0.3 * torch.randn_like(m.bias))
    return module


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x, memory = torch.randn(B, T, D), torch.randn(B, S, D)
    mask = torch.tensor([[True] * T, [True] * 3 + [False] * (T - 3)])
    memory_mask = torch.tensor([[True] * S, [True, False, True]])
    return x, mask, memory, memory_mask


# ---------------------------------------------------------------- norm placement and layout
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("placement", ["pre", "post", "sandwich"])
def test_block_norm_placement(make_stack_config, placement, norm):
    cfg = make_stack_config(norm_placement=placement, norm=norm, cross_attention=True)
    block = _randomize_norms(Block(cfg).eval())
    x, mask, memory, memory_mask = _inputs()
    out = block(x, mask=mask, causal=True, memory=memory, memory_mask=memory_mask)

    def sublayer(sub, h, **kwargs):
        assert isinstance(sub.norm, nn.LayerNorm if norm == "layernorm" else nn.RMSNorm)
        if placement == "pre":  # x + f(norm(x))
            assert sub.norm_out is None
            return h + sub.fn(sub.norm(h), **kwargs)
        if placement == "post":  # norm(x + f(x)), BERT / original transformer
            assert sub.norm_out is None
            return sub.norm(h + sub.fn(h, **kwargs))
        return h + sub.norm_out(sub.fn(sub.norm(h), **kwargs))  # sandwich

    h = sublayer(block.attn, x, mask=mask, causal=True)
    h = sublayer(block.cross_attn, h, mask=memory_mask, memory=memory)
    expected = sublayer(block.mlp, h)
    torch.testing.assert_close(out, expected)


def test_parallel_block_adds_attention_and_mlp_of_one_norm(make_stack_config):
    block = _randomize_norms(Block(make_stack_config(parallel=True)).eval())
    assert isinstance(block.mlp, Mlp)  # the bare MLP, no sublayer of its own
    x, mask, _, _ = _inputs()
    h = block.attn.norm(x)
    expected = x + block.attn.fn(h, mask=mask, causal=True) + block.mlp(h)
    torch.testing.assert_close(block(x, mask=mask, causal=True), expected)


def test_block_without_memory_skips_cross_attention(make_stack_config):
    block = Block(make_stack_config(cross_attention=True)).eval()
    x = torch.randn(B, T, D)
    expected = block.mlp(block.attn(x))
    torch.testing.assert_close(block(x), expected)


@pytest.mark.parametrize("final_norm", [True, False])
def test_stack_runs_blocks_in_order_then_the_final_norm(make_stack_config, final_norm):
    stack = _randomize_norms(Stack(make_stack_config(depth=3, final_norm=final_norm)).eval())
    x, mask, _, _ = _inputs()
    h = x
    for block in stack.blocks:
        h = block(h, mask=mask)
    expected = stack.norm(h) if final_norm else h
    assert isinstance(stack.norm, nn.Identity) != final_norm
    torch.testing.assert_close(stack(x, mask=mask), expected)


# ---------------------------------------------------------------- MLP kinds
def _activation64(kind: str, h: torch.Tensor) -> torch.Tensor:
    if kind == "gelu":
        return 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    if kind == "gelu_tanh":
        return 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    assert kind == "quickgelu"
    return h * torch.sigmoid(1.702 * h)


def _mlp64(mlp: Mlp, kind: str, x: torch.Tensor) -> torch.Tensor:
    """The MLP in float64 from its weights; SwiGLU's fc1 holds [gate | up] rows."""
    x = x.double()
    w1, w2 = mlp.fc1.weight.double(), mlp.fc2.weight.double()
    b1 = mlp.fc1.bias.double() if mlp.fc1.bias is not None else 0
    b2 = mlp.fc2.bias.double() if mlp.fc2.bias is not None else 0
    h = x @ w1.T + b1
    if kind == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        h = gate * torch.sigmoid(gate) * up
    else:
        h = _activation64(kind, h)
    return h @ w2.T + b2


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", ["gelu", "gelu_tanh", "quickgelu", "swiglu"])
def test_mlp_kinds_match_their_formula(make_stack_config, kind, bias):
    cfg = make_stack_config(mlp=kind, mlp_hidden=24, bias=bias)
    mlp = make_mlp(cfg)
    assert isinstance(mlp, Mlp)
    assert mlp.fc1.out_features == (48 if kind == "swiglu" else 24) and mlp.fc2.in_features == 24
    x = 3 * torch.randn(B, T, D)  # wide enough that the activations differ from each other
    torch.testing.assert_close(mlp(x).double(), _mlp64(mlp, kind, x), rtol=0, atol=1e-5)


def test_mlp_ratio_sets_the_hidden_width(make_stack_config):
    assert make_mlp(make_stack_config(mlp_ratio=3.0)).fc1.out_features == 48
    assert make_mlp(make_stack_config(mlp_ratio=3.0, mlp_hidden=10)).fc1.out_features == 10


# ---------------------------------------------------------------- mixture of experts
def _moe_reference(moe: MixtureOfExperts, x: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token by token: softmax router, top-k experts, weights renormalised over the chosen k; and the Switch
    load-balancing loss E * Σ_e f_e P_e (f_e: share of the N*k routing slots that went to e; P_e: mean router
    probability of e; with k = 1 exactly the Switch Transformer's formula)."""
    tokens = x.reshape(-1, x.shape[-1])
    n_experts = len(moe.experts)
    out = torch.zeros_like(tokens)
    counts = torch.zeros(n_experts)
    probs_sum = torch.zeros(n_experts)
    for n in range(tokens.shape[0]):
        probs = torch.softmax(moe.router.weight @ tokens[n], dim=-1)
        chosen = sorted(range(n_experts), key=lambda e: -probs[e].item())[:top_k]
        total = sum(probs[e] for e in chosen)
        for e in chosen:
            out[n] += probs[e] / total * moe.experts[e](tokens[n])
            counts[e] += 1
        probs_sum += probs
    f = counts / (tokens.shape[0] * top_k)
    p = probs_sum / tokens.shape[0]
    return out.reshape(x.shape), n_experts * (f * p).sum()


@pytest.mark.parametrize(("top_k", "kind"), [(1, "gelu"), (2, "gelu"), (2, "swiglu"), (3, "quickgelu")])
def test_mixture_of_experts_matches_a_per_token_reference(make_stack_config, top_k, kind):
    cfg = make_stack_config(n_experts=4, experts_top_k=top_k, mlp=kind)
    moe = make_mlp(cfg)
    assert isinstance(moe, MixtureOfExperts) and moe.router.bias is None
    with torch.no_grad():
        moe.router.weight.mul_(4)  # a decisive router: no near-ties in the top-k choice
    x = torch.randn(B, T, D)
    out = moe(x)
    expected, aux = _moe_reference(moe, x, top_k)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pop_aux_loss(moe), aux, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("top_k", [1, 2])
def test_aux_loss_is_one_for_a_uniform_router(make_stack_config, top_k):
    moe = make_mlp(make_stack_config(n_experts=4, experts_top_k=top_k))
    with torch.no_grad():
        moe.router.weight.zero_()  # every expert equally likely for every token
    moe(torch.randn(B, T, D))
    assert pop_aux_loss(moe).item() == pytest.approx(1.0, abs=1e-6)


def test_aux_loss_averages_every_recorded_call_and_is_popped_once(make_stack_config):
    stack = Stack(make_stack_config(depth=3, n_experts=4, experts_top_k=2))
    inputs = [torch.randn(B, T, D), torch.randn(B, T, D)]
    for x in inputs:  # two forwards through one stack (e.g. image and text): 6 MoE calls
        stack(x)
    got = pop_aux_loss(stack)
    per_call = []
    for x in inputs:
        stack(x)
        per_call += [loss for block in stack.blocks for loss in block.mlp.fn.pop_aux_losses()]
    assert len(per_call) == 6
    torch.testing.assert_close(got, torch.stack(per_call).mean())
    assert pop_aux_loss(stack) is None  # popped: nothing left
    assert pop_aux_loss(Stack(make_stack_config())) is None  # no experts
    stack.eval()
    stack(inputs[0])
    assert pop_aux_loss(stack) is None  # nothing recorded in eval mode


def test_aux_loss_has_gradients_for_the_router(make_stack_config):
    moe = make_mlp(make_stack_config(n_experts=4, experts_top_k=2))
    moe(torch.randn(B, T, D))
    pop_aux_loss(moe).backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- multiway
def test_multiway_uses_one_mlp_per_modality_behind_shared_attention(make_stack_config):
    cfg = make_stack_config(multiway=["image", "audio"])
    block = _randomize_norms(Block(cfg).eval())
    mlps = block.mlp.fn
    assert set(mlps.experts) == {"image", "audio"}
    assert len([m for m in block.modules() if m.__class__.__name__ == "Attention"]) == 1  # attention is shared
    x = torch.randn(B, T, D)
    h = block.attn(x)  # the same attention output for every modality
    outs = {}
    for modality, mlp in [("image", mlps.experts["image"]), ("audio", mlps.experts["audio"]), ("text", mlps.shared)]:
        outs[modality] = block(x, modality=modality)
        torch.testing.assert_close(outs[modality], h + mlp(block.mlp.norm(h)))
    assert not torch.allclose(outs["image"], outs["text"]) and not torch.allclose(outs["image"], outs["audio"])

    # gradients of an image forward reach the shared attention and the image MLP only
    block.train()
    block(x, modality="image").sum().backward()
    assert block.attn.fn.qkv.weight.grad is not None
    assert mlps.experts["image"].fc1.weight.grad is not None
    assert mlps.experts["audio"].fc1.weight.grad is None and mlps.shared.fc1.weight.grad is None


def test_multiway_stack_routes_the_modality_to_every_block(make_stack_config):
    stack = Stack(make_stack_config(multiway=["image"])).eval()
    x = torch.randn(B, T, D)
    expected = x
    for block in stack.blocks:
        expected = block(expected, modality="image")
    torch.testing.assert_close(stack(x, modality="image"), stack.norm(expected))


# ---------------------------------------------------------------- bias off
@pytest.mark.parametrize("extra", [{}, dict(mlp="swiglu", qk_norm=True), dict(n_experts=3, experts_top_k=1)])
def test_bias_off_leaves_no_linear_bias(make_stack_config, extra):
    stack = Stack(make_stack_config(bias=False, cross_attention=True, multiway=["image"], **extra))
    linears = [m for m in stack.modules() if isinstance(m, nn.Linear)]
    assert linears and all(m.bias is None for m in linears)
    rms = Stack(make_stack_config(bias=False, norm="rmsnorm", cross_attention=True, **extra))
    assert [n for n, _ in rms.named_parameters() if "bias" in n] == []
    with_bias = Stack(make_stack_config(cross_attention=True, **extra))
    assert all(m.bias is not None for m in with_bias.modules() if isinstance(m, nn.Linear) and m.out_features != 3)


# ---------------------------------------------------------------- drop-path
def test_drop_path_drops_whole_samples_in_training():
    drop = DropPath(0.5)
    x = torch.ones(400, 3, 4)
    out = drop(x)
    per_sample = out.flatten(1)
    dropped = (per_sample == 0).all(dim=1)
    kept = (per_sample == 2.0).all(dim=1)  # survivors rescaled by 1 / (1 - p)
    assert bool((dropped | kept).all())
    assert 100 < int(dropped.sum()) < 300
    drop.eval()
    assert drop(x) is x
    assert DropPath(0.0).train()(x) is x


def test_drop_path_in_a_block(make_stack_config):
    """Eval: the block equals one without drop-path. Train: each sample's branch is all or nothing."""
    cfg = make_stack_config(drop_path=0.5)
    block, plain = Block(cfg, drop_path=0.5), Block(make_stack_config())
    plain.load_state_dict(block.state_dict())
    x = torch.randn(64, 3, D)
    torch.testing.assert_close(block.eval()(x), plain.eval()(x))
    block.train()
    branch = block.attn.fn(block.attn.norm(x))
    out = block.attn(x)
    dropped = torch.isclose(out, x, atol=1e-6).flatten(1).all(dim=1)
    kept = torch.isclose(out, x + 2 * branch, atol=1e-5).flatten(1).all(dim=1)
    assert bool((dropped ^ kept).all()) and dropped.any() and kept.any()


def test_stack_drop_path_rate_grows_linearly(make_stack_config):
    stack = Stack(make_stack_config(depth=5, drop_path=0.2))
    assert [b.attn.drop_path.p for b in stack.blocks] == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    assert all(b.mlp.drop_path.p == b.attn.drop_path.p for b in stack.blocks)


# ---------------------------------------------------------------- gradient checkpointing
@pytest.mark.parametrize("extra", [{}, dict(n_experts=3, experts_top_k=2, position="rope")])
def test_gradient_checkpointing_gives_the_same_output_and_gradients(make_stack_config, extra):
    base = dict(cross_attention=True, dropout=0.1, drop_path=0.1, **extra)
    plain, ckpt = Stack(make_stack_config(**base)), Stack(make_stack_config(gradient_checkpointing=True, **base))
    ckpt.load_state_dict(plain.state_dict())
    x, mask, memory, memory_mask = _inputs()
    results = []
    for stack in (plain, ckpt):
        stack.train()
        xi, mi = x.clone().requires_grad_(), memory.clone().requires_grad_()
        torch.manual_seed(1)  # the same dropout / drop-path draws; checkpointing replays them on recompute
        out = stack(xi, mask=mask, causal=True, memory=mi, memory_mask=memory_mask)
        aux = pop_aux_loss(stack)
        (out.pow(2).sum() + (aux if aux is not None else 0)).backward()
        grads = {n: p.grad for n, p in stack.named_parameters()}
        results.append((out, xi.grad, mi.grad, grads))
    (out0, gx0, gm0, g0), (out1, gx1, gm1, g1) = results
    torch.testing.assert_close(out1, out0)
    torch.testing.assert_close(gx1, gx0)
    torch.testing.assert_close(gm1, gm0)
    assert g0.keys() == g1.keys()
    for name in g0:
        assert (g0[name] is None) == (g1[name] is None), name
        if g0[name] is not None:
            torch.testing.assert_close(g1[name], g0[name], msg=name)

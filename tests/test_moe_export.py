"""A mixture of experts traces with ``torch.export`` (what ONNX / torch-export graphs, PT2E and static int8 calibrate
through): its forward has no Python branch on how many tokens an expert received — a data-dependent guard
(``Ne(u0, 0)``) that export could not trace. An expert no token chose runs on zero rows and adds nothing.

Shape legend: B batch, T tokens, D width, E experts, N = B*T tokens.
"""

from __future__ import annotations

import torch

from mmformer.layers import MixtureOfExperts, make_mlp

D, E = 16, 4


def _moe(make_stack_config, top_k: int) -> MixtureOfExperts:
    """A seeded MoE whose router never picks the last expert (its logit is far below the others'), so one expert
    always receives no token."""
    torch.manual_seed(0)
    moe = make_mlp(make_stack_config(width=D, n_experts=E, experts_top_k=top_k)).eval()
    with torch.no_grad():
        moe.router.weight[-1] = 0.0
        moe.router.weight[:-1].abs_()  # positive inputs below give the last expert the lowest logit
    return moe


def _dense_reference(moe: MixtureOfExperts, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, weighted by its renormalised router probability where it is among the top k (0
    elsewhere): the routed computation without any indexing."""
    tokens = x.reshape(-1, x.shape[-1])  # (N, D)
    probs = moe.router(tokens).softmax(dim=-1)  # (N, E)
    top = probs.topk(moe.top_k, dim=-1)
    weights = torch.zeros_like(probs).scatter(1, top.indices, top.values / top.values.sum(-1, keepdim=True))
    outs = torch.stack([expert(tokens) for expert in moe.experts], dim=1)  # (N, E, D)
    return (weights[..., None] * outs).sum(dim=1).reshape(x.shape)


def test_an_expert_without_tokens_adds_nothing(make_stack_config):
    """The forward without the token-count branch computes what routing means, to float rounding."""
    for top_k in (1, 2):
        moe = _moe(make_stack_config, top_k)
        x = torch.rand(2, 5, D)  # (B, T, D)
        with torch.no_grad():
            assert not (moe.router(x).topk(top_k, dim=-1).indices == E - 1).any()  # the case under test
            torch.testing.assert_close(moe(x), _dense_reference(moe, x), rtol=0, atol=1e-6)


def test_a_mixture_of_experts_models_towers_export(make_model_config):
    """The image tower's graph, as ``mmformer export`` and static int8 trace it (dynamic batch), exports and computes
    what the eager tower does."""
    from mmformer import MultimodalTransformer
    from mmformer.ship.exportable import graphs

    torch.manual_seed(0)
    model = MultimodalTransformer(make_model_config(stack={"n_experts": E, "experts_top_k": 2})).eval()
    graph = next(g for g in graphs(model, ["image"]) if g.name == "image_encoder")
    inputs = tuple(graph.inputs.values())
    program = torch.export.export(graph.module, inputs, dynamic_shapes=graph.dynamic_shapes())
    with torch.no_grad():
        for got, expected in zip(program.module()(*inputs), graph.module(*inputs), strict=True):
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)

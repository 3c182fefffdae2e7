import math

import pytest
import torch
import torch.nn.functional as F

from blocks import Block
from config import ClassifierConfig, LMConfig
from models import Classifier, count_params
from moe import FeedForward, MoE


def tiny(**kw):
    base = dict(d_model=32, n_heads=2, d_ff=48, num_experts=4, top_k=2, dropout=0.0, noisy_gate=False,
                vocab_size=50, max_len=16)
    base.update(kw)
    return ClassifierConfig(**base)


def dense_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, weighted by the (renormalised) top-k router weights: the textbook formula."""
    flat = x.reshape(-1, x.size(-1))
    probs = moe.gate(flat).float().softmax(-1)
    weights, experts = probs.topk(moe.top_k, dim=-1)
    if moe.norm_topk_prob:
        weights = weights / weights.sum(-1, keepdim=True)
    ex = moe.experts  # stacked weights: w_up (E, C, H), w_down (E, H, C)
    h = F.gelu(torch.einsum("nc,ech->enh", flat, ex.w_up) + ex.b_up[:, None])  # (E, N, H)
    all_out = (torch.einsum("enh,ehc->enc", h, ex.w_down) + ex.b_down[:, None]).transpose(0, 1)  # (N, E, C)
    picked = all_out.gather(1, experts[..., None].expand(-1, -1, flat.size(-1)))  # (N, K, C)
    routed = (picked * weights[..., None]).sum(1)
    return (routed + (moe.shared(flat) if moe.shared is not None else 0)).view_as(x)


@pytest.mark.parametrize("impl", ["grouped", "loop"])
@pytest.mark.parametrize("top_k,shared", [(1, 0), (2, 0), (3, 0), (1, 1)])
def test_sparse_dispatch_equals_dense_reference(top_k, shared, impl):
    torch.manual_seed(0)
    moe = MoE(tiny(top_k=top_k, shared_experts=shared, moe_impl=impl))
    x = torch.randn(3, 7, 32, requires_grad=True)
    y, _ = moe(x)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = dense_reference(moe, x_ref)
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-5)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x] + list(moe.parameters()), g, allow_unused=True)
    grads_ref = torch.autograd.grad(ref, [x_ref] + list(moe.parameters()), g, allow_unused=True)
    for a, b in zip(grads, grads_ref):
        if a is None or b is None:
            assert (a is None or a.abs().max() == 0) and (b is None or b.abs().max() == 0)
        else:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_aux_loss_changes_router_gradient():
    torch.manual_seed(0)
    x = torch.randn(4, 8, 32)
    grads = []
    for coef in (0.0, 1.0):
        torch.manual_seed(1)
        moe = MoE(tiny(balance_coef=coef, z_coef=0.0))
        y, out = moe(x)
        (y.pow(2).mean() + out.aux_loss).backward()
        grads.append(moe.gate.weight.grad.clone())
    assert not torch.allclose(grads[0], grads[1])
    # and the balance loss alone carries gradient into the router (it is built from probabilities, not counts)
    moe = MoE(tiny())
    _, out = moe(x)
    (g,) = torch.autograd.grad(out.aux_loss, moe.gate.weight)
    assert g.abs().sum() > 0


def test_balance_loss_value_is_switch_formula():
    torch.manual_seed(0)
    moe = MoE(tiny(balance_coef=1.0, z_coef=0.0))
    x = torch.randn(2, 5, 32)
    _, out = moe(x)
    flat = x.reshape(-1, 32)
    logits = moe.gate(flat).float()
    probs = logits.softmax(-1)
    sel = probs.topk(2, -1).indices
    f = torch.bincount(sel.reshape(-1), minlength=4).float() / sel.numel()
    expected = 4 * (f * probs.mean(0)).sum()
    torch.testing.assert_close(out.balance_loss, expected)
    torch.testing.assert_close(out.z_loss, torch.logsumexp(logits, -1).pow(2).mean())
    # perfectly balanced routing gives the minimum, 1.0; ours is at least that
    assert out.balance_loss >= 1.0 - 1e-6


def test_top1_router_gets_gradient_from_task_loss():
    torch.manual_seed(0)
    moe = MoE(tiny(top_k=1, balance_coef=0.0, z_coef=0.0))
    y, _ = moe(torch.randn(2, 6, 32))
    y.sum().backward()
    assert moe.gate.weight.grad.abs().sum() > 0


def test_noise_only_in_training():
    torch.manual_seed(0)
    moe = MoE(tiny(noisy_gate=True))
    x = torch.randn(4, 8, 32)
    moe.eval()
    with torch.no_grad():
        a, _ = moe(x)
        b, _ = moe(x)
    assert torch.equal(a, b)
    moe.train()
    with torch.no_grad():
        c, _ = moe(x)
        d, _ = moe(x)
    assert not torch.equal(c, d)


def test_noise_starts_near_noise_init():
    torch.manual_seed(0)
    moe = MoE(tiny(noisy_gate=True, noise_init=0.05)).train()
    x = torch.randn(4096, 32)
    with torch.no_grad():
        moe.noise.weight.zero_()  # what the std-0.02 init is close to: the std is then exactly noise_init
        a, b = moe.route(x)[0], moe.route(x)[0]  # same logits, two noise draws
    std = float((a - b).std() / math.sqrt(2))
    assert 0.045 < std < 0.06
    with pytest.raises(ValueError, match="noise_init=0"):
        tiny(noisy_gate=True, noise_init=0.0)


def test_padding_is_not_routed():
    moe = MoE(tiny())
    x = torch.randn(2, 5, 32)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    y, out = moe(x, mask)
    assert int(out.expert_counts.sum()) == 8 * 2
    assert torch.all(y[0, 3:] == 0)
    x.requires_grad_(True)  # a batch of padding only: nothing routed, zero output, and backward still works
    y, out = moe(x, torch.zeros_like(mask))
    (y.sum() + out.aux_loss).backward()
    assert int(out.expert_counts.sum()) == 0 and torch.all(y == 0) and torch.all(x.grad == 0)


def test_capacity_drops_lowest_router_weight():
    torch.manual_seed(0)
    moe = MoE(tiny(top_k=1, capacity_factor=1.0))
    with torch.no_grad():  # router prefers expert 0 for every token, with confidence growing with x[:, 0]
        moe.gate.weight.zero_()
        moe.gate.weight[0, 0] = 1.0
    N = 8
    x = torch.zeros(1, N, 32)
    x[0, :, 0] = torch.linspace(1.0, 8.0, N)  # token 7 wants expert 0 most
    y, out = moe(x)
    capacity = math.ceil(1.0 * N * 1 / 4)
    assert int(out.expert_counts[0]) == capacity and int(out.dropped) == N - capacity
    kept = (y[0].abs().sum(-1) > 0).nonzero().squeeze(1).tolist()
    assert kept == list(range(N - capacity, N))  # the highest-weight tokens, not the first rows


def test_cached_causal_decoding_equals_full_forward():
    torch.manual_seed(0)
    cfg = tiny()
    blocks = torch.nn.ModuleList(Block(cfg, use_moe=i == 1) for i in range(2)).eval()
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        full = x
        for b in blocks:
            full, _ = b(full, causal=True)
        caches = [{} for _ in blocks]
        steps = []
        for t in range(9):
            h = x[:, t:t + 1]
            for b, c in zip(blocks, caches):
                h, _ = b(h, causal=True, cache=c)
            steps.append(h)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_params_total_vs_active_and_dense_twin():
    moe_cfg = tiny(num_layers=2)
    moe_model = Classifier(moe_cfg)
    total, active = count_params(moe_model, moe_cfg)
    per_expert = sum(p.numel() for p in FeedForward(32, 48).parameters())
    assert total - active == 2 * per_expert * (4 - 2)
    dense_cfg = tiny(num_layers=2, num_experts=0)
    dense_model = Classifier(dense_cfg)
    d_total, d_active = count_params(dense_model, dense_cfg)
    assert d_total == d_active
    router = 2 * 32 * 4  # the only extra active weights of the MoE model are its routers
    assert active - d_active == router + 2 * 32 * (2 - 1)  # plus k down-biases where the dense FFN has one
    # with a shared expert (+ top-1): the dense twin is still as wide as the active experts together
    shared_cfg = tiny(num_layers=2, top_k=1, shared_experts=1)
    twin_cfg = tiny(num_layers=2, top_k=1, shared_experts=1, num_experts=0)
    s_total, s_active = count_params(Classifier(shared_cfg), shared_cfg)
    t_total, _ = count_params(Classifier(twin_cfg), twin_cfg)
    assert s_total - s_active == 2 * per_expert * (4 - 1)
    assert s_active - t_total == router + 2 * 32 * 1  # the routed + the shared expert's down-bias


def test_classifier_variants_and_bf16():
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, 6:] = 0
    labels = torch.tensor([0, 1, 0])
    for cfg in (tiny(num_layers=2), tiny(num_layers=0), tiny(num_layers=1, num_experts=0, pooling="mean")):
        model = Classifier(cfg).eval()
        logits, loss, info = model(ids, mask, labels=labels)
        assert logits.shape == (3, 2) and torch.isfinite(loss)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits16, _, _ = model(ids, mask, labels=labels)
        # bf16 keeps ~3 significant digits: within 2% of the logits' own scale (about 0.4% measured)
        assert (logits16.float() - logits).abs().max() <= 0.02 * logits.abs().max()
        # padding must not change the prediction for the padded row
        short, _, _ = model(ids[:1, :6], mask[:1, :6])
        torch.testing.assert_close(short, logits[:1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("E,top_k,capacity_factor,shared", [(1, 1, 0.0, 0), (4, 2, 0.0, 0), (8, 2, 0.0, 1),
                                                            (4, 2, 0.5, 0), (8, 2, 1.0, 1)])
def test_grouped_experts_equal_the_per_expert_loop(E, top_k, capacity_factor, shared):
    """The grouped_mm path against the reference loop: outputs and every gradient, with padding masks,
    capacity dropping, shared experts and idle experts (8 experts, few tokens)."""
    torch.manual_seed(0)
    cfg = dict(num_experts=E, top_k=top_k, capacity_factor=capacity_factor, shared_experts=shared)
    grouped, loop = MoE(tiny(**cfg, moe_impl="grouped")), MoE(tiny(**cfg, moe_impl="loop"))
    x = torch.randn(3, 5, 32)
    if E == 8:  # make the last expert idle: feature 0 is large and pulls every token away from it
        x[..., 0] = 10.0
        with torch.no_grad():
            grouped.gate.weight[:, 0] = 1.0
            grouped.gate.weight[-1, 0] = -1.0
    loop.load_state_dict(grouped.state_dict())
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, 2:] = False
    mask[2, 4:] = False
    results = []
    for moe in (grouped, loop):
        xi = x.clone().requires_grad_(True)
        y, out = moe(xi, mask)
        g = torch.autograd.grad((y.square().sum() + out.aux_loss), [xi] + list(moe.parameters()))
        results.append((y, out, g))
    (y1, o1, g1), (y2, o2, g2) = results
    torch.testing.assert_close(y1, y2, atol=1e-6, rtol=1e-5)
    assert o1.expert_counts.tolist() == o2.expert_counts.tolist() and int(o1.dropped) == int(o2.dropped)
    if capacity_factor:
        assert int(o1.dropped) > 0
    if E == 8:
        w_up_grad = g1[1 + [n for n, _ in grouped.named_parameters()].index("experts.w_up")]
        assert o1.expert_counts[-1] == 0 and w_up_grad[-1].abs().max() == 0  # idle: no gradient
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_checkpoint_with_per_expert_layout_still_loads():
    """tests/data holds a tiny LM saved before the stacked layout (experts.<e>.up.weight ...) and before the
    per-model configs, and its logits on one input, computed by the code that wrote it; today's model loads it
    and gives the same logits."""
    import os
    from checkpoint import load_trained
    data = os.path.join(os.path.dirname(__file__), "data")
    model, _, ckpt = load_trained(os.path.join(data, "lm_tiny_per_expert_layout.pt"), "lm", "", torch.device("cpu"))
    assert "blocks.1.ffn.experts.3.down.weight" in ckpt["state_dict"]  # really the old layout
    # ... and the old config: one class for every model, with the classifier's and seq2seq's fields
    assert {"causal", "pooling", "rope"} <= set(ckpt["model_config"]) and type(model.config).__name__ == "LMConfig"
    expected = torch.load(os.path.join(data, "lm_tiny_per_expert_layout.logits.pt"), weights_only=True)
    logits = model(expected["input_ids"])[0]
    torch.testing.assert_close(logits, expected["logits"], atol=1e-5, rtol=1e-5)


def test_expert_matrices_get_weight_decay_and_their_biases_do_not():
    from optim import param_groups
    moe = MoE(tiny())
    decay, no_decay = (set(map(id, g["params"])) for g in param_groups(moe, 0.1))
    ex = moe.experts
    assert {id(ex.w_up), id(ex.w_down), id(moe.gate.weight)} <= decay
    assert {id(ex.b_up), id(ex.b_down)} <= no_decay


def test_muon_groups_and_its_adamw_part_equals_torch_adamw():
    from models import LanguageModel
    from optim import Muon, param_groups
    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=64, max_len=16, d_model=16, n_heads=2, num_layers=2, d_ff=16, num_experts=4, top_k=2)
    model = LanguageModel(cfg)
    groups = param_groups(model, 0.1, muon=True)
    muon = {id(p) for g in groups if g.get("muon") for p in g["params"]}
    ffn = model.blocks[0].ffn
    assert {id(ffn.experts.w_up), id(ffn.experts.w_down), id(model.blocks[0].attn.q_proj.weight)} <= muon
    assert not {id(ffn.gate.weight), id(ffn.noise.weight), id(model.tok_emb.weight), id(ffn.experts.b_up)} & muon
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    # --set muon_experts=false: the expert stacks go to AdamW's decayed group, the other hidden matrices stay
    from config import TrainConfig
    from optim import build_optimizer
    groups = build_optimizer(model, TrainConfig(optimizer="muon", muon_experts=False), torch.device("cpu")).param_groups
    muon = {id(p) for g in groups if g["muon"] for p in g["params"]}
    decayed = {id(p) for g in groups if not g["muon"] and g["weight_decay"] > 0 for p in g["params"]}
    assert {id(model.blocks[0].attn.q_proj.weight), id(model.blocks[1].attn.q_proj.weight)} <= muon
    assert {id(ffn.experts.w_up), id(ffn.experts.w_down)} <= decayed
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    # the AdamW groups of Muon step exactly as torch.optim.AdamW
    twin = LanguageModel(cfg)
    twin.load_state_dict(model.state_dict())
    ours = Muon(param_groups(model, 0.1), lr=1e-2, betas=(0.9, 0.95))
    ref = torch.optim.AdamW(param_groups(twin, 0.1), lr=1e-2, betas=(0.9, 0.95))
    idx = torch.randint(0, 64, (4, 16))
    for step in range(5):
        for m, opt in ((model, ours), (twin, ref)):
            torch.manual_seed(step)  # the same router noise for both
            opt.zero_grad()
            m(idx, targets=idx)[1].backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_orthogonalize_each_expert_matrix_on_its_own():
    from optim import orthogonalize
    torch.manual_seed(0)
    g = torch.randn(2, 32, 16)
    g[1] *= 1000  # experts with very different gradient scales: each is normalised by its own norm
    s = torch.linalg.svdvals(orthogonalize(g))  # (2, 16)
    assert s.min() > 0.5 and s.max() < 1.5  # Newton-Schulz's "about orthogonal" band (Jordan et al.)
    assert torch.allclose(orthogonalize(g)[0], orthogonalize(g[:1])[0], atol=1e-5)

    x16 = orthogonalize(g, dtype=torch.bfloat16)  # Muon's usual precision, where the hardware has it
    assert x16.dtype == torch.bfloat16
    s16 = torch.linalg.svdvals(x16.float())
    assert s16.min() > 0.5 and s16.max() < 1.5


@pytest.mark.parametrize("ns_steps", [5, 2])  # the default, and --set muon_steps=2
def test_muon_step_batches_same_shape_matrices_and_equals_one_by_one(monkeypatch, ns_steps):
    """Muon orthogonalises all matrices of one shape as one stack; each parameter's update is what the
    orthogonalisation of its own Nesterov momentum alone gives, with its Newton-Schulz steps (fp32, so the
    reference is exact)."""
    import math
    import optim
    from models import LanguageModel
    from optim import Muon, orthogonalize, param_groups
    monkeypatch.setattr(optim, "newton_schulz_dtype", lambda device: torch.float32)
    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=64, max_len=16, d_model=16, n_heads=2, num_layers=2, d_ff=32, num_experts=4, top_k=2)
    model = LanguageModel(cfg)
    model(torch.randint(0, 64, (4, 16)), targets=torch.randint(0, 64, (4, 16)))[1].backward()
    groups = param_groups(model, 0.1, muon=True)
    hidden = [p for g in groups if g.get("muon") for p in g["params"]]
    assert len({tuple(p.shape[-2:]) for p in hidden}) < len(hidden)  # some shapes are shared: they batch
    before = {p: p.detach().clone() for p in hidden}
    lr, wd, momentum = 1e-2, 0.1, 0.95
    Muon(groups, lr=lr, ns_steps=ns_steps).step()
    for p in hidden:
        nesterov = p.grad.lerp(p.grad * (1 - momentum), momentum)  # first step: buffer = (1 - m) grad
        expected = before[p] * (1 - lr * wd) - lr * 0.2 * math.sqrt(max(p.shape[-2:])) * orthogonalize(nesterov,
                                                                                                       ns_steps)
        torch.testing.assert_close(p.detach(), expected, atol=1e-6, rtol=1e-5)


def test_wide_ngram_part_is_the_hashed_bag_and_ignores_padding():
    """The classifier's wide part equals the hand-written bag of hashed token 1-3-grams / sqrt(count); padding
    (and whatever ids sit under it) changes nothing; at init it adds nothing; ngram_lr gives it its own group."""
    from config import TrainConfig
    from optim import build_optimizer
    torch.manual_seed(0)
    model = Classifier(tiny(num_layers=1, ngram_buckets=97))
    assert model.hashed_ngrams(torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.bool)).abs().max() == 0
    nn_w = torch.randn(97, 2)
    model.ngram.weight.data.copy_(nn_w)
    ids = torch.tensor([[5, 6, 7, 0, 0], [9, 8, 7, 6, 5]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    for b, n_real in enumerate((3, 5)):
        t = ids[b, :n_real].tolist()
        grams = [(t[i], 1) for i in range(n_real)] + \
                [(t[i] * 1_000_003 + t[i + 1], 2) for i in range(n_real - 1)] + \
                [((t[i] * 1_000_003 + t[i + 1]) * 1_000_003 + t[i + 2], 3) for i in range(n_real - 2)]
        want = sum(nn_w[(g * 31 + n) % 97] for g, n in grams) / math.sqrt(len(grams))
        torch.testing.assert_close(model.hashed_ngrams(ids, mask)[b], want)
    other = ids.clone()
    other[0, 3:] = 42  # different ids under the padding
    torch.testing.assert_close(model.hashed_ngrams(other, mask), model.hashed_ngrams(ids, mask))
    opt = build_optimizer(model, TrainConfig(lr=1e-3, ngram_lr=0.05), torch.device("cpu"))
    own = [g for g in opt.param_groups if any(p is model.ngram.weight for p in g["params"])]
    assert len(own) == 1 and own[0]["lr"] == 0.05 and len(own[0]["params"]) == 1


def test_masked_lm_view_passes_grad_checkpoint_to_the_encoder():
    """The trainer sets grad_checkpoint on the model it runs; in pretraining that is the MaskedLM view."""
    from models import MaskedLM
    torch.manual_seed(0)
    model = Classifier(tiny(num_layers=2))
    mlm = MaskedLM(model)
    ids = torch.randint(5, 50, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    labels = torch.where(torch.rand(2, 8) < 0.5, ids, torch.full_like(ids, -100))
    grads = []
    for on in (False, True):
        mlm.grad_checkpoint = on
        assert model.grad_checkpoint is on
        model.zero_grad()
        mlm(ids, mask, labels)[1].backward()
        grads.append([p.grad.clone() for p in model.blocks.parameters() if p.grad is not None])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


# -----------------------------------------------------------------------------
# Auxiliary-loss-free balancing (balance="bias")

def skewed_router(moe):
    """Every token's first feature is 1 and the gate adds 2 to expert 0's logit for it: expert 0 is in nearly
    every token's top-2, the other experts share the second places."""
    with torch.no_grad():
        moe.gate.weight[:, 0] = 0.0
        moe.gate.weight[0, 0] = 2.0
    x = torch.randn(4, 32, 32, generator=torch.Generator().manual_seed(0))
    x[..., 0] = 1.0
    return x


def load_cv(moe, x):
    _, out = moe(x)
    load = out.expert_counts.float()
    return float(load.std() / load.mean())


def test_bias_balancing_moves_a_skewed_router_toward_uniform_load():
    moe = MoE(tiny(balance="bias", bias_rate=0.003)).train()
    x = skewed_router(moe)
    before = load_cv(moe, x)
    moe.update_bias()
    for _ in range(300):  # the trainer calls update_bias after each optimizer step
        moe(x)
        moe.update_bias()
    after = load_cv(moe, x)
    assert before > 0.5 and after < 0.1  # 0.5: one expert takes about half of all assignments
    assert int(moe.expert_bias.argmin()) == 0  # the over-used expert was pushed down


def test_bias_picks_experts_but_never_weights_them():
    moe = MoE(tiny(balance="bias")).eval()
    flat = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    _, probs = moe.route(flat)
    with torch.no_grad():
        moe.expert_bias[3] = 10.0  # expert 3 must be among every token's two
    _, probs_b = moe.route(flat)
    weights, selected = moe.select(probs_b)
    torch.testing.assert_close(probs_b, probs)  # the bias is not in the probabilities
    assert (selected == 3).any(dim=1).all()
    picked = probs.gather(1, selected)
    torch.testing.assert_close(weights, picked / picked.sum(1, keepdim=True))  # weights from probs alone


def test_bias_is_saved_resumed_and_updated_by_the_trainer():
    from trainer import apply_gradients
    moe = MoE(tiny(balance="bias", bias_rate=0.01)).train()
    x = skewed_router(moe)
    opt = torch.optim.SGD(moe.parameters(), lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    y, out = moe(x)
    (y.sum() + out.aux_loss).backward()
    apply_gradients(moe, opt, sched, scaler, 1.0)
    assert moe.expert_bias[0] == -0.01 and moe.expert_bias.abs().eq(0.01).all()  # one step of 0.01 each
    twin = MoE(tiny(balance="bias"))
    twin.load_state_dict(moe.state_dict())
    torch.testing.assert_close(twin.expert_bias, moe.expert_bias)
    assert "expert_bias" not in MoE(tiny()).state_dict()  # balance="loss" models (and old checkpoints) have none
    assert float(out.aux_loss.detach()) == pytest.approx(0.001 * float(out.z_loss))  # no balance loss added under "bias"


@pytest.mark.parametrize("task,moe_layers", [("cls", "all"), ("lm", "all"), ("lm", "odd"), ("seq2seq", "odd")])
def test_upcycled_moe_computes_the_dense_model_at_step_0(task, moe_layers):
    from config import MODEL_CONFIGS
    from models import build_model
    from moe import upcycle, upcycled_config
    shape = dict(vocab_size=60, max_len=16, d_model=32, n_heads=2, num_layers=2, d_ff=24, dropout=0.0)
    torch.manual_seed(0)
    dense = build_model(task, MODEL_CONFIGS[task](**shape, num_experts=0)).eval()
    cfg = upcycled_config(MODEL_CONFIGS[task](**shape, num_experts=4, top_k=2, moe_layers=moe_layers), dense.config)
    assert cfg.d_ff == cfg.dense_ff == 48 and cfg.num_experts == 4  # experts and dense layers: the dense width
    moe = build_model(task, cfg)
    upcycle(moe, dense.state_dict(), noise=0.0)
    moe.eval()
    ids = torch.randint(5, 60, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 12, dtype=torch.bool)
    args = {"lm": (ids,), "cls": (ids, mask), "seq2seq": (ids, mask, ids, mask)}[task]
    with torch.no_grad():
        want, got = dense(*args)[0], moe(*args)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    routers = [m.gate.weight for m in moe.modules() if isinstance(m, MoE)]
    per_stack = cfg.num_layers if moe_layers == "all" else cfg.num_layers // 2
    assert len(routers) == per_stack * (2 if task == "seq2seq" else 1) and all(r.abs().sum() > 0 for r in routers)


def test_upcycling_noise_parts_the_experts_and_bad_sources_are_refused():
    from models import LanguageModel
    from moe import upcycle, upcycled_config
    shape = dict(vocab_size=60, max_len=16, d_model=32, n_heads=2, num_layers=1, d_ff=24, dropout=0.0)
    dense = LanguageModel(LMConfig(**shape, num_experts=0))
    moe = LanguageModel(upcycled_config(LMConfig(**shape), dense.config))
    upcycle(moe, dense.state_dict(), noise=0.01, seed=0)
    w = moe.blocks[0].ffn.experts.w_up  # (E, C, H), each near the dense up-projection
    base = dense.blocks[0].ffn.up.weight.t()
    assert not torch.equal(w[0], w[1])
    assert ((w - base).std() / base.std()).item() == pytest.approx(0.01, rel=0.2)
    torch.testing.assert_close(moe.blocks[0].ffn.experts.b_up, dense.blocks[0].ffn.up.bias.expand(8, -1))  # 8 experts
    with pytest.raises(ValueError, match="MoE already"):
        upcycled_config(LMConfig(**shape), moe.config)
    with pytest.raises(ValueError, match="dense"):
        upcycled_config(LMConfig(**shape, num_experts=0), dense.config)
    with pytest.raises(ValueError, match="shared_experts"):
        upcycled_config(LMConfig(**shape, shared_experts=1), dense.config)
    wrong = {k: v for k, v in dense.state_dict().items() if k != "tok_emb.weight"}
    with pytest.raises(ValueError, match="tok_emb.weight"):
        upcycle(moe, wrong)


def expert_choice_reference(moe: MoE, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert choice by its definition: expert e computes the c tokens with the highest probs[:, e] and adds
    probs[t, e] * expert_e(x_t) to each; c = ceil(N * K / E). Returns (y (N, C), taken (N, E) 0/1)."""
    N, E, K = flat.size(0), moe.num_experts, moe.top_k
    probs = moe.gate(flat).float().softmax(-1)
    c = math.ceil(N * K / E)
    taken = torch.zeros(N, E)
    for e in range(E):
        taken[probs[:, e].topk(c).indices, e] = 1.0
    ex = moe.experts
    h = F.gelu(torch.einsum("nc,ech->enh", flat, ex.w_up) + ex.b_up[:, None])
    all_out = (torch.einsum("enh,ehc->enc", h, ex.w_down) + ex.b_down[:, None]).transpose(0, 1)  # (N, E, C)
    return (all_out * (probs * taken)[..., None]).sum(1), taken


@pytest.mark.parametrize("impl", ["grouped", "loop"])
def test_expert_choice_equals_its_definition_with_padding(impl):
    torch.manual_seed(0)
    moe = MoE(tiny(routing="expert", moe_impl=impl))
    x = torch.randn(3, 7, 32)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 3:] = False  # 17 real tokens
    xi = x.clone().requires_grad_(True)
    y, out = moe(xi, mask)
    flat = x[mask].clone().requires_grad_(True)
    want, taken = expert_choice_reference(moe, flat)
    torch.testing.assert_close(y[mask], want, atol=1e-6, rtol=1e-5)
    assert y[~mask].abs().max() == 0  # padding is not routed
    assert out.expert_counts.tolist() == [math.ceil(17 * 2 / 4)] * 4  # every expert takes the same number
    assert int(out.dropped) == int((taken.sum(1) == 0).sum())  # tokens no expert took
    assert float(out.aux_loss.detach()) == pytest.approx(0.001 * float(out.z_loss))  # z-loss only: balanced by design
    g = torch.autograd.grad(y[mask].square().sum(), [xi, moe.gate.weight])
    g_ref = torch.autograd.grad(want.square().sum(), [flat, moe.gate.weight])
    torch.testing.assert_close(g[0][mask], g_ref[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(g[1], g_ref[1], atol=1e-5, rtol=1e-4)


def test_expert_choice_batched_experts_equal_the_per_expert_loop():
    """Under expert choice every expert has the same number of rows, so the experts run as one (E, cap, C) batch
    (two baddbmm, biases fused): outputs and every gradient equal the reference loop's, with padding."""
    torch.manual_seed(0)
    batched, loop = (MoE(tiny(routing="expert", num_experts=8, shared_experts=1, moe_impl=impl))
                     for impl in ("auto", "loop"))
    loop.load_state_dict(batched.state_dict())
    x = torch.randn(3, 7, 32)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[0, 4:] = False
    results = []
    for moe in (batched, loop):
        xi = x.clone().requires_grad_(True)
        y, out = moe(xi, mask)
        results.append((y, torch.autograd.grad(y.square().sum() + out.aux_loss, [xi, *moe.parameters()])))
    (y1, g1), (y2, g2) = results
    torch.testing.assert_close(y1, y2, atol=1e-6, rtol=1e-5)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    y, out = batched(x, torch.zeros(3, 7, dtype=torch.bool))  # nothing to route: every expert takes 0 rows
    assert y.abs().max() == 0 and out.expert_counts.tolist() == [0] * 8


def test_expert_choice_only_where_no_future_leaks():
    from config import Seq2SeqConfig
    from models import LanguageModel, Seq2Seq
    with pytest.raises(ValueError, match="causal"):
        LMConfig(routing="expert")
    with pytest.raises(ValueError, match="balanced by construction"):
        tiny(routing="expert", balance="bias")
    with pytest.raises(ValueError, match="routing"):
        tiny(routing="experts")
    s2s = Seq2Seq(Seq2SeqConfig(vocab_size=50, d_model=32, n_heads=2, num_layers=2, decoder_layers=2, d_ff=32,
                                routing="expert"))
    assert [b.ffn.expert_choice for b in s2s.encoder] == [True, True]
    assert [b.ffn.expert_choice for b in s2s.decoder] == [False, False]  # the decoder keeps token choice
    assert all(b.ffn.expert_choice for b in Classifier(tiny(routing="expert", num_layers=2)).blocks)
    assert not any(b.ffn.expert_choice for b in LanguageModel(LMConfig(vocab_size=50, d_model=32, n_heads=2)).blocks)


def test_heatmap_trace_takes_each_tokens_heaviest_expert_under_both_routings():
    from analyze import top_expert
    torch.manual_seed(0)
    flat = torch.randn(17, 32)
    token = MoE(tiny())
    r = token.assign(flat)
    assert top_expert(r).tolist() == r.probs.argmax(1).tolist()  # token choice: the router's top-1
    chooser = MoE(tiny(routing="expert", top_k=1))  # 4 experts x 5 tokens for 17 tokens: some go to none
    r = chooser.assign(flat)
    _, taken = expert_choice_reference(chooser, flat)
    want = torch.where(taken.sum(1) > 0, (r.probs * taken).argmax(1), -1)  # -1: no expert took the token
    assert top_expert(r).tolist() == want.tolist()
    assert (want == -1).any()


@pytest.mark.parametrize("gather", [False, True])  # views of the chosen experts (CPU) or gathered copies (GPU)
@pytest.mark.parametrize("top_k,shared,balance", [(1, 0, "loss"), (2, 0, "loss"), (2, 1, "loss"), (2, 0, "bias")])
def test_decoding_a_few_tokens_equals_dispatch(gather, top_k, shared, balance):
    torch.manual_seed(0)
    moe = MoE(tiny(num_experts=8, top_k=top_k, shared_experts=shared, balance=balance)).eval()
    if moe.expert_bias is not None:
        moe.expert_bias.copy_(torch.randn(8))  # a bias that changes which experts are picked
    x = torch.randn(8 // top_k, 1, 32)  # N * K == E: the most decoding takes the short path for
    with torch.no_grad():
        y, stats = moe(x, decoding=True)
        assert stats is None  # no aux losses while decoding
        moe.few_tokens = lambda *a: pytest.fail("few_tokens taken in training")
        reference, _ = moe(x)
        torch.testing.assert_close(y, reference, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(y, dense_reference(moe, x) if balance == "loss" else reference)
    del moe.few_tokens
    with torch.no_grad():  # the routed part alone (forward adds the shared expert)
        routed = reference - (moe.shared(x) if shared else 0)
        torch.testing.assert_close(moe.few_tokens(x.view(-1, 32), gather=gather).view_as(x), routed,
                                   atol=1e-6, rtol=1e-5)
    bigger = torch.randn(8 // top_k + 1, 1, 32)  # N * K > E: dispatch, with its MoEOutput
    moe.few_tokens = lambda *a: pytest.fail("few_tokens taken for N * K > E")
    assert moe(bigger, decoding=True)[1] is not None

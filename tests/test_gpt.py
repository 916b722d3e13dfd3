"""The GPT alone, pure PyTorch on CPU: shapes, causality, FLOPs and parameter counts,
generation; and a bf16 + torch.compile + fused AdamW step on a GPU where there is one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from trainyard.models import build_model
from trainyard.models.gpt import GPT, SIZES, GPTConfig, flops_per_token, matmul_params, num_params

SMALL = GPTConfig(vocab_size=256, context=16, n_layer=2, n_head=2, n_embd=32)


def test_shapes_and_tied_embeddings():
    torch.manual_seed(0)
    model = GPT(SMALL)
    idx = torch.randint(0, 256, (3, 16))
    assert model(idx).shape == (3, 16, 256)
    assert model(idx[:, :5]).shape == (3, 5, 256)
    assert model.head.weight is model.wte.weight
    with pytest.raises(ValueError, match="context is 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_a_token_never_changes_the_outputs_before_it():
    torch.manual_seed(0)
    model = GPT(SMALL).eval()
    idx = torch.randint(0, 256, (2, 16))
    out = model(idx)
    for t in (0, 7, 15):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % 256
        again = model(changed)
        torch.testing.assert_close(again[:, :t], out[:, :t], rtol=0, atol=1e-6)
        assert not torch.allclose(again[:, t], out[:, t])  # and it does change its own output


def test_flops_formula_against_a_hand_count():
    # d=32, L=2, V=256, T=16: weights 2·12·32² + 256·32 = 24576 + 8192 = 32768 multiply each
    # token (2 FLOPs each forward, ×3 with the backward), attention 2 layers × (QKᵀ 2·T·d +
    # AV 2·T·d) = 4096 FLOPs forward per token, ×3.
    assert matmul_params(SMALL) == 32768
    assert flops_per_token(SMALL) == 3 * (2 * 32768 + 2 * 4 * 16 * 32) == 208896
    # gpt2-small: the familiar ~124M parameters (with a 50257-token vocabulary).
    gpt2 = GPTConfig.sized("gpt2-small", vocab_size=50257)
    assert round(num_params(gpt2) / 1e6) == 124


def test_flops_formula_against_torch_flop_counter():
    """torch's FLOP counter sees every weight matmul of a forward + backward; it counts the
    attention of scaled_dot_product_attention on CUDA kernels only, so that term is counted
    here on the explicit products QKᵀ and AV."""
    torch.manual_seed(0)
    model = GPT(SMALL)
    b, t = 3, SMALL.context
    with FlopCounterMode(display=False) as counter:
        model(torch.randint(0, 256, (b, t))).float().sum().backward()
    weights = counter.get_total_flops()
    d, h = SMALL.n_embd, SMALL.n_head
    q = torch.randn(b, h, t, d // h, requires_grad=True)
    k = torch.randn(b, h, t, d // h, requires_grad=True)
    v = torch.randn(b, h, t, d // h, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        ((q @ k.transpose(-2, -1)).softmax(-1) @ v).sum().backward()
    attention = SMALL.n_layer * counter.get_total_flops()
    assert weights + attention == flops_per_token(SMALL) * b * t


def test_parameter_count_matches_the_module():
    for config in (SMALL, SIZES["tiny"]):
        assert num_params(config) == sum(p.numel() for p in GPT(config).parameters())


def test_sizes_and_bad_configs():
    assert build_model("gpt", **vars(SIZES["tiny"])).config == SIZES["tiny"]
    assert GPTConfig.sized("gpt2-small", vocab_size=256).n_layer == 12
    with pytest.raises(ValueError, match="not a multiple of n_head"):
        GPTConfig(vocab_size=256, n_head=3, n_embd=128)
    with pytest.raises(ValueError, match="unknown GPT size"):
        GPTConfig.sized("huge", vocab_size=256)


def test_a_few_steps_learn_a_repeating_sequence_and_greedy_generation_continues_it():
    torch.manual_seed(0)
    model = GPT(SMALL)
    pattern = torch.tensor(list(b"abcdefgh" * 3))[: SMALL.context + 1]
    x, y = pattern[None, :-1], pattern[None, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1
    out = model.eval().generate(torch.tensor([list(b"abc")]), 40, temperature=0)
    assert out.shape == (1, 43)  # longer than the context: the model attends to the last 16
    assert bytes(out[0].tolist()).startswith(b"abcdefghabcdefgh")
    sampled = model.generate(torch.tensor([list(b"abc")]), 5, temperature=1.0, top_k=3)
    assert sampled.shape == (1, 8) and sampled[0, :3].tolist() == list(b"abc")
    # trainyard's sampler (models.outputs.sample: GPT.generate, trainyard generate, predict
    # --generate) reads the logits out of what Hugging Face models return: the same GPT
    # returning a ModelOutput-like dict draws what it draws returning the tensor, from the
    # same generator; a model whose logits are not (batch, time, vocabulary) is a ValueError.
    from trainyard.models.outputs import logits, sample

    class Output(dict):  # a ModelOutput is a dict subclass; its `logits` are the predictions
        @property
        def logits(self):
            return self["logits"]

    prompt = torch.tensor([list(b"abc")])
    as_hf = lambda ids: Output(logits=model(ids))  # noqa: E731
    for temperature, top_k in ((0.0, None), (1.0, 3)):
        g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        draws = [
            model.generate(prompt, 30, temperature, top_k, g1),
            sample(as_hf, prompt, 30, SMALL.context, temperature, top_k, g2),
        ]
        assert torch.equal(*draws)
    with pytest.raises(ValueError, match=r"sampling needs \(batch, time, vocabulary\)"):
        sample(lambda ids: model(ids)[:, -1], prompt, 1, SMALL.context)

    out = model(prompt)
    for returned in (out, {"logits": out}, Output(logits=out), (out, None), [out]):
        assert logits(returned) is out
    with pytest.raises(TypeError, match=r"the model returned dict with keys \['hidden'\]; "):
        logits({"hidden": out})


@pytest.mark.gpu
def test_bf16_compiled_fused_adamw_step_on_gpu():
    from trainyard.pipelines.config.train import TrainSpec
    from trainyard.pipelines.training.optim import make_optimizer

    torch.manual_seed(0)
    model = GPT(SIZES["tiny"]).cuda()
    optimizer = make_optimizer(model, TrainSpec(lr=1e-3))
    assert optimizer.defaults["fused"]
    compiled = torch.compile(model)
    idx = torch.randint(0, 256, (4, 129), device="cuda")
    losses = []
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = compiled(idx[:, :-1])
        assert logits.dtype == torch.bfloat16
        loss = F.cross_entropy(logits.flatten(0, 1).float(), idx[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]

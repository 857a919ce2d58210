"""The layer-by-layer runner reproduces the model and propagates modified layers."""
from __future__ import annotations

import pytest
import torch

from lmpress.calibration.layerwise import LayerwiseRunner
from lmpress.compress.arch import arch_for
from lmpress.compress.models import tiny_llama


@pytest.fixture
def model():
    return tiny_llama(num_hidden_layers=3)[0]


@pytest.fixture
def tokens():
    return torch.randint(0, 256, (5, 24), generator=torch.Generator().manual_seed(0))  # (n, T)


def _head(model, hidden: list[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model.lm_head(model.model.norm(torch.cat(hidden)))  # (n, T, vocab)


@pytest.mark.parametrize("device", [None, "cpu"])
def test_reproduces_logits(model, tokens, device):
    runner = LayerwiseRunner(model, arch_for(model), tokens, batch_size=2, device=device)  # batches 2, 2, 1
    steps = []
    for step in runner:
        assert len(step.inputs) == 3 and [x.shape[0] for x in step.inputs] == [2, 2, 1]
        assert step.inputs[0].shape == (2, 24, 96)
        steps.append((step.index, step.name, step.layer))
    assert steps == [(i, f"model.layers.{i}", model.model.layers[i]) for i in range(3)]
    with torch.no_grad():
        ref = model(tokens).logits
    assert (_head(model, runner.outputs) - ref).abs().max() <= 1e-5


def test_forward_matches_propagation_and_fires_hooks(model, tokens):
    runner = LayerwiseRunner(model, arch_for(model), tokens, batch_size=4)  # batches of 4, 1
    seen = []
    outs = None
    for step in runner:
        if outs is not None:  # the previous step's forward() outputs are this layer's inputs
            assert all(torch.equal(a, b) for a, b in zip(outs, step.inputs))
        handle = step.layer.self_attn.q_proj.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
        outs = step.forward()
        handle.remove()
        assert [o.shape for o in outs] == [x.shape for x in step.inputs]
    assert seen == [(4, 24, 96), (1, 24, 96)] * 3


def test_modified_layer_propagates(model, tokens):
    def layer1_inputs(zero: bool):
        for step in LayerwiseRunner(model, arch_for(model), tokens, batch_size=8):
            if step.index == 0 and zero:
                step.layer.self_attn.o_proj.weight.data.zero_()
            if step.index == 1:
                return torch.cat(step.inputs)

    before = layer1_inputs(zero=False)
    after = layer1_inputs(zero=True)
    assert not torch.allclose(before, after)
    # and the model agrees: layer 1 sees what the modified model feeds it
    captured = []
    h = model.model.layers[1].register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    with torch.no_grad():
        model(tokens)
    h.remove()
    assert torch.allclose(captured[0], after, atol=1e-6)


def test_eager_attention_mask(tokens):
    model, _ = tiny_llama(attn_implementation="eager")
    runner = LayerwiseRunner(model, arch_for(model), tokens, batch_size=3)
    for _ in runner:
        pass
    with torch.no_grad():
        ref = model(tokens).logits
    assert (_head(model, runner.outputs) - ref).abs().max() <= 1e-5

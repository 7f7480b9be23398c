"""A stage builds only its own slice, with the whole model's values, and chains to its loss."""
import torch

from hpcllm.model.gpt import GPT, GPTConfig
from hpcllm.parallel.pipeline.partition import Partition
from hpcllm.parallel.pipeline.stage import PipelineStage, activation_dtype


def cfg():
    return GPTConfig(n_layer=4, n_head=2, d_model=32, seq_len=16, vocab_size=300)


def test_stages_hold_only_their_slice_with_whole_model_values():
    c = cfg()
    whole = GPT(c)
    whole.init_weights(7)
    ref = dict(whole.named_parameters())
    part = Partition.from_counts([1, 2, 1])
    names = []
    for s in range(3):
        st = PipelineStage(c, part, s, seed=7)
        own = dict(st.named_parameters())
        names.append(set(own))
        for n, p in own.items():
            assert torch.equal(p, ref[n]), n
        blocks = {n.split(".")[1] for n in own if n.startswith("blocks.")}
        assert blocks == {str(i) for i in part.blocks(s)}
    assert "wte.weight" in names[0] and "wpe.weight" in names[0] and "ln_f.weight" not in names[0]
    assert names[1] == {n for n in ref if n.startswith(("blocks.1.", "blocks.2."))}
    assert "wte.weight" in names[2] and "ln_f.weight" in names[2] and "wpe.weight" not in names[2]
    assert set.union(*names) == set(ref)


def test_chained_stages_equal_whole_model_loss_and_grads():
    c = cfg()
    torch.manual_seed(0)
    x = torch.randint(0, 300, (3, 16))
    y = torch.randint(0, 300, (3, 16))
    whole = GPT(c)
    whole.init_weights(1)
    loss = whole(x, y)
    loss.backward()
    part = Partition.from_counts([2, 2])
    s0, s1 = PipelineStage(c, part, 0, seed=1), PipelineStage(c, part, 1, seed=1, recompute=True)
    h = s0(x)
    h1 = h.detach().requires_grad_(True)
    l2 = s1(h1, y)
    l2.backward()
    h.backward(h1.grad)
    torch.testing.assert_close(l2, loss, rtol=0, atol=0)
    grads = dict(whole.named_parameters())
    for st in (s0, s1):
        for n, p in st.named_parameters():
            if n == "wte.weight":
                continue
            torch.testing.assert_close(p.grad, grads[n].grad, rtol=1e-5, atol=1e-7)
    # tied matrix: the whole model's gradient is the sum of the two copies'
    tied = s0.gpt.wte.weight.grad + s1.gpt.wte.weight.grad
    torch.testing.assert_close(tied, grads["wte.weight"].grad, rtol=1e-5, atol=1e-7)
    assert s0.tied_parameter() is s0.gpt.wte.weight and s1.tied_parameter() is s1.gpt.wte.weight


def test_activation_dtype():
    import contextlib
    assert activation_dtype(cfg(), contextlib.nullcontext) == torch.float32

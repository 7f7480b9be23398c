"""Generation with a key/value cache equals recomputing the whole context (issue "Fast
generation", first part): greedy tokens identical for 64 new tokens from several prompts
(short, long, longer than seq_len: the window slides), for learned and rotary positions, and
the logits of every step within 1e-5 in fp32."""
import pytest
import torch

from hpcllm.infer.generate import SampleConfig, generate_ids
from hpcllm.model.gpt import GPT, preset

SEQ = 48


def model(pos_emb: str) -> GPT:
    torch.manual_seed(0)
    cfg = preset("tiny", n_layer=2, n_head=2, d_model=32, seq_len=SEQ, vocab_size=257, pos_emb=pos_emb)
    return GPT(cfg, init_seed=1).eval()


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
@pytest.mark.parametrize("prompt", [[5, 6, 7], list(range(10, 40)), list(range(70))], ids=["short", "long", "over"])
def test_greedy_tokens_equal_the_recomputing_path(pos_emb, prompt):
    m = model(pos_emb)
    runs = [generate_ids(m, prompt, SampleConfig(max_new_tokens=64, temperature=0, kv_cache=kv), seq_len=SEQ,
                         vocab_size=257) for kv in (True, False)]
    assert runs[0] == runs[1] and len(runs[0]) == 64


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_logits_of_every_step_within_1e_5(pos_emb):
    m = model(pos_emb)
    ids = [1, 2, 3, 4]
    cache = m.new_kv_cache(1, SEQ)
    with torch.no_grad():
        out = m(torch.tensor([ids]), kv=cache)[0, -1]
        for _ in range(SEQ - len(ids)):
            torch.testing.assert_close(out, m(torch.tensor([ids]))[0, -1], rtol=0, atol=1e-5)
            ids.append(int(out.argmax()))
            out = m(torch.tensor([ids[-1:]]), kv=cache)[0, -1]
    assert cache.pos == SEQ
    with pytest.raises(ValueError, match="longer than seq_len"):
        m(torch.tensor([[1]]), kv=cache)


def test_sampling_with_a_seed_is_the_same_with_and_without_the_cache():
    m = model("learned")
    a, b = (generate_ids(m, [3, 4], SampleConfig(max_new_tokens=40, temperature=0.9, top_k=20, seed=7, kv_cache=kv),
                         seq_len=SEQ, vocab_size=257) for kv in (True, False))
    assert a == b


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_each_prompt_of_a_mixed_batch_equals_its_output_alone(pos_emb):
    from hpcllm.infer.generate import generate_batch

    m = model(pos_emb)
    prompts = [[5, 6, 7], list(range(10, 30)), [9], [], list(range(40, 52))]
    sample = SampleConfig(max_new_tokens=16, temperature=0, stop_at_eod=False)
    alone = [generate_ids(m, p, sample, seq_len=SEQ, vocab_size=257, eod_id=256) for p in prompts]
    for bs in (2, 5):
        assert generate_batch(m, prompts, sample, seq_len=SEQ, vocab_size=257, eod_id=256, batch_size=bs) == alone
    # sampling: each row has its own generator with the seed, so batching does not change it
    hot = SampleConfig(max_new_tokens=12, temperature=0.9, top_k=20, seed=3, stop_at_eod=False)
    assert generate_batch(m, prompts, hot, seq_len=SEQ, vocab_size=257, batch_size=5) == [
        generate_ids(m, p, hot, seq_len=SEQ, vocab_size=257) for p in prompts]
    # too long for the window: those prompts go alone (sliding window), same answers
    long = SampleConfig(max_new_tokens=40, temperature=0, stop_at_eod=False)
    assert generate_batch(m, prompts, long, seq_len=SEQ, vocab_size=257, eod_id=256) == [
        generate_ids(m, p, long, seq_len=SEQ, vocab_size=257, eod_id=256) for p in prompts]

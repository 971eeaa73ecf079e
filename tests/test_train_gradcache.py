"""GradCache gives the plain step's gradients (tiny model, fp32) and replays dropout exactly."""
import numpy as np
import pytest
import torch

from allmpnet import Encoder
from allmpnet.train.gradcache import batch_loss, embed_for_training, forward_backward
from allmpnet.train.distributed import Context

WORDS = "the a cat dog car plant sun moon hello world test text search query sentence example".split()


def random_texts(n, seed):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 12)))) for _ in range(n)]


@pytest.fixture()
def model(tiny_model_dir):
    enc = Encoder(tiny_model_dir, device="cpu")
    enc.max_seq_length = 16
    return enc


def grads_of(model, columns, chunk_size):
    model.model.zero_grad(set_to_none=True)
    loss = forward_backward(model, columns, Context(), 20.0, chunk_size)
    return loss, {n: p.grad.clone() for n, p in model.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("n_columns, chunk_size", [(2, 3), (2, 1), (3, 4), (3, 64)])
def test_cached_step_equals_plain_step(model, n_columns, chunk_size):
    model.eval()  # no dropout: the plain step and the cached step see the same function
    columns = [model.tokenizer(random_texts(10, seed=k)).ids for k in range(n_columns)]
    plain_loss, plain = grads_of(model, columns, None)
    cached_loss, cached = grads_of(model, columns, chunk_size)
    assert cached_loss == pytest.approx(plain_loss, abs=1e-6)
    assert plain.keys() == cached.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(cached[name], plain[name], atol=1e-5, rtol=1e-4, msg=name)
    assert any(float(g.abs().max()) > 1e-4 for g in plain.values())  # the comparison is not between zeros


def test_cached_step_replays_dropout_masks(model):
    """With dropout on, GradCache must equal a step that runs the same chunks with graphs in the same order."""
    model.train()
    chunk = 4
    columns = [model.tokenizer(random_texts(6, seed=10 + k)).ids for k in range(2)]
    torch.manual_seed(123)
    cached_loss, cached = grads_of(model, columns, chunk)

    # reference: same length-sorted chunks, same random stream, but graphs kept (no cache, no re-run)
    model.model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    texts = [ids for column in columns for ids in column]
    order = np.argsort([-len(t) for t in texts], kind="stable")
    parts = []
    for start in range(0, len(order), chunk):
        rows = order[start:start + chunk]
        parts.append((torch.from_numpy(rows), embed_for_training(model, [texts[r] for r in rows])))
    embeddings = torch.zeros(len(texts), model.dim).index_put(
        (torch.cat([r for r, _ in parts]),), torch.cat([e for _, e in parts]))
    loss = batch_loss(list(embeddings.split(6)), Context(), 20.0)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(cached_loss, abs=1e-6)
    for name, p in model.model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(cached[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)

    # and dropout really was on: another seed gives another loss
    torch.manual_seed(321)
    other_loss, _ = grads_of(model, columns, chunk)
    assert other_loss != pytest.approx(cached_loss, abs=1e-6)


def test_bad_chunk_size(model):
    with pytest.raises(ValueError, match="chunk_size"):
        forward_backward(model, [[[0, 5, 2]] * 2, [[0, 6, 2]] * 2], Context(), 20.0, 0)

"""Packing: every record once per epoch, rows that fit, masks that keep records apart, and loss parity."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tuning_fork.data import batch_order, collate, collate_packed, pack_order

from .conftest import make_data


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 300), min_size=1, max_size=400), batch=st.integers(1, 9),
       limit=st.integers(16, 512), seed=st.integers(0, 3), epoch=st.integers(0, 3), ranks=st.sampled_from([1, 2, 4]))
def test_pack_order_sees_every_record_once_in_rows_that_fit(lengths, batch, limit, seed, epoch, ranks):
    batches = pack_order(lengths, batch, limit, seed, epoch, min_batch=ranks)
    records = [i for b in batches for row in b for i in row]
    assert sorted(records) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= batch + ranks - 1
        if len(batches) > 1:
            assert len(b) >= min(ranks, batch)
        for row in b:
            assert len(row) == 1 or sum(lengths[i] for i in row) <= limit
    assert batches == pack_order(lengths, batch, limit, seed, epoch, min_batch=ranks)


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(1, 50), min_size=1, max_size=200), batch=st.integers(1, 9),
       ranks=st.sampled_from([1, 2, 4]))
def test_batch_order_gives_every_rank_a_record(lengths, batch, ranks):
    batches = batch_order(lengths, batch, 0, 0, min_batch=ranks)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    if len(batches) > 1:
        assert all(len(b) >= min(ranks, batch) for b in batches)


def test_packed_masks_stay_inside_each_record():
    rows = [[([1, 2, 3, 4], ((2, 4),)), ([5, 6, 7], ((0, 3),))], [([8, 9], ((1, 2),))]]
    tokens, mask, segments = (np.array(a) for a in collate_packed(rows, 64))
    assert tokens[0, :7].tolist() == [1, 2, 3, 4, 5, 6, 7] and tokens[1, :2].tolist() == [8, 9]
    assert segments[0, :8].tolist() == [1, 1, 1, 1, 2, 2, 2, 0]
    # targets are tokens 1..: record one trains 3, 4 (after its prompt of 2); record two trains 6, 7,
    # never 5 (that would be predicting record two's first token from record one)
    assert np.flatnonzero(mask[0]).tolist() == [1, 2, 4, 5]
    assert np.flatnonzero(mask[1]).tolist() == [0]
    # and the same records unpacked train the same targets
    _, single = collate([([1, 2, 3, 4], ((2, 4),))], 64)
    assert np.flatnonzero(np.array(single[0])).tolist() == [1, 2]


@pytest.fixture(scope="module")
def tiny_lora():
    from omegaconf import OmegaConf

    from tuning_fork import models
    from tuning_fork.config import AdapterConfig, ModelConfig

    model, tokenizer = models.load(OmegaConf.structured(ModelConfig(path="tiny")))
    models.attach(model, OmegaConf.structured(AdapterConfig(rank=4)), OmegaConf.structured(ModelConfig()))
    return model, tokenizer


def test_a_packed_record_scores_exactly_as_it_does_alone(tiny_lora):
    import mlx.core as mx

    from tuning_fork.step import loss

    model, tokenizer = tiny_lora
    texts = ["What is 3 plus one? 3 plus one is 4.", "A much longer record about the weather in spring.",
             "Short."]
    records = [(ids, ((2, len(ids)),)) for ids in map(tokenizer.encode, texts)]
    tokens, mask, segments = collate_packed([records], 128)
    for k in range(len(records)):  # the loss of record k alone, from the packed row and unpacked
        only_k = mx.array(np.array(mask) & (np.array(segments)[:, 1:] == k + 1))
        packed, n_packed = loss(model, tokens, only_k, segments)
        alone, n_alone = loss(model, *collate([records[k]], 128))
        assert n_packed.item() == n_alone.item() > 0
        assert packed.item() == pytest.approx(alone.item(), rel=1e-4), k
    # without the record mask, attention leaks across records and the later records' losses change
    leaked, _ = loss(model, tokens, mx.array(np.array(mask) & (np.array(segments)[:, 1:] == 2)))
    alone, _ = loss(model, *collate([records[1]], 128))
    assert abs(leaked.item() - alone.item()) > 1e-3


@pytest.mark.slow
def test_packed_and_unpacked_training_reach_the_same_validation_loss(tmp_path):
    """Same records, same epochs, about the same tokens per step (8 records, or 1 row of about 8 records)."""
    from tuning_fork.train import train

    from .conftest import compose_cfg

    folder = make_data(tmp_path / "d", n_train=64, n_valid=16)
    common = ("data=jsonl", f"data.path={folder}", "schedule.epochs=6", "schedule.learning_rate=1e-3",
              "schedule.val_batches=-1",
              "adapter.rank=16", "adapter.alpha=32")
    unpacked = train(compose_cfg(*common, "schedule.batch_size=8", f"output_dir={tmp_path / 'u'}"))
    packed = train(compose_cfg(*common, "schedule.batch_size=1", "data.packing=true", "data.max_seq_length=320",
                               f"output_dir={tmp_path / 'p'}"))
    assert abs(packed["iters"] - unpacked["iters"]) <= unpacked["iters"] // 4  # about as many steps
    assert packed["first_val_loss"] == pytest.approx(unpacked["first_val_loss"], rel=1e-4)  # same start
    assert packed["val_loss"] < unpacked["first_val_loss"] / 2
    assert packed["val_loss"] == pytest.approx(unpacked["val_loss"], rel=0.1), (packed, unpacked)


@pytest.mark.parametrize("tied", [False, True, "biased", "frozen", "frozen_untied"])
def test_chunked_cross_entropy_gives_the_same_loss_and_gradients(tied):
    """The chunked loss (for 128k vocabularies) against the plain one, for a trained head (full) too: its
    own VJP for a plain head (untied, tied), recomputed checkpoints for any other (a head with a bias); with
    a frozen head (LoRA's case) the gradient computed beside the loss (step.eager_cross_entropy)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    from tuning_fork.step import loss

    args = llama.ModelArgs(model_type="llama", hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=97,
                           tie_word_embeddings=tied in (True, "frozen"))
    mx.random.seed(0)
    model = llama.Model(args)
    if tied == "biased":
        model.lm_head = nn.Linear(32, 97, bias=True)
    if str(tied).startswith("frozen"):
        (model.lm_head if tied == "frozen_untied" else model.model.embed_tokens).freeze()
        model.train()
    tokens = mx.random.randint(0, 97, (3, 41))
    mask = mx.random.uniform(shape=(3, 40)) > 0.3
    plain = nn.value_and_grad(model, lambda m, *b: loss(m, *b)[0])(model, tokens, mask)
    chunked = nn.value_and_grad(model, lambda m, *b: loss(m, *b, chunk=16)[0])(model, tokens, mask)
    assert chunked[0].item() == pytest.approx(plain[0].item(), rel=1e-5)
    a, b = dict(tree_flatten(plain[1])), dict(tree_flatten(chunked[1]))
    assert a.keys() == b.keys() and ("model.embed_tokens.weight" in a) == (tied != "frozen")
    for k in a:
        assert mx.allclose(a[k], b[k], rtol=1e-4, atol=1e-6).item(), k


def test_the_eager_cross_entropy_equals_the_plain_one_and_its_gradient():
    """step.eager_cross_entropy against mx's: the loss, and the gradient with respect to the hidden states,
    scaled by the cotangent (the mean over targets), in float32 and in bf16."""
    import mlx.core as mx
    import mlx.nn as nn

    from tuning_fork.step import eager_cross_entropy

    mx.random.seed(3)
    for dtype, tol in ((mx.float32, 1e-5), (mx.bfloat16, 2e-2)):
        h = mx.random.normal((37, 16)).astype(dtype)
        w = (0.3 * mx.random.normal((101, 16))).astype(dtype)
        t = mx.random.randint(0, 101, (37,))
        m = (mx.random.uniform(shape=(37,)) > 0.3).astype(mx.float32)

        def plain(h):
            ce = nn.losses.cross_entropy((h @ w.T).astype(mx.float32), t) * m
            return ce.sum() / m.sum()

        value, grad = mx.value_and_grad(plain)(h)
        ours, ours_grad = mx.value_and_grad(lambda h: eager_cross_entropy(8)(h, w, t, m)[0] / m.sum())(h)
        assert ours.item() == pytest.approx(value.item(), rel=tol)
        assert mx.allclose(ours_grad.astype(mx.float32), grad.astype(mx.float32), rtol=tol, atol=tol * 1e-2).item()


def test_rows_are_padded_so_the_models_input_width_is_a_multiple():
    """The model reads all but a row's last token: that width is what must be a multiple (on CUDA, 1,023
    inputs ran at half the speed of 1,024), so a full row of max_seq_length tokens gets one padding token."""
    from tuning_fork.data import pad_width

    assert pad_width(1024, 1024, 128) == 1025 and pad_width(1000, 1024, 128) == 1025
    assert pad_width(1024, 1024, 32) == 1025 and pad_width(40, 2048, 32) == 65 and pad_width(33, 2048, 32) == 33
    assert pad_width(5000, 2048, 128) == 2049  # rows are cut to max_seq_length first
    tokens, mask = collate([(list(range(3, 103)), ((1, 100),))], 100)
    assert tokens.shape[1] - 1 == mask.shape[1] and (tokens.shape[1] - 1) % 32 == 0

"""The FlashInfer peer's paged copy of the bench's K/V (bench/peers/flashinfer_decode.py), on CPU: the pages hold
exactly each sequence's tokens, in order, with page tables FlashInfer's plan() reads, for lengths that fill their
last page, leave it partly empty, or are a single token."""

import pytest
import torch

from bench.peers.flashinfer_decode import page_kv, unpage_kv


@pytest.mark.parametrize("page_tokens", [16, 5, 1])
def test_pages_hold_each_sequences_tokens_in_order(page_tokens):
    gen = torch.Generator().manual_seed(3)
    batch, num_kv_heads, seq_len, head_dim = 4, 3, 37, 8
    k = torch.randn(batch, num_kv_heads, seq_len, head_dim, generator=gen)
    v = torch.randn(batch, num_kv_heads, seq_len, head_dim, generator=gen)
    lens = torch.tensor([37, 1, 32, 17], dtype=torch.int32)
    paged = page_kv(k, v, lens, page_tokens=page_tokens)
    pages_per_seq = [-(-int(n) // page_tokens) for n in lens]
    assert paged.indptr.tolist() == [0, *torch.tensor(pages_per_seq).cumsum(0).tolist()]
    assert paged.k_pages.shape == (sum(pages_per_seq), num_kv_heads, page_tokens, head_dim)
    assert paged.last_page_len.tolist() == [int(n) - (p - 1) * page_tokens for n, p in zip(lens, pages_per_seq)]
    assert all(1 <= n <= page_tokens for n in paged.last_page_len.tolist())
    k_back, v_back = unpage_kv(paged, seq_len)
    for b, n in enumerate(lens.tolist()):
        assert torch.equal(k_back[b, :, :n], k[b, :, :n]) and torch.equal(v_back[b, :, :n], v[b, :, :n])
        assert not k_back[b, :, n:].any()
    # page p of sequence 0 is tokens p*page_tokens.. of every head (HND: heads before tokens)
    assert torch.equal(paged.k_pages[1], k[0, :, page_tokens:2 * page_tokens])


def test_lengths_outside_the_cache_are_refused():
    k = torch.zeros(2, 1, 8, 4)
    with pytest.raises(ValueError, match="within 1..8"):
        page_kv(k, k, torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="within 1..8"):
        page_kv(k, k, torch.tensor([9, 8]))

import numpy as np

from lorafit.data.pack import pack_documents
from lorafit.data.tokenize import tokenize_cached, tokenize_texts


def test_pack_puts_eos_after_every_document_and_cuts_exact_blocks():
    docs = [np.array([1, 2, 3]), np.array([4, 5]), np.array([6, 7, 8, 9])]
    blocks = pack_documents(docs, eos_id=0, seq_len=4)
    assert blocks.input_ids.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
    assert blocks.labels is None and blocks.position_ids is None  # every token trained, one stream
    assert blocks.members == [[0], [1, 2], [2]]
    blocks = pack_documents(docs + [np.array([10])], eos_id=0, seq_len=4)
    assert len(blocks) == 3  # the tail [10, 0] is dropped for training...
    with_tail = pack_documents(docs + [np.array([10])], eos_id=0, seq_len=4, keep_tail=True)
    # ...and kept for validation, padded with untrained EOS: [10, 0] has one target (the EOS).
    assert with_tail.input_ids[-1].tolist() == [10, 0, 0, 0]
    assert with_tail.labels[-1].tolist() == [10, 0, -100, -100]
    assert (with_tail.full_labels()[:, 1:] != -100).sum() == 3 * 3 + 1


def test_pack_boundaries_lose_no_token():
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 100, size=int(n)) for n in rng.integers(1, 50, size=40)]
    blocks = pack_documents(docs, eos_id=0, seq_len=16, keep_tail=True)
    labels = blocks.full_labels().reshape(-1)
    stream = labels[labels != -100]
    assert (stream == 0).sum() == len(docs)
    assert stream.tolist() == [t for d in docs for t in [*d.tolist(), 0]]


def test_tokenize_cache_hit_equals_fresh(tiny_model_dir, isolated_home):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = ["def add(a, b):\n    return a + b", "The quick brown fox.", ""]
    first = tokenize_cached(texts, tokenizer)
    files = list((isolated_home / "tokens").glob("*/shard.json"))
    assert len(files) == 1
    second = tokenize_cached(texts, tokenizer)
    assert (
        [a.tolist() for a in first]
        == [b.tolist() for b in second]
        == [a.tolist() for a in tokenize_texts(texts, tokenizer)]
    )
    tokenize_cached(texts[:2], tokenizer)
    assert len(list((isolated_home / "tokens").glob("*/shard.json"))) == 2  # keyed by the texts

"""Mutation audit of the zoo's token data (examples/nanogpt/data.py) against the documented promises.

Chunks are ``L + 1`` tokens at stride ``L`` that never run past a shard's end (also when its length is a
multiple of ``L``), consecutive chunks share one token (the shifted target), ids equal to the model's
vocabulary size are refused, ``*train*`` and ``*val*`` shards never mix, and the bundled corpus puts a
document in the held-out stream iff crc32(key) % 10 == 0.
"""
import zlib

import numpy as np
import pytest

from examples.nanogpt.data import ByteTokenizer, TokenStream, _pydoc_documents, bin_data, builtin_data, micro_batch, write_shard


def test_chunks_stay_inside_a_shard_whose_length_is_a_multiple_of_L():
    s = TokenStream([np.arange(100, dtype=np.uint16), np.arange(200, 221, dtype=np.uint16)], ["a", "b"])
    assert s.num_chunks(10) == 9 + 2  # 100 tokens hold 9 chunks of 11 (the 10th would need token 100)
    chunks = [s.chunk(k, 10) for k in range(s.num_chunks(10))]
    assert all(len(c) == 11 for c in chunks)
    assert [int(c[0]) for c in chunks] == [0, 10, 20, 30, 40, 50, 60, 70, 80, 200, 210]
    assert all(a[-1] == b[0] for a, b in zip(chunks[:8], chunks[1:9]))  # stride L: the target shift overlaps
    assert np.array_equal(s.chunk(11, 10), chunks[0])  # then a new epoch
    x, y = micro_batch(s, 8, rows=2, seq_len=5)
    assert x.flatten().tolist() == list(range(80, 90)) and y.flatten().tolist() == list(range(81, 91))


def test_an_id_equal_to_the_vocabulary_size_is_refused():
    s = TokenStream([np.array([1, 2, 3, 320, 4], dtype=np.uint16)], ["m"])
    with pytest.raises(ValueError, match="token id 320 >= model vocab_size 320"):
        s.chunk(0, 4, vocab_size=320)
    assert s.chunk(0, 4, vocab_size=321).tolist() == [1, 2, 3, 320, 4]


def test_train_and_val_shards_never_mix(tmp_path):
    write_shard(tmp_path / "fineweb_train_000001.bin", np.arange(0, 50))
    write_shard(tmp_path / "fineweb_train_000002.bin", np.arange(100, 150))
    write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(1000, 1050))
    td = bin_data(tmp_path)
    assert [n.split("/")[-1] for n in td.train.names] == ["fineweb_train_000001.bin", "fineweb_train_000002.bin"]
    assert [n.split("/")[-1] for n in td.val.names] == ["fineweb_val_000000.bin"]
    train = np.concatenate([td.train.chunk(k, 7) for k in range(td.train.num_chunks(7))])
    val = np.concatenate([td.val.chunk(k, 7) for k in range(td.val.num_chunks(7))])
    assert train.max() < 1000 <= val.min()


def test_builtin_heldout_split_is_crc32_of_the_key_mod_10():
    td = builtin_data("pydoc")
    tok = ByteTokenizer()
    want = {"train": [], "val": []}
    for key, text in _pydoc_documents():
        want["val" if zlib.crc32(key.encode()) % 10 == 0 else "train"] += [[tok.eot_id], list(tok.encode(text))]
    for split, stream in (("train", td.train), ("val", td.val)):
        (shard,) = stream.shards
        assert np.array_equal(shard, np.concatenate([np.asarray(p, dtype=np.uint16) for p in want[split]])), split

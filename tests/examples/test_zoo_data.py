"""Shard format, streams, the bundled corpus and the held-out pool."""
import numpy as np
import pytest
import torch

from examples.nanogpt.data import (HEADER_BYTES, MAGIC, ByteTokenizer, TokenStream, bin_data, builtin_data,
                                   heldout_pool, load_data, micro_batch, read_shard, write_shard)


def test_shard_round_trip(tmp_path):
    toks = np.arange(1000, dtype=np.int64) * 37 % 50257
    write_shard(tmp_path / "a.bin", toks)
    header = np.fromfile(tmp_path / "a.bin", dtype=np.int32, count=256)
    assert list(header[:3]) == [MAGIC, 1, 1000] and not header[3:].any()
    got = read_shard(tmp_path / "a.bin")
    assert got.dtype == np.uint16 and isinstance(got, np.memmap)
    assert np.array_equal(got, toks)


def _raw(path, header3, ntok_written):
    h = np.zeros(256, dtype=np.int32)
    h[:3] = header3
    path.write_bytes(h.tobytes() + np.zeros(ntok_written, dtype=np.uint16).tobytes())
    return path


def test_bad_magic_names_the_file(tmp_path):
    p = _raw(tmp_path / "bad.bin", (12345, 1, 10), 10)
    with pytest.raises(ValueError, match=r"bad\.bin: bad magic number 12345, expected 20240520"):
        read_shard(p)


def test_bad_version(tmp_path):
    with pytest.raises(ValueError, match="unsupported shard version 7"):
        read_shard(_raw(tmp_path / "v.bin", (MAGIC, 7, 10), 10))


def test_short_shard(tmp_path):
    p = _raw(tmp_path / "short.bin", (MAGIC, 1, 100), 60)
    with pytest.raises(ValueError, match=r"short\.bin: header promises 100 tokens .*truncated"):
        read_shard(p)
    (tmp_path / "tiny.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="shorter than the 1024-byte shard header"):
        read_shard(tmp_path / "tiny.bin")
    with pytest.raises(ValueError, match="trailing bytes"):
        read_shard(_raw(tmp_path / "long.bin", (MAGIC, 1, 10), 12))


def test_write_rejects_out_of_range(tmp_path):
    with pytest.raises(ValueError, match="0..65535"):
        write_shard(tmp_path / "x.bin", [1, 70000])


def test_stream_chunks_and_micro_batches(tmp_path):
    write_shard(tmp_path / "fineweb_train_000001.bin", np.arange(0, 101))
    write_shard(tmp_path / "fineweb_train_000002.bin", np.arange(1000, 1051))
    write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(5000, 5041))
    td = bin_data(tmp_path)
    assert (td.eot_id, td.vocab_size) == (50256, 50257)
    assert td.train.num_chunks(10) == 10 + 5          # chunks never straddle shards
    assert list(td.train.chunk(0, 10)) == list(range(0, 11))
    assert list(td.train.chunk(10, 10)) == list(range(1000, 1011))
    assert list(td.train.chunk(15, 10)) == list(td.train.chunk(0, 10))  # wraps around
    x, y = micro_batch(td.train, 1, rows=2, seq_len=5)
    assert x.tolist() == [[10, 11, 12, 13, 14], [15, 16, 17, 18, 19]]
    assert torch.equal(y, x + 1)
    with pytest.raises(ValueError, match="token id 1010 >= model vocab_size 1000"):
        micro_batch(td.train, 10, rows=1, seq_len=10, vocab_size=1000)
    assert load_data(str(tmp_path)).name == td.name


def test_heldout_pool_is_fixed(tmp_path):
    s = TokenStream([np.arange(200, dtype=np.uint16)], ["mem"])
    a = list(heldout_pool(s, seq_len=16, n_seqs=5, batch_size=2))
    b = list(heldout_pool(s, seq_len=16, n_seqs=5, batch_size=2))
    assert [x.shape[0] for x, _ in a] == [2, 2, 1]
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    x, y = a[0]
    assert x[1, 0] == 16 and torch.equal(y, x + 1)
    with pytest.raises(ValueError, match="holds 12"):
        next(heldout_pool(s, seq_len=16, n_seqs=13))


def test_builtin_corpus_offline_and_deterministic():
    td = builtin_data("pydoc")
    tok = ByteTokenizer()
    assert (td.eot_id, td.vocab_size) == (256, 257)
    train, val = td.train.shards[0], td.val.shards[0]
    assert train[0] == 256 and val[0] == 256                   # every document starts with EOT
    assert train.max() <= 256 and 0.03 < len(val) / (len(val) + len(train)) < 0.2
    assert "the" in tok.decode(train[:5000])
    builtin_data.cache_clear()
    again = builtin_data("pydoc")
    assert np.array_equal(again.val.shards[0], val)
    with pytest.raises(ValueError, match="expected 'pydoc' or 'stdlib'"):
        builtin_data("web")


def test_bin_data_needs_both_splits(tmp_path):
    write_shard(tmp_path / "fineweb_train_000001.bin", np.arange(10))
    with pytest.raises(FileNotFoundError, match="found 1 train, 0 val"):
        bin_data(tmp_path)


def test_header_size_constant():
    assert HEADER_BYTES == 1024


def test_write_shard_is_atomic(tmp_path, monkeypatch):
    """An overwrite that fails after the header (disk full, a kill) leaves the old shard intact and no temp file."""
    import builtins

    path = tmp_path / "s.bin"
    write_shard(path, np.arange(5000) % 60000)
    good = path.read_bytes()
    real_open = builtins.open

    class Failing:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += 1
            if self.n == 2:
                raise OSError("no space left on device (simulated)")
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        return Failing(f) if "w" in mode and str(file).startswith(str(tmp_path)) else f

    monkeypatch.setattr(builtins, "open", fake_open)
    with pytest.raises(OSError, match="simulated"):
        write_shard(path, np.arange(8000) % 60000)
    monkeypatch.undo()
    assert path.read_bytes() == good and len(read_shard(path)) == 5000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.bin"]


def test_write_shard_refuses_non_integer_ids(tmp_path):
    """Float ids were truncated silently (1.7 -> 1) into a valid-looking shard."""
    with pytest.raises(ValueError, match="need a 1-D integer array .* dtype float64"):
        write_shard(tmp_path / "f.bin", np.array([1.7, 2.2]))
    assert not (tmp_path / "f.bin").exists()
    write_shard(tmp_path / "e.bin", np.array([], dtype=np.int64))  # an empty shard is still fine
    assert len(read_shard(tmp_path / "e.bin")) == 0


@pytest.mark.parametrize("bad", [dict(batch_size=0), dict(n_seqs=0), dict(seq_len=-1)])
def test_heldout_pool_refuses_non_positive_sizes(bad):
    """batch_size=0 raised "range() arg 3 must not be zero"; n_seqs=0 yielded an empty pool silently."""
    s = TokenStream([np.arange(200) % 60000], ["s"])
    (name,) = bad
    with pytest.raises(ValueError, match=f"heldout_pool: {name}="):
        next(heldout_pool(s, **{**dict(seq_len=16, n_seqs=3, batch_size=1), **bad}))

"""Token data: modded-nanogpt ``.bin`` shards, an offline bundled corpus, batches, held-out pools.

Shard format (modded-nanogpt / llm.c): a header of 256 int32 (magic 20240520, version 1, token
count, zeros), then the tokens as uint16. Shards are memory-mapped, never read whole.

The bundled corpus needs no network: English text that ships with CPython (``pydoc_data.topics``,
optionally every top-level stdlib module's docstrings), one document per topic/module, encoded as
UTF-8 bytes (ids 0..255) with the end-of-text id 256 *prefixing* every document, as in the
FineWeb shards. Its content depends on the Python version; ``TokenData.name`` records it.
"""
from __future__ import annotations

import ast
import numbers
import os
import sys
import sysconfig
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from spectral_lens.atomic import write_atomic

MAGIC, VERSION, HEADER_INTS = 20240520, 1, 256
HEADER_BYTES = HEADER_INTS * 4
GPT2_VOCAB, GPT2_EOT = 50257, 50256


def write_shard(path: str | os.PathLike, tokens) -> None:
    """Write ``tokens`` (ids in 0..65535) as a ``.bin`` shard, atomically (temporary file, fsync, rename)."""
    toks = np.asarray(tokens)
    if toks.ndim != 1 or not (toks.size == 0 or np.issubdtype(toks.dtype, np.integer)) \
            or (toks.size and (toks.min() < 0 or toks.max() > 65535)):
        raise ValueError(f"write_shard({path}): need a 1-D integer array of ids in 0..65535, got shape {toks.shape} "
                         f"dtype {toks.dtype}" + (f", ids {toks.min()}..{toks.max()}" if toks.size else ""))
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = MAGIC, VERSION, toks.size
    payload = toks.astype(np.uint16).tobytes()

    def write(f) -> None:
        f.write(header.tobytes())
        f.write(payload)

    write_atomic(path, write)  # an interrupted write leaves the old shard (or none), never a truncated one


def read_shard(path: str | os.PathLike) -> np.ndarray:
    """Memory-map a ``.bin`` shard's tokens (uint16), validating header and length."""
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise ValueError(f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte shard header")
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if header[0] != MAGIC:
        raise ValueError(f"{path}: bad magic number {header[0]}, expected {MAGIC} (a modded-nanogpt .bin shard)")
    if header[1] != VERSION:
        raise ValueError(f"{path}: unsupported shard version {header[1]}, expected {VERSION}")
    n = int(header[2])
    expected = HEADER_BYTES + 2 * n
    if size != expected:
        raise ValueError(f"{path}: header promises {n:,} tokens ({expected:,} bytes) but the file has {size:,} bytes"
                         + (" (truncated shard)" if size < expected else " (trailing bytes)"))
    return np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_BYTES, shape=(n,))


_PROBE = 65_536  # tokens hashed at each end of a shard by TokenStream.fingerprint
_SAMPLES, _SAMPLE = 256, 1_024  # fingerprint v2: windows of _SAMPLE tokens evenly spaced between the ends
FINGERPRINT_VERSION = 2  # what TokenData.fingerprint writes; version 1 (no prefix) hashed the ends only


def fingerprint_version(fingerprint: str) -> int:
    """The version of a recorded :attr:`TokenData.fingerprint`: ``"v2 train ...; val ..."`` is 2, the unprefixed
    ``"train ...; val ..."`` that checkpoints made before review 26 hold is 1."""
    head = fingerprint.split(" ", 1)[0]
    return int(head[1:]) if head[:1] == "v" and head[1:].isdigit() else 1


def _hashed_pieces(shard: np.ndarray, version: int) -> list[np.ndarray]:
    """The parts of ``shard`` a fingerprint of ``version`` hashes, in order. Both versions: the first and the last
    ``_PROBE`` tokens (all of a shard of up to ``2 * _PROBE``). Version 2 also: ``_SAMPLES`` windows of ``_SAMPLE``
    tokens evenly spaced between them, the first right after the head and the last right before the tail (all of
    a middle of up to ``_SAMPLES * _SAMPLE`` tokens)."""
    shard = shard.view(np.ndarray)  # a memmap's slices cost ~10x a plain array's (26,000 windows per 100 shards)
    n = len(shard)
    if n <= 2 * _PROBE:
        return [shard]
    middle = n - 2 * _PROBE
    if version < 2:
        samples = []
    elif middle <= _SAMPLES * _SAMPLE:
        samples = [shard[_PROBE:n - _PROBE]]
    else:
        samples = [shard[a:a + _SAMPLE] for a in
                   (_PROBE + i * (middle - _SAMPLE) // (_SAMPLES - 1) for i in range(_SAMPLES))]
    return [shard[:_PROBE], *samples, shard[-_PROBE:]]


class TokenStream:
    """Token shards read as chunks of ``L + 1`` tokens at stride ``L`` (inputs and shifted targets).

    Chunk ``k`` is addressed directly, so any step's data can be recomputed (resume, data
    parallelism); chunks never straddle shards; indices past the end wrap around (a new epoch).
    """

    def __init__(self, shards: list[np.ndarray], names: list[str]):
        self.shards, self.names = shards, names

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.shards)

    def num_chunks(self, L: int) -> int:
        """How many distinct chunks of ``L`` (+1) tokens the stream holds."""
        return sum(max(len(s) - 1, 0) // L for s in self.shards)

    def fingerprint(self, version: int = FINGERPRINT_VERSION) -> str:
        """What chunk addressing depends on: each shard's file name (not its directory) and length, and a crc32 of
        the tokens :func:`_hashed_pieces` picks (``version`` 2: both ends and 256 strided windows; 1: the ends).
        A shard added, removed, renamed or replaced changes it; see docs/examples-zoo.md for which edits inside
        a shard it sees."""
        if version not in (1, 2):
            raise ValueError(f"token stream {self.names}: fingerprint version {version!r}, expected 1 or 2")
        crc, parts = 0, []
        for shard, name in zip(self.shards, self.names):
            parts.append(f"{os.path.basename(name)}:{len(shard)}")
            for piece in _hashed_pieces(shard, version):
                crc = zlib.crc32(np.ascontiguousarray(piece, dtype="<u2"), crc)  # its buffer: no copy
        return f"{len(parts)} shards, {self.num_tokens:,} tokens, crc32 {zlib.crc32(' '.join(parts).encode(), crc):08x}"

    def chunk(self, k: int, L: int, vocab_size: int | None = None) -> np.ndarray:
        """Chunk ``k`` (mod the number of chunks) as int64, checking ids < ``vocab_size``."""
        total = self.num_chunks(L)
        if total == 0:
            raise ValueError(f"token stream {self.names} has {self.num_tokens:,} tokens, fewer than one chunk of {L + 1:,}")
        k %= total
        for shard, name in zip(self.shards, self.names):
            n = max(len(shard) - 1, 0) // L
            if k < n:
                out = np.asarray(shard[k * L: k * L + L + 1], dtype=np.int64)
                if vocab_size is not None and out.max() >= vocab_size:
                    raise ValueError(f"{name}: token id {out.max()} >= model vocab_size {vocab_size}")
                return out
            k -= n
        raise AssertionError("unreachable")


@dataclass
class TokenData:
    """Train and held-out streams plus the tokenizer facts a model must agree with."""

    train: TokenStream
    val: TokenStream
    vocab_size: int   # number of ids the tokenizer emits (the model may pad beyond)
    eot_id: int
    name: str

    @property
    def fingerprint(self) -> str:
        """The layout of both streams (:meth:`TokenStream.fingerprint`), ``"v2 train ...; val ..."``; a checkpoint
        records it, so that a resume refuses shards changed since (micro-batch ``k`` is addressed by position in
        the shards). Where the shards' directory is is not part of it."""
        return self.fingerprint_as(FINGERPRINT_VERSION)

    def fingerprint_as(self, version: int) -> str:
        """:attr:`fingerprint` as version ``version`` wrote it (1: the unprefixed form of checkpoints made before
        review 26), to check a recorded fingerprint of that version against these streams."""
        body = f"train {self.train.fingerprint(version)}; val {self.val.fingerprint(version)}"
        return body if version == 1 else f"v{version} {body}"


def micro_batch(stream: TokenStream, k: int, rows: int, seq_len: int, device="cpu", vocab_size: int | None = None):
    """Micro-batch ``k``: (inputs, targets), each (rows, seq_len) int64, from one contiguous chunk."""
    c = torch.from_numpy(stream.chunk(k, rows * seq_len, vocab_size))
    x, y = c[:-1].view(rows, seq_len), c[1:].view(rows, seq_len)
    device = torch.device(device)
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def heldout_pool(stream: TokenStream, seq_len: int, n_seqs: int, batch_size: int = 1, device="cpu"):
    """Yield the fixed held-out pool: the first ``n_seqs`` sequences of ``seq_len`` tokens (+ targets).

    Deterministic and identical across calls, runs and checkpoints (the measurement pool of the
    paper's protocol). Yields (input_ids, targets) of shape (<= batch_size, seq_len).
    """
    for name, v in (("seq_len", seq_len), ("n_seqs", n_seqs), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"heldout_pool: {name}={v!r}, expected a positive integer")
    available = stream.num_chunks(seq_len)
    if n_seqs > available:
        raise ValueError(f"heldout_pool: asked for {n_seqs} sequences of {seq_len} tokens but the held-out "
                         f"stream {stream.names} holds {available}")
    for start in range(0, n_seqs, batch_size):
        rows = [torch.from_numpy(stream.chunk(k, seq_len)) for k in range(start, min(start + batch_size, n_seqs))]
        c = torch.stack(rows).to(device)
        yield c[:, :-1], c[:, 1:]


# ------------------------------------------------------------------------------------------------
# the bundled offline corpus


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 plus an end-of-text id 256 (257 ids; models pad to 320)."""

    vocab_size, eot_id = 257, 256

    def encode(self, text: str) -> np.ndarray:
        """Byte ids of ``text`` as uint16."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids) -> str:
        """Text of ``ids``; end-of-text ids become newlines."""
        ids = [int(i) for i in ids]
        return bytes(i if i < 256 else 10 for i in ids).decode("utf-8", errors="replace")


def _pydoc_documents() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    return sorted((f"topic:{k}", v) for k, v in topics.items())


def _stdlib_documents() -> list[tuple[str, str]]:
    docs = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        parts = [ast.get_docstring(n) for n in ast.walk(tree)
                 if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        text = "\n\n".join(p for p in parts if p)
        if text:
            docs.append((f"module:{path.stem}", text))
    return docs


@lru_cache(maxsize=4)
def builtin_data(source: str = "pydoc", heldout_every: int = 10) -> TokenData:
    """The bundled corpus as :class:`TokenData`, split by document.

    ``source``: "pydoc" (the ~0.5 MB of ``pydoc_data.topics``; fast) or "stdlib" (that plus the
    docstrings of every top-level stdlib module, ~1.4 MB; ~3 s to parse). A document goes to the
    held-out stream iff crc32(its key) % ``heldout_every`` == 0: deterministic, and stable across
    Python versions for documents that exist in both.
    """
    if source not in ("pydoc", "stdlib"):
        raise ValueError(f"builtin corpus source {source!r}, expected 'pydoc' or 'stdlib'")
    docs = _pydoc_documents() + (_stdlib_documents() if source == "stdlib" else [])
    tok = ByteTokenizer()
    eot = np.array([tok.eot_id], dtype=np.uint16)
    parts = {"train": [], "val": []}
    for key, text in docs:
        split = "val" if zlib.crc32(key.encode()) % heldout_every == 0 else "train"
        parts[split] += [eot, tok.encode(text)]
    ver = f"python{sys.version_info.major}.{sys.version_info.minor}"
    streams = {k: TokenStream([np.concatenate(v)], [f"builtin:{source}:{k} ({ver})"]) for k, v in parts.items()}
    return TokenData(streams["train"], streams["val"], tok.vocab_size, tok.eot_id, f"builtin:{source} ({ver})")


def bin_data(directory: str | os.PathLike) -> TokenData:
    """GPT-2-token shards in ``directory``: ``*train*.bin`` for training, ``*val*.bin`` held out."""
    d = Path(directory)
    train, val = sorted(d.glob("*train*.bin")), sorted(d.glob("*val*.bin"))
    if not train or not val:
        raise FileNotFoundError(f"{d}: need *train*.bin and *val*.bin shards (found {len(train)} train, {len(val)} val)")
    both = sorted(set(train) & set(val))
    if both:  # it would be trained on and held out at once
        raise ValueError(f"{d}: {', '.join(f.name for f in both)} match both *train*.bin and *val*.bin; rename "
                         "them so that every shard is either training or held-out data")
    stream = lambda files: TokenStream([read_shard(f) for f in files], [str(f) for f in files])  # noqa: E731
    # the resolved directory: the same shards named by a relative path, an absolute one or a symlink have one name
    return TokenData(stream(train), stream(val), GPT2_VOCAB, GPT2_EOT, f"bin:{d.resolve()}")


def load_data(spec: str) -> TokenData:
    """``spec``: "pydoc" / "stdlib" (bundled corpus) or a directory of ``.bin`` shards."""
    if spec in ("pydoc", "stdlib"):
        return builtin_data(spec)
    if Path(spec).is_dir():
        return bin_data(spec)
    raise ValueError(f"data={spec!r}: expected 'pydoc', 'stdlib' or a directory of .bin shards")

"""Python reference models of the packet-stream components in :mod:`tilewright.hw.packet`.

Streams are lists of integer words. A packet is a header word followed by ``L = header &
0xFFFF`` payload words (see :mod:`tilewright.hw.packet`). The models are pure Python (numpy
for memories) and need neither Amaranth nor a simulator:

* :func:`packets`: cut a stream into packets;
* :func:`split`: the words each :class:`~tilewright.hw.packet.PacketSplit` output receives;
* :func:`broadcast`: the words each :class:`~tilewright.hw.packet.StreamBroadcast` output
  receives;
* :func:`check_merge`: whether a :class:`~tilewright.hw.packet.PacketMerge` output is a
  valid merge of its inputs (the order of packets depends on timing);
  :func:`merge_round_robin`: the exact merge order when every input always offers a word;
* :func:`ddr_write`: the memory after a :class:`~tilewright.hw.packet.DdrWriter` wrote a
  stream of packets.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "LEN_BITS", "broadcast", "check_merge", "ddr_write", "merge_round_robin", "packet_length",
    "packets", "split",
]

#: Width of the length field (the same as :data:`tilewright.hw.packet.LEN_BITS`).
LEN_BITS = 16
_LEN_MASK = (1 << LEN_BITS) - 1


def packet_length(hdr: int) -> int:
    """Payload words announced by header ``hdr``."""
    return hdr & _LEN_MASK


def packets(words: Sequence[int]) -> list[tuple[int, ...]]:
    """Cut ``words`` into packets (each a tuple: the header, then its payload words).

    Raises
    ------
    ValueError
        If the stream ends inside a packet.
    """
    out: list[tuple[int, ...]] = []
    pos = 0
    while pos < len(words):
        n = packet_length(int(words[pos]))
        if pos + 1 + n > len(words):
            raise ValueError(f"the stream ends inside a packet: the header at word {pos} "
                             f"announces {n} payload words, {len(words) - pos - 1} follow")
        out.append(tuple(int(w) for w in words[pos:pos + 1 + n]))
        pos += 1 + n
    return out


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, not {value!r}")


def split(words: Sequence[int], n_out: int, sel_lo: int, strip: bool, *,
          one_of: bool = False) -> list[list[int]]:
    """The words each output of a ``PacketSplit(word_bits, n_out, sel_lo, strip, one_of=...)``
    receives.

    Output ``j`` receives every packet whose header has bit ``sel_lo + j`` set, without its
    header if ``strip``; with ``one_of`` (two outputs), output 1 every packet whose header has
    bit ``sel_lo`` set and output 0 every other one.
    """
    _check_count("n_out", n_out)
    if one_of and n_out != 2:
        raise ValueError(f"a one_of split has 2 outputs, not {n_out}")
    outs: list[list[int]] = [[] for _ in range(n_out)]
    for pkt in packets(words):
        body = pkt[1:] if strip else pkt
        if one_of:
            outs[(pkt[0] >> sel_lo) & 1].extend(body)
            continue
        for j in range(n_out):
            if (pkt[0] >> (sel_lo + j)) & 1:
                outs[j].extend(body)
    return outs


def broadcast(words: Sequence[int], n_out: int) -> list[list[int]]:
    """The words each output of a ``StreamBroadcast(word_bits, n_out)`` receives: all."""
    _check_count("n_out", n_out)
    return [[int(w) for w in words] for _ in range(n_out)]


def merge_round_robin(inputs: Sequence[Sequence[int]]) -> list[int]:
    """The output of a ``PacketMerge`` whose inputs always offer their next word.

    Whole packets are taken round robin: input 0 first, then the next input (cyclically) that
    still has packets.
    """
    queues = [packets(words) for words in inputs]
    heads = [0] * len(queues)
    out: list[int] = []
    k = len(queues) - 1
    while any(h < len(q) for h, q in zip(heads, queues, strict=True)):
        k = next(c % len(queues) for c in range(k + 1, k + 1 + len(queues))
                 if heads[c % len(queues)] < len(queues[c % len(queues)]))
        out.extend(queues[k][heads[k]])
        heads[k] += 1
    return out


def check_merge(inputs: Sequence[Sequence[int]], output: Sequence[int]) -> None:
    """Check that ``output`` is a merge of the packet streams ``inputs``.

    A merge is an interleaving of whole packets that holds every input packet exactly once and
    keeps the packets of each input in order. When several inputs offer equal packets, every
    assignment is tried (a depth-first search over the positions reached in the inputs).

    Raises
    ------
    AssertionError
        If ``output`` is not a merge; the message names the first output packet that no
        assignment could place.
    ValueError
        If an input or the output ends inside a packet.
    """
    queues = [packets(words) for words in inputs]
    try:
        got = packets(output)
    except ValueError as exc:
        raise AssertionError(f"the merged output is not a packet stream: {exc}") from None
    want_n = sum(len(q) for q in queues)
    if len(got) != want_n:
        raise AssertionError(f"the output holds {len(got)} packets, the inputs {want_n}")
    start = (0,) * len(queues)
    stack = [start]
    seen = {start}
    deepest = 0
    while stack:
        heads = stack.pop()
        done = sum(heads)
        if done == len(got):
            return
        deepest = max(deepest, done)
        for k, q in enumerate(queues):
            if heads[k] < len(q) and q[heads[k]] == got[done]:
                nxt = (*heads[:k], heads[k] + 1, *heads[k + 1:])
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
    words_before = sum(len(p) for p in got[:deepest])
    raise AssertionError(
        f"output packet {deepest} (from word {words_before}, header {got[deepest][0]:#x}, "
        f"{len(got[deepest]) - 1} payload words) is not the next packet of any input")


def ddr_write(words: Sequence[int], mem: np.ndarray, *, addr_bits: int | None = None
              ) -> np.ndarray:
    """The memory after a ``DdrWriter`` wrote the packets ``words`` into ``mem``.

    Each packet's payload goes to word addresses ``A``, ``A + 1``, ..., ``A = header >> 16``.
    With ``addr_bits`` the writer's address width, ``A`` is taken modulo ``2**addr_bits`` and
    the addresses wrap around at ``2**addr_bits``.

    Parameters
    ----------
    words : sequence of int
        The packets.
    mem : np.ndarray
        The memory before; not modified.
    addr_bits : int, optional
        The writer's address width.

    Returns
    -------
    np.ndarray
        A copy of ``mem`` with the payloads written.

    Raises
    ------
    ValueError
        If the stream ends inside a packet or a write falls outside ``mem``.
    """
    if addr_bits is not None:
        _check_count("addr_bits", addr_bits)
    out = np.array(mem, copy=True)
    for pkt in packets(words):
        base = pkt[0] >> LEN_BITS
        for k, w in enumerate(pkt[1:]):
            addr = base + k
            if addr_bits is not None:
                addr = (base % (1 << addr_bits) + k) % (1 << addr_bits)
            if addr >= len(out):
                raise ValueError(f"packet with header {pkt[0]:#x}: address {addr} is outside "
                                 f"the memory of {len(out)} words")
            out[addr] = w
    return out

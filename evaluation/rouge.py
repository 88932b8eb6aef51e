"""ROUGE-L exactly as pycocoevalcap's `Rouge` scores it, in memory that grows with the texts' length only.

pycocoevalcap fills the whole (len(reference) + 1) x (len(candidate) + 1) table of the longest common
subsequence (LCS) as Python lists: a 200k-word row is 4e10 cells, tens of GB. Here the LCS length comes from
the bit-parallel algorithm of Allison & Dix (1986) in Hyyrö's form (2004): the shorter text is a row of bits,
one per word; each word of the longer text updates the row with one addition and a few bitwise operations,

    U = V & match[word];  V = (V + U) | (V & ~match[word]);  LCS = the zero bits of V,

where match[word] has a bit set at each position of the shorter text holding that word. The row is processed
in blocks of `BLOCK_BITS` bits, lowest first, each block keeping the addition's carry per word of the longer
text: memory is one byte per word of the longer text plus a block's masks (at most BLOCK_BITS squared bits,
8 MiB), whatever the lengths. Time stays proportional to len(a) x len(b) / 64 machine-word operations.

`RougeL` is pycocoevalcap's `Rouge` with this LCS: the same tokens (each text split on single spaces), the
same precision, recall, F-measure (beta 1.2) and mean over rows, so the scores are equal to the last bit.
"""

from __future__ import annotations

from collections.abc import Sequence

from pycocoevalcap.rouge.rouge import Rouge

BLOCK_BITS = 1 << 13  # words of the shorter text per block


def lcs_length(a: Sequence[str], b: Sequence[str], block_bits: int = BLOCK_BITS) -> int:
    """Length of the longest common subsequence of the word sequences `a` and `b`."""
    if len(a) < len(b):
        a, b = b, a  # b, the shorter, is the bit row
    carries = bytearray(len(a))  # the carry out of the previous block after each word of `a`
    common = 0
    for start in range(0, len(b), block_bits):
        chunk = b[start:start + block_bits]
        width = len(chunk)
        ones = (1 << width) - 1
        match: dict[str, int] = {}
        for j, word in enumerate(chunk):
            match[word] = match.get(word, 0) | (1 << j)
        v = ones
        for i, word in enumerate(a):
            m, carry = match.get(word, 0), carries[i]
            if not m and not carry:
                continue  # nothing matches and nothing carries in: the block's row is unchanged
            u = v & m
            total = v + u + carry
            carries[i] = total >> width
            v = (total & ones) | (v & ~m)
        common += width - v.bit_count()
    return common


class RougeL(Rouge):
    """pycocoevalcap's ROUGE-L (`compute_score(gts, res)`), its LCS computed by `lcs_length`."""

    def calc_score(self, candidate: list[str], refs: list[str]) -> float:
        assert len(candidate) == 1 and len(refs) > 0
        words = candidate[0].split(" ")
        precision, recall = [], []
        for reference in refs:
            ref_words = reference.split(" ")
            common = lcs_length(ref_words, words)
            precision.append(common / float(len(words)))
            recall.append(common / float(len(ref_words)))
        p, r = max(precision), max(recall)
        if p == 0 or r == 0:
            return 0.0
        return ((1 + self.beta**2) * p * r) / float(r + self.beta**2 * p)

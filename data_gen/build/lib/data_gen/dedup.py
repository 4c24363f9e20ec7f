"""``dedup``: drop near-duplicate instructions by ROUGE-L, exactly and fast.

Rule (keep-first, the self-instruct/Alpaca rule as intended): walk the generated
instructions in order; drop one if its ROUGE-L F-measure (rouge_score's tokenizer, no
stemming) with any seed task or any instruction kept so far is above the threshold (0.7);
otherwise keep it. AlpaCare's code instead compared each instruction with *all* others and
dropped both members of every near-duplicate pair (``rule="all-vs-all"``, kept for comparison).

Exact: the decisions are those of ``rouge_score`` computed for every pair. Fast: almost no
pair is ever scored, because a pair can only pass the threshold if

* lengths are close: F = 2*LCS/(m+n) <= 2*min(m,n)/(m+n);
* the token multisets overlap a lot: LCS <= overlap, and F > t needs overlap > t*m/(2-t)
  (for both lengths m). With tokens ordered rarest first, two instructions that overlap
  that much must share a token among the first ``m - ceil(t*m/(2-t)) + 1`` of each
  ("prefix filtering", Chaudhuri et al. 2006). Only those prefixes are indexed, so a new
  instruction meets only the few earlier ones sharing a rare token.

The survivors are scored with rapidfuzz's C++ LCS (batched ``cdist``), and every score near
the threshold is recomputed with rouge_score's own ``fmeasure`` so float rounding cannot
differ. Bounds are widened by 1e-9 so that they never prune a pair rouge_score would keep.
"""

from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import LCSseq
from rouge_score import scoring, tokenizers
from tqdm import tqdm

log = logging.getLogger(__name__)
EPS = 1e-9


def rouge_tokenize(texts: Sequence[str]) -> list[list[str]]:
    """rouge_score's default tokenization (lowercase, alphanumeric runs), no stemming."""
    tok = tokenizers.DefaultTokenizer(use_stemmer=False)
    return [tok.tokenize(t) for t in texts]


def rouge_l_f(a: Sequence[str], b: Sequence[str], lcs: int) -> float:
    """ROUGE-L F exactly as rouge_score computes it from the LCS length."""
    if not a or not b:
        return 0.0
    return scoring.fmeasure(lcs / len(b), lcs / len(a))


def min_overlap(m: int, threshold: float) -> int:
    """Smallest token overlap that can still give F > threshold with some partner (minus a margin)."""
    return math.floor(threshold * m / (2.0 - threshold) - EPS) + 1


@dataclass
class DedupResult:
    kept: list[int]  # indices into the candidates, in order
    dropped: list[dict] = field(default_factory=list)  # {index, duplicate_of, duplicate_of_seed, rouge_l}
    stats: dict = field(default_factory=dict)


class _Corpus:
    """Token ids, LCS strings, and rarest-first element lists of every text (seeds first)."""

    def __init__(self, texts: Sequence[str], threshold: float):
        self.tokens = rouge_tokenize(texts)
        vocab: dict[str, int] = {}
        self.strings: list[str] = []
        for toks in self.tokens:
            ids = [vocab.setdefault(t, len(vocab)) for t in toks]
            # one character per token id, skipping the surrogate range, for rapidfuzz
            self.strings.append("".join(chr(i + 0x100 if i + 0x100 < 0xD800 else i + 0x900) for i in ids))
        # Multiset elements: (token id, occurrence number), so multiset overlap = set overlap.
        elem_ids: dict[tuple[int, int], int] = {}
        elems: list[list[int]] = []
        freq: Counter = Counter()
        for s in self.strings:
            seen: Counter = Counter()
            e = []
            for ch in s:
                e.append(elem_ids.setdefault((ord(ch), seen[ch]), len(elem_ids)))
                seen[ch] += 1
            freq.update(e)
            elems.append(e)
        rank = {e: r for r, e in enumerate(sorted(freq, key=lambda e: (freq[e], e)))}
        self.lengths = np.array([len(t) for t in self.tokens], dtype=np.int64)
        self.prefixes: list[list[int]] = []
        for e in elems:
            m = len(e)
            ordered = sorted(rank[x] for x in e)
            self.prefixes.append(ordered[: max(0, m - min_overlap(m, threshold) + 1)] if m else [])


class _Scorer:
    """Scores one text against a list of others: bounds, then rapidfuzz LCS, then exact F."""

    def __init__(self, corpus: _Corpus, threshold: float):
        self.c = corpus
        self.threshold = threshold
        self.pairs_scored = 0

    def above(self, i: int, others: list[int]) -> list[tuple[int, float]]:
        """(j, F) for every j in ``others`` with ROUGE-L F(i, j) > threshold."""
        c = self.c
        if not others:
            return []
        js = np.fromiter(others, dtype=np.int64, count=len(others))
        m, n = c.lengths[i], c.lengths[js]
        js = js[2.0 * np.minimum(m, n) / (m + n) > self.threshold - EPS]  # length bound
        if js.size == 0:
            return []
        self.pairs_scored += int(js.size)
        lcs = process.cdist([c.strings[i]], [c.strings[j] for j in js], scorer=LCSseq.similarity,
                            dtype=np.int32, workers=1)[0]
        n = c.lengths[js]
        approx = 2.0 * lcs / (m + n)
        out = []
        for k in np.nonzero(approx > self.threshold - 1e-6)[0]:
            j = int(js[k])
            f = rouge_l_f(c.tokens[i], c.tokens[j], int(lcs[k]))  # rouge_score's own float arithmetic
            if f > self.threshold:
                out.append((j, f))
        return out


def deduplicate(candidates: Sequence[str], seeds: Sequence[str] = (), threshold: float = 0.7,
                rule: str = "keep-first", progress: bool = False) -> DedupResult:
    """Indices of ``candidates`` to keep, and for each dropped one the earlier text it duplicated.

    ``rule="keep-first"``: keep a candidate unless it is too similar to a seed or a kept one.
    ``rule="all-vs-all"``: AlpaCare's rule: drop every candidate too similar to any other
    text (seeds or candidates, earlier or later), so both members of a pair go.
    """
    if rule not in ("keep-first", "all-vs-all"):
        raise ValueError(f"unknown rule {rule!r}")
    ns = len(seeds)
    corpus = _Corpus(list(seeds) + list(candidates), threshold)
    scorer = _Scorer(corpus, threshold)
    index: dict[int, list[int]] = defaultdict(list)

    def add(doc: int) -> None:
        for e in corpus.prefixes[doc]:
            index[e].append(doc)

    def probe(doc: int) -> list[int]:
        found: set[int] = set()
        for e in corpus.prefixes[doc]:
            found.update(index.get(e, ()))
        found.discard(doc)
        return sorted(found)

    for s in range(ns):
        add(s)
    if rule == "all-vs-all":
        for d in range(ns, ns + len(candidates)):
            add(d)
    kept, dropped = [], []
    for d in tqdm(range(ns, ns + len(candidates)), desc="dedup", unit="instr", disable=not progress,
                  mininterval=1.0):
        hits = scorer.above(d, probe(d))
        if hits:
            j, f = max(hits, key=lambda h: (h[1], -h[0]))  # the most similar; earliest on ties
            dropped.append({"index": d - ns, "duplicate_of": j - ns if j >= ns else j,
                            "duplicate_of_seed": j < ns, "rouge_l": f})
        else:
            kept.append(d - ns)
            if rule == "keep-first":
                add(d)
    stats = {"candidates": len(candidates), "seeds": ns, "kept": len(kept), "dropped": len(dropped),
             "pairs_scored": scorer.pairs_scored, "rule": rule, "threshold": threshold}
    return DedupResult(kept=kept, dropped=dropped, stats=stats)

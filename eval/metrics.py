"""Text-quality metrics for comparing sparse-attention outputs with dense ones.

* ROUGE-L: F-measure of the longest common subsequence (LCS) of tokens
  (Lin, 2004), tokens = lowercased whitespace-separated words.
* BLEU-4 (Papineni et al., 2002): clipped n-gram precisions for n = 1..4,
  uniform weights, brevity penalty against the closest reference length.
  Sentence BLEU may use add-one smoothing (Lin and Och, 2004: add 1 to the
  matched and total counts of n >= 2). Scores are in [0, 1], not percent.
* Token exact-match rate between two token id sequences.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import NamedTuple, Sequence

MAX_ORDER = 4


class RougeL(NamedTuple):
    """ROUGE-L of one candidate against one reference: precision, recall, F-measure."""
    precision: float
    recall: float
    fmeasure: float


def _words(text, lowercase: bool) -> list:
    if isinstance(text, str):
        return (text.lower() if lowercase else text).split()
    return list(text)


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence of two sequences (O(len a * len b))."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction, reference) -> RougeL:
    """ROUGE-L of a prediction against one reference.

    prediction, reference: strings (lowercased, split on whitespace) or token
    lists. precision = LCS / len(prediction), recall = LCS / len(reference),
    fmeasure = 2PR / (P + R); all 0 when either side is empty or LCS = 0.
    """
    pred, ref = _words(prediction, True), _words(reference, True)
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return RougeL(0.0, 0.0, 0.0)
    p, r = lcs / len(pred), lcs / len(ref)
    return RougeL(p, r, 2 * p * r / (p + r))


def _ngrams(tokens: list, n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _bleu_stats(hypothesis: list, references: list[list]) -> tuple[list[int], list[int], int, int]:
    """(matched n-gram counts, total n-gram counts, hyp length, closest ref length)."""
    matched, total = [], []
    for n in range(1, MAX_ORDER + 1):
        hyp = _ngrams(hypothesis, n)
        best = Counter()
        for ref in references:
            best |= _ngrams(ref, n)  # max count of each n-gram over references
        matched.append(sum(min(c, best[g]) for g, c in hyp.items()))
        total.append(max(len(hypothesis) - n + 1, 0))
    # closest reference length; ties go to the shorter one
    ref_len = min((abs(len(r) - len(hypothesis)), len(r)) for r in references)[1]
    return matched, total, len(hypothesis), ref_len


def _bleu_from_stats(matched, total, hyp_len, ref_len, smooth: bool) -> float:
    if hyp_len == 0:
        return 0.0
    log_p = 0.0
    for n, (m, t) in enumerate(zip(matched, total), start=1):
        if smooth and n > 1:
            m, t = m + 1, t + 1
        if m == 0 or t == 0:
            return 0.0
        log_p += math.log(m / t) / MAX_ORDER
    bp = 1.0 if hyp_len >= ref_len else math.exp(1 - ref_len / hyp_len)
    return bp * math.exp(log_p)


def _refs(references, lowercase: bool) -> list[list]:
    if isinstance(references, str) or (references and not isinstance(references[0], (str, list, tuple))):
        references = [references]  # one reference given bare
    if not references:
        raise ValueError("BLEU needs at least one reference")
    return [_words(r, lowercase) for r in references]


def sentence_bleu(hypothesis, references, smooth: bool = False, lowercase: bool = False) -> float:
    """BLEU-4 of one hypothesis in [0, 1].

    hypothesis: string (split on whitespace) or token list; references: a
    string, a list of int ids, or a list of references (strings or token
    lists; wrap a single list of word tokens). smooth: add-one smoothing of the
    2- to 4-gram precisions; without it any order with no match gives 0.
    """
    stats = _bleu_stats(_words(hypothesis, lowercase), _refs(references, lowercase))
    return _bleu_from_stats(*stats, smooth=smooth)


def corpus_bleu(hypotheses: Sequence, references: Sequence, lowercase: bool = False) -> float:
    """Corpus BLEU-4 in [0, 1]: n-gram counts and lengths summed over sentences.

    hypotheses: N strings or token lists; references: N entries, each one
    reference or a list of references for that sentence.
    """
    if len(hypotheses) != len(references):
        raise ValueError("need one reference entry per hypothesis")
    matched, total, hyp_len, ref_len = [0] * MAX_ORDER, [0] * MAX_ORDER, 0, 0
    for hyp, refs in zip(hypotheses, references):
        m, t, h, r = _bleu_stats(_words(hyp, lowercase), _refs(refs, lowercase))
        matched = [a + b for a, b in zip(matched, m)]
        total = [a + b for a, b in zip(total, t)]
        hyp_len, ref_len = hyp_len + h, ref_len + r
    return _bleu_from_stats(matched, total, hyp_len, ref_len, smooth=False)


def token_match_rate(a: Sequence[int], b: Sequence[int]) -> float:
    """Fraction of positions where two token id sequences agree.

    Compares position by position up to the shorter length; positions present
    in only one sequence count as mismatches, so the denominator is the longer
    length. Two empty sequences give 1.0.
    """
    a, b = list(a), list(b)
    longest = max(len(a), len(b))
    if longest == 0:
        return 1.0
    return sum(int(x == y) for x, y in zip(a, b)) / longest

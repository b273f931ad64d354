"""ROUGE-L, BLEU, token match rate and the pass-key task, on hand-checked pairs.

Random pairs are also compared with rouge-score and sacrebleu (same
tokenization: whitespace, no extra normalisation).
"""

import importlib
import math
import random

import numpy as np
import pytest

from eval.metrics import corpus_bleu, lcs_length, rouge_l, sentence_bleu, token_match_rate
from eval.passkey import FILLER, INSTRUCTION, QUESTION, make_passkey_prompt, score_passkey

CAT_HYP, CAT_REF = "the cat sat on the mat", "the cat is on the mat"
FOX_HYP, FOX_REF = "the quick brown fox jumps over the dog", "the quick brown fox jumps over the lazy dog"

# ---------------------------------------------------------------- ROUGE-L


def test_rouge_l_hand_computed():
    """cat pair: LCS = "the cat on the mat" = 5, P = R = F = 5/6.
    "The Cat  sat" vs the cat reference "the cat sat on the mat": lowercased,
    LCS = 3, P = 3/3, R = 3/6, F = 2 * 1 * 0.5 / 1.5 = 2/3.
    "the gunman kill police" vs "police killed the gunman": LCS = "the gunman"
    = 2, P = R = F = 1/2. Disjoint or empty -> 0."""
    assert rouge_l(CAT_HYP, CAT_REF).fmeasure == pytest.approx(5 / 6)
    s = rouge_l("The Cat  sat", "the cat sat on the mat")
    assert (s.precision, s.recall, s.fmeasure) == pytest.approx((1.0, 0.5, 2 / 3))
    assert rouge_l("the gunman kill police", "police killed the gunman").fmeasure == pytest.approx(0.5)
    assert rouge_l("a b", "c d").fmeasure == 0.0
    assert rouge_l("", "c d").fmeasure == 0.0
    assert lcs_length("ABCBDAB", "BDCABA") == 4


# ---------------------------------------------------------------- BLEU


def test_sentence_bleu_hand_computed():
    """fox pair: hyp 8 words, ref 9. Clipped precisions: 1-grams 8/8,
    2-grams 6/7 ("the dog" misses), 3-grams 5/6, 4-grams 4/5.
    Geometric mean (1 * 6/7 * 5/6 * 4/5)^(1/4) = (4/7)^(1/4);
    BP = exp(1 - 9/8). BLEU = exp(-1/8) * (4/7)^(1/4) = 0.767279...

    cat pair: precisions 5/6, 3/5, 1/4, 0/3 -> unsmoothed BLEU = 0.
    Add-one on n >= 2: 5/6, 4/6, 2/5, 1/4; product 1/18; BP = 1 (6 vs 6);
    BLEU = (1/18)^(1/4) = 0.485492..."""
    assert sentence_bleu(FOX_HYP, FOX_REF) == pytest.approx(math.exp(-1 / 8) * (4 / 7) ** 0.25)
    assert sentence_bleu(FOX_HYP, FOX_REF) == pytest.approx(0.767279, abs=1e-6)
    assert sentence_bleu(CAT_HYP, CAT_REF) == 0.0
    assert sentence_bleu(CAT_HYP, CAT_REF, smooth=True) == pytest.approx((1 / 18) ** 0.25)
    assert sentence_bleu(CAT_REF, CAT_REF) == pytest.approx(1.0)
    assert sentence_bleu("", CAT_REF, smooth=True) == 0.0


def test_bleu_multiple_references_and_clipping():
    """"the the the the" vs refs "the cat" and "the the dog": unigram "the" is
    clipped to its max reference count 2 -> p1 = 2/4; bigram "the the" matches
    once (ref 2) of 3 -> p2 = 1/3; no 3-grams match -> 0 unsmoothed.
    Smoothed: 2/4, 2/4, 1/3, 1/2; closest ref length 3 < 4 so BP = 1;
    BLEU = (1/24)^(1/4)."""
    refs = ["the cat", "the the dog"]
    assert sentence_bleu("the the the the", refs) == 0.0
    assert sentence_bleu("the the the the", refs, smooth=True) == pytest.approx((1 / 24) ** 0.25)
    # token-id lists work the same way
    assert sentence_bleu([1, 2, 3, 4, 5], [[1, 2, 3, 4, 5]]) == pytest.approx(1.0)
    assert sentence_bleu([1, 2, 3, 4, 5], [1, 2, 3, 4, 5]) == pytest.approx(1.0)


def test_corpus_bleu_hand_computed():
    """Both pairs pooled: p1 = (5+8)/(6+8), p2 = (3+6)/(5+7), p3 = (1+5)/(4+6),
    p4 = (0+4)/(3+5); lengths c = 14, r = 15 -> BP = exp(1 - 15/14).
    BLEU = exp(-1/14) * (13/14 * 3/4 * 3/5 * 1/2)^(1/4) = 0.931063 * 0.676082 = 0.629475..."""
    expected = math.exp(-1 / 14) * (13 / 14 * 3 / 4 * 3 / 5 * 1 / 2) ** 0.25
    assert corpus_bleu([CAT_HYP, FOX_HYP], [CAT_REF, [FOX_REF]]) == pytest.approx(expected)
    assert expected == pytest.approx(0.629475, abs=1e-6)
    with pytest.raises(ValueError):
        corpus_bleu([CAT_HYP], [])


# ---------------------------------------------------------------- token match


def test_token_match_rate():
    """[1,2,3,4] vs [1,2,0,4]: 3 of 4. [1,2,3] vs [1,2,3,4,5]: 3 equal, 2 missing
    -> 3/5. [] vs [] -> 1. [] vs [7] -> 0."""
    assert token_match_rate([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    assert token_match_rate([1, 2, 3], np.array([1, 2, 3, 4, 5])) == 0.6
    assert token_match_rate([], []) == 1.0
    assert token_match_rate([], [7]) == 0.0


# ---------------------------------------------------------------- reference packages


def _random_pairs(n=40, seed=0):
    rng = random.Random(seed)
    vocab = "the a cat dog sat on mat rug is was red blue big".split()
    for _ in range(n):
        ref = [rng.choice(vocab) for _ in range(rng.randint(1, 15))]
        hyp = [rng.choice(vocab) for _ in range(rng.randint(1, 15))] if rng.random() < 0.5 else ref[:]
        if rng.random() < 0.7 and hyp:  # perturb a copy a little
            hyp[rng.randrange(len(hyp))] = rng.choice(vocab)
        yield " ".join(hyp), " ".join(ref)


def test_rouge_l_matches_rouge_score():
    rouge_scorer = importlib.import_module("rouge_score.rouge_scorer")

    class Whitespace:
        def tokenize(self, text):
            return text.lower().split()

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=Whitespace())
    for hyp, ref in _random_pairs():
        theirs = scorer.score(ref, hyp)["rougeL"]
        assert tuple(rouge_l(hyp, ref)) == pytest.approx(tuple(theirs), abs=1e-12)


def test_bleu_matches_sacrebleu():
    sacrebleu = importlib.import_module("sacrebleu")
    plain = sacrebleu.BLEU(tokenize="none", smooth_method="none")
    add_one = sacrebleu.BLEU(tokenize="none", smooth_method="add-k", smooth_value=1)
    pairs = list(_random_pairs())
    for hyp, ref in pairs:
        assert sentence_bleu(hyp, ref) == pytest.approx(plain.sentence_score(hyp, [ref]).score / 100, abs=1e-9)
        assert sentence_bleu(hyp, ref, smooth=True) == pytest.approx(
            add_one.sentence_score(hyp, [ref]).score / 100, abs=1e-9
        )
    hyps, refs = [h for h, _ in pairs], [r for _, r in pairs]
    theirs = plain.corpus_score(hyps, [refs]).score / 100
    assert corpus_bleu(hyps, refs) == pytest.approx(theirs, abs=1e-9)
    two = [r[::-1] for r in refs]  # a second reference stream
    theirs = plain.corpus_score(hyps, [refs, two]).score / 100
    assert corpus_bleu(hyps, [[a, b] for a, b in zip(refs, two)]) == pytest.approx(theirs, abs=1e-9)


# ---------------------------------------------------------------- pass key


class WordTokenizer:
    """Fake tokenizer: one token per whitespace word, encode() only."""

    def encode(self, text):
        return [len(w) for w in text.split()]


def _filler_only(text):
    """True when text is a run of filler sentences (maybe empty)."""
    rest = text.strip()
    while rest:
        head = next((s for s in FILLER if rest.startswith(s)), None)
        if head is None:
            return False
        rest = rest[len(head) :].strip()
    return True


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_passkey_depth_and_surroundings(depth):
    p = make_passkey_prompt(np.random.default_rng(1), 2000, depth)
    needle = f"The pass key is {p.key}. Remember it. {p.key} is the pass key."
    assert len(p.key) == 5 and p.key.isdigit() and p.key[0] != "0"
    start = p.text.index(needle)
    assert p.char_offset == start + len("The pass key is ")
    assert p.text[p.char_offset : p.char_offset + 5] == p.key and p.text.count(p.key) == 2
    assert p.text.startswith(INSTRUCTION) and p.text.endswith(QUESTION)
    before = p.text[len(INSTRUCTION) : start]
    after = p.text[start + len(needle) : -len(QUESTION)]
    assert _filler_only(before) and _filler_only(after)
    # the stated fraction of the filler sentences comes first
    n_before = sum(before.count(s) for s in FILLER)
    assert n_before == round(depth * p.filler_sentences)
    assert sum(after.count(s) for s in FILLER) == p.filler_sentences - n_before
    # token offset (words here): filler words before + instruction + "The pass key is"
    assert p.token_offset == len(p.text[: p.char_offset].split())
    assert p.text.split()[p.token_offset].startswith(p.key)
    # at least the requested filler, by less than one sentence too many
    words = sum(len(s.split()) for s in (before + after).split(".") if s.strip())
    assert 2000 <= words < 2000 + 5


def test_passkey_with_tokenizer_and_determinism():
    tok = WordTokenizer()
    a = make_passkey_prompt(np.random.default_rng(7), 300, 0.5, tokenizer=tok)
    b = make_passkey_prompt(np.random.default_rng(7), 300, 0.5, tokenizer=tok)
    c = make_passkey_prompt(np.random.default_rng(8), 300, 0.5, tokenizer=tok)
    assert a == b and a.key != c.key
    assert a.token_offset == len(a.text[: a.char_offset].split())
    r1 = make_passkey_prompt(random.Random(3), 50, 0.3, key_digits=7)
    assert r1 == make_passkey_prompt(random.Random(3), 50, 0.3, key_digits=7) and len(r1.key) == 7
    with pytest.raises(ValueError):
        make_passkey_prompt(np.random.default_rng(0), 10, 1.5)


def test_passkey_token_offset_with_a_transformers_tokenizer():
    tokenizers = importlib.import_module("tokenizers")
    transformers = importlib.import_module("transformers")
    words = set(" ".join([INSTRUCTION, QUESTION, *FILLER, "The pass key is Remember it"]).replace(".", " . ").split())
    vocab = {w: i for i, w in enumerate(["[UNK]", *sorted(words)])}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core)
    p = make_passkey_prompt(np.random.default_rng(0), 100, 0.5, tokenizer=tok)
    ids = tok(p.text, add_special_tokens=False)["input_ids"]
    assert ids[p.token_offset] == vocab["[UNK]"]  # the key is out of vocabulary
    assert tok.decode(ids[p.token_offset - 4 : p.token_offset]) == "The pass key is"
    # filler counted in tokens: just enough sentences to reach 100 tokens
    counts = [len(tok.encode(" " + FILLER[i % 5], add_special_tokens=False)) for i in range(p.filler_sentences)]
    assert sum(counts) >= 100 > sum(counts[:-1])


def test_score_passkey():
    assert score_passkey("The pass key is 12345.", "12345")
    assert score_passkey("Sure! 12345 is the pass key. Remember 99999 too.", "12345")
    assert score_passkey("It is 7, no, 12345", "12345")  # shorter numbers are skipped
    assert not score_passkey("The pass key is 12346.", "12345")
    assert not score_passkey("99999 and then 12345", "12345")  # first 5-digit number counts
    assert not score_passkey("The pass key is 123456.", "12345")
    assert not score_passkey("I do not remember.", "12345")
    assert not score_passkey("", "12345")

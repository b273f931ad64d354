"""Synthetic chat and retrieval rows (train/synthetic.py) and the training mix
(train/mix.py), with an invertible one-id-per-character tokenizer."""

import json
import re

import numpy as np
import pytest

from eval import passkey
from train import data, mix, synthetic


class CharTokenizer:
    """id = code point (EOS = 0): decode(encode(text)) == text."""

    name_or_path = "char-invertible"
    eos_token_id = 0

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) if i else "<eos>" for i in ids)


class TemplateTokenizer(CharTokenizer):
    """Renders conversations like SmolLM2's template (a default system turn first)."""

    chat_template = "{% im_start %}"

    def apply_chat_template(self, messages, tokenize=False):
        assert tokenize is False
        if messages[0]["role"] != "system":
            messages = [{"role": "system", "content": "You are a test model."}] + messages
        return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


WORDS = ("garden", "letter", "carriage", "parlour", "window", "morning", "evening", "sister", "brother", "ball")


def book(name, n_paras, seed, marker=""):
    """Deterministic prose: paragraphs of sentences that start with capitals."""
    rng = np.random.default_rng(seed)
    paras = []
    for i in range(n_paras):
        sents = []
        for j in range(int(rng.integers(2, 6))):
            a, b = (WORDS[int(k)] for k in rng.integers(0, len(WORDS), 2))
            sents.append(f"{marker}Mr. {name.title()} saw the {a} near the {b} at {i * 10 + j} o'clock.")
        paras.append(" ".join(sents))
    return "\n\n".join(paras) + "\n"


# The eval's pass-key phrases, put into a training book: they must be filtered out.
POISON = f"{passkey.FILLER[0]} {passkey.FILLER[1]} {passkey.NEEDLE.format(key=12345)} {passkey.INSTRUCTION}"


def library():
    texts = [("Emma", "Jane Austen", book("knightley", 120, 1)),
             ("Hamlet", "William Shakespeare", book("horatio", 80, 2) + "\n" + POISON + "\n")]
    return synthetic.Library.from_texts(texts)


def forbidden_phrases():
    """Straight from eval/passkey.py (not from synthetic.FORBIDDEN), lower case."""
    phrases = {"pass key", "passkey", passkey.INSTRUCTION.lower(), passkey.QUESTION.lower(),
               passkey.NEEDLE.split("{key}")[0].strip().lower()}
    return phrases | {f.lower() for f in passkey.FILLER}


# ---------------------------------------------------------------- text pieces


def test_sentences_keep_titles_and_initials():
    assert synthetic.sentences('Mr. Darcy came at ten. "Did he?" said Mrs. Bennet. J. Smith left!') == [
        "Mr. Darcy came at ten.", '"Did he?" said Mrs. Bennet.', "J. Smith left!"]
    assert synthetic.sentences("It was so.--Emma smiled. No--not yet") == ["It was so.", "Emma smiled.", "No--not yet"]


def test_library_drops_passkey_text_and_rejects_empty_sources():
    lib = library()
    assert all(synthetic.is_clean(p) for _, _, paras in lib.works for p in paras)
    assert not synthetic.is_clean("Well. THE SKY IS BLUE. Indeed.")
    with pytest.raises(ValueError, match="no usable text"):
        synthetic.Library.from_texts([("X", "Y", POISON)])


# ---------------------------------------------------------------- forbidden strings


def test_no_passkey_phrase_in_a_few_hundred_synthetic_rows():
    lib, tok = library(), CharTokenizer()
    rows = [synthetic.retrieval_row(np.random.default_rng([7, i]), lib, tok, 2048).ids for i in range(200)]
    chat, _ = synthetic.chat_rows(lib, TemplateTokenizer(), 2048, 60, seed=3, eos_id=0)
    plain, _ = synthetic.chat_rows(lib, tok, 2048, 60, seed=4, eos_id=0)
    texts = [tok.decode(r).lower() for r in [*rows, *chat, *plain]]
    assert len(texts) == 320
    for phrase in forbidden_phrases():
        assert not any(phrase in t for t in texts), phrase
    assert any("ledger" in t or "inventory" in t or "record" in t for t in texts)  # the test sees real content


# ---------------------------------------------------------------- retrieval


def test_retrieval_rows_hold_their_answers_earlier():
    lib, tok = library(), CharTokenizer()
    kinds = set()
    for i in range(60):
        row = synthetic.retrieval_row(np.random.default_rng([1, i]), lib, tok, 3000)
        assert row.ids.shape == (3000,) and row.ids.dtype == np.int32
        assert row.answers, "every row asks at least one question"
        text = tok.decode(row.ids)
        for answer, evidence, q_start, q_end in row.answers:
            assert evidence < q_start < q_end <= 3000
            assert answer in tok.decode(row.ids[evidence:q_start])  # the evidence, before the question
            assert tok.decode(row.ids[q_start:q_end]).rstrip(".").endswith(answer.rstrip("."))
            kinds.add("copy" if len(answer) > 60 else "list" if ", " in answer else "record")
        assert "\x00" not in text
    assert kinds == {"copy", "list", "record"}


def test_retrieval_formats_vary():
    lib, tok = library(), CharTokenizer()
    texts = [tok.decode(synthetic.retrieval_row(np.random.default_rng([2, i]), lib, tok, 2048).ids) for i in range(80)]
    joined = "\n".join(texts)
    for style, _ in synthetic.RECORD_STYLES:  # every record template is used
        head = style.split("{")[0] or style.split("}")[1].split("{")[0]
        assert head in joined, style
    digits = {len(m) for m in re.findall(r"\b\d{2,9}\b", joined)}
    assert len(digits) >= 5  # numbers of many lengths


def test_retrieval_rows_are_deterministic_by_seed():
    lib, tok = library(), CharTokenizer()
    a = synthetic.retrieval_rows(lib, tok, 1024, 4, seed=0)
    np.testing.assert_array_equal(a, synthetic.retrieval_rows(lib, tok, 1024, 4, seed=0))
    assert not np.array_equal(a, synthetic.retrieval_rows(lib, tok, 1024, 4, seed=1))
    np.testing.assert_array_equal(a[2], synthetic.retrieval_rows(lib, tok, 1024, 3, seed=0)[2])  # row i: (seed, i)
    with pytest.raises(ValueError, match="too small"):
        synthetic.retrieval_row(np.random.default_rng(0), lib, tok, 60)


# ---------------------------------------------------------------- chat


def test_chat_rows_use_the_template_roles():
    lib, tok = library(), TemplateTokenizer()
    rows, conversations = synthetic.chat_rows(lib, tok, 1500, 12, seed=0, eos_id=0)
    assert rows.shape == (12, 1500) and rows.dtype == np.int32 and conversations >= 12
    for r in rows:
        text = tok.decode(r)
        assert text.startswith("<|im_start|>system\n")  # a row starts with a conversation
        assert "<|im_start|>user\n" in text and "<|im_start|>assistant\n" in text
        assert "<eos>" not in text  # the template closes turns itself
    np.testing.assert_array_equal(rows, synthetic.chat_rows(lib, tok, 1500, 12, seed=0, eos_id=0)[0])
    assert not np.array_equal(rows, synthetic.chat_rows(lib, tok, 1500, 12, seed=1, eos_id=0)[0])
    with pytest.raises(ValueError, match="too small for chat"):
        synthetic.chat_rows(lib, tok, 100, 1, seed=0, eos_id=0)


def test_chat_without_template_falls_back_to_plain_roles():
    lib, tok = library(), CharTokenizer()
    rows, _ = synthetic.chat_rows(lib, tok, 3000, 4, seed=0, eos_id=0)
    text = tok.decode(rows.ravel())
    assert text.startswith(("User: ", "System: ")) and "\n\nAssistant: " in text and "<eos>" in text
    assert "<|im_start|>" not in text


def test_chat_answers_quote_the_passage():
    lib = library()
    rng = np.random.default_rng(5)
    checked = again = 0
    for _ in range(300):
        messages = synthetic.chat_messages(rng, lib)
        users = [m["content"] for m in messages if m["role"] == "user"]
        for i, m in enumerate(messages):
            asked = messages[i - 1]["content"] if i else ""
            if m["role"] == "assistant" and (word := re.search(r'(?:word|with) "(\w+)"', asked)):
                # quoted from the passage of this question, or of the first one ("my first message")
                source = users[0] if "first" in asked else asked
                assert word.group(1) in m["content"] and m["content"] in source  # verbatim
                checked += 1
                again += "first" in asked
    assert checked > 30 and again > 5


# ---------------------------------------------------------------- the mix


def test_parse_mix():
    assert mix.parse_mix(mix.DEFAULT_MIX) == ({"books": 0.7, "chat": 0.15, "retrieval": 0.15}, 0)
    assert mix.parse_mix(" chat = 1 , seed=3") == ({"books": 0.0, "chat": 1.0, "retrieval": 0.0}, 3)
    assert mix.mix_key(*mix.parse_mix(mix.DEFAULT_MIX)) == "books0.7_chat0.15_retrieval0.15_seed0"
    for bad, message in [("", "empty mix"), ("books", "NAME=VALUE"), ("books=0.5,poems=0.5", "unknown mix name"),
                         ("books=x", "not a number"), ("books=-0.5,chat=1.5", ">= 0"), ("books=0.7", "sum to 1"),
                         ("books=0.5,books=0.5", "twice"), ("books=1,seed=-1", "seed"), ("books=nan", ">= 0")]:
        with pytest.raises(ValueError, match=message):
            mix.parse_mix(bad)


def test_mix_rows():
    shares, _ = mix.parse_mix(mix.DEFAULT_MIX)
    assert mix.mix_rows(shares, 70) == {"books": 70, "chat": 15, "retrieval": 15}
    assert mix.mix_rows(shares, 7) == {"books": 7, "chat": 2, "retrieval": 2}  # every book row, the rest rounded
    assert mix.mix_rows(mix.parse_mix("chat=0.5,retrieval=0.5")[0], 10) == {"books": 0, "chat": 5, "retrieval": 5}
    assert mix.mix_rows(shares, 70, rows=20) == {"books": 14, "chat": 3, "retrieval": 3}
    with pytest.raises(ValueError, match="book rows"):
        mix.mix_rows(shares, 70, rows=200)


def write_corpora(root):
    """A fetch_corpora-style folder; the non-training splits carry marker words."""
    texts = {"emma": ("train", book("knightley", 80, 1)), "hamlet": ("train", book("horatio", 60, 2)),
             "northangerabbey": ("valid", book("tilney", 40, 3, marker="VALIDMARK ")),
             "persuasion": ("heldout", book("wentworth", 40, 4, marker="HELDOUTMARK ")),
             "debian-handbook": ("ood", book("apt", 30, 5, marker="OODMARK "))}
    works = []
    for name, (split, text) in texts.items():
        (root / "raw").mkdir(parents=True, exist_ok=True)
        (root / "raw" / f"{name}.txt").write_text(text)
        works.append({"name": name, "title": name.title(), "author": "A", "split": split, "file": f"raw/{name}.txt"})
    (root / "manifest.json").write_text(json.dumps({"sources": ["test"], "works": works}))


def test_build_mix_proportions_splits_and_cache(tmp_path):
    tok = TemplateTokenizer()
    write_corpora(tmp_path / "c")
    data.pack_corpora(tmp_path / "c", tok, 2048, tmp_path / "p")
    books = np.asarray(data.load_packed(tmp_path / "p", "train"))
    spec = "books=0.6,chat=0.2,retrieval=0.2"
    out = mix.load_or_build_mix(tmp_path / "p", tok, spec, raw_dir=tmp_path / "c")
    assert out == tmp_path / "p" / "mix-books0.6_chat0.2_retrieval0.2_seed0"
    train, kinds = np.asarray(data.load_packed(out, "train")), np.load(out / "train_kinds.npy")
    manifest = json.loads((out / "packed_manifest.json").read_text())
    comp = manifest["mix"]["composition"]
    assert train.shape == (len(books) + 2 * round(len(books) / 3), 2048) and train.dtype == np.int32
    assert {k: c["rows"] for k, c in comp.items()} == {k: int((kinds == i).sum()) for i, k in enumerate(mix.KINDS)}
    for kind, share in mix.parse_mix(spec)[0].items():  # shares of tokens, within one row
        assert abs(comp[kind]["tokens"] / train.size - share) <= 1 / len(train)
    assert comp["books"]["rows"] == len(books) and manifest["splits"]["train"]["tokens"] == train.size
    # book rows are the packed book rows; the other splits are the books' own
    assert {r.tobytes() for r in train[kinds == 0]} == {r.tobytes() for r in books}
    for split in ("valid", "heldout", "ood"):
        np.testing.assert_array_equal(data.load_packed(out, split), data.load_packed(tmp_path / "p", split))
    decoded = tok.decode(train.ravel())
    assert "VALIDMARK" not in decoded and "HELDOUTMARK" not in decoded and "OODMARK" not in decoded
    assert "<|im_start|>assistant" in tok.decode(train[kinds == 1].ravel())
    # cached: the same folder, not rebuilt; a different seed is another folder
    stamp = (out / "train.npy").stat().st_mtime_ns
    assert mix.load_or_build_mix(tmp_path / "p", tok, spec.replace("0.6", "0.60")) == out
    assert (out / "train.npy").stat().st_mtime_ns == stamp
    other = mix.load_or_build_mix(tmp_path / "p", tok, spec + ",seed=1", raw_dir=tmp_path / "c")
    assert other != out and not np.array_equal(np.load(other / "train.npy"), train)
    # through the packed-folder entry point
    assert data.load_or_build_packed(tmp_path / "p", tok, 2048, mix=spec) == out
    assert data.load_or_build_packed(tmp_path / "p", tok, 2048) == tmp_path / "p"

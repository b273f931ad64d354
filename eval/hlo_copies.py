"""Bytes an optimized XLA program spends materializing slices and copies.

    python -m eval.hlo_copies OUT/throughput/hlo/*.hlo.txt

Reads the HLO text of compiled programs (`eval.throughput --hlo` writes them)
and lists, per computation that is not a fusion body (the entry, while bodies,
conditionals), every instruction that materializes a buffer by copying: `copy`,
`slice`, `dynamic-slice`, `transpose`, and fusions whose root is one of them (possibly
bitcast). Inside a decode loop these are the bytes written besides the real work;
each is also read once.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
            "s64": 8, "u64": 8, "f64": 8}
COPYING = ("copy", "slice", "dynamic-slice", "transpose")  # transpose: how XLA:GPU writes a layout change
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(\w+)\[([\d,]*)\][^\s]*\s+([\w\-]+)\((.*)$")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")


@dataclass(frozen=True)
class Copy:
    """One instruction of a compiled program that materializes a buffer by copying, and its bytes."""
    computation: str  # where the buffer is made (entry, a while body, ...)
    name: str  # the instruction
    op: str  # copy | dynamic-slice | fusion(copy) | fusion(dynamic-slice)
    shape: str  # e.g. bf16[8,16384,32,128]
    nbytes: int


def _parse(text: str) -> dict[str, list[tuple[bool, str, str, str, str, str]]]:
    """{computation: [(is_root, name, dtype, dims, opcode, rest)]}."""
    comps: dict = {}
    current = None
    for line in text.splitlines():
        line = re.sub(r"/\*.*?\*/", "", line)  # /*index=5*/ comments inside tuple types
        if current is None:
            m = _HEADER.match(line)
            if m and "=" not in line.split("{")[0]:
                current = m.group(1)
                comps[current] = []
            continue
        if line.strip() == "}":
            current = None
            continue
        m = _INSTR.match(line)
        if m:
            comps[current].append((bool(m.group(1)), m.group(2), m.group(3), m.group(4), m.group(5), m.group(6)))
    return comps


def copies(text: str) -> list[Copy]:
    """Every materializing copy or slice in the program's non-fused computations, largest first."""
    comps = _parse(text)
    def root_copying(ins):
        """The copying op a fused computation ends in (through bitcasts), or None;
        None for a fusion that computes a product (its output is real work)."""
        ops = {op for *_, op, _ in ins}
        if ops & {"dot", "convolution"}:
            return None
        root = next((op for root, _, _, _, op, _ in ins if root), "")
        if root in COPYING:
            return root
        return next((op for op in COPYING if op in ops), None) if root == "bitcast" else None

    roots = {c: root_copying(ins) for c, ins in comps.items()}
    # fusion bodies (from every fusion line, multi-output ones included, whose type is a tuple)
    fused = {m.group(1) for line in text.splitlines() if " fusion(" in line for m in [_CALLS.search(line)] if m}
    out = []
    for comp, ins in comps.items():
        if comp in fused:
            continue
        for _, name, dtype, dims, op, rest in ins:
            kind = op if op in COPYING else None
            if op == "fusion":
                m = _CALLS.search(rest)
                if m and roots.get(m.group(1)):
                    kind = f"fusion({roots[m.group(1)]})"
            if kind is None or dtype not in ITEMSIZE:
                continue
            n = 1
            for d in filter(None, dims.split(",")):
                n *= int(d)
            out.append(Copy(comp, name, kind, f"{dtype}[{dims}]", n * ITEMSIZE[dtype]))
    return sorted(out, key=lambda c: -c.nbytes)


def main(argv=None) -> int:
    """`python -m eval.hlo_copies FILE.hlo.txt ...`: print each program's copies and their bytes; exit status."""
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print("usage: python -m eval.hlo_copies FILE.hlo.txt ...", file=sys.stderr)
        return 2
    for path in paths:
        try:
            found = copies(open(path).read())
        except OSError as e:
            print(f"hlo_copies: error: {e}", file=sys.stderr)
            return 2
        total = sum(c.nbytes for c in found)
        print(f"{path}: {len(found)} copies, {total / 1e9:.3f} GB written per run of their computations")
        for c in found[:10]:
            print(f"  {c.nbytes / 1e6:10.1f} MB  {c.op:22s} {c.shape:28s} {c.computation}/{c.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

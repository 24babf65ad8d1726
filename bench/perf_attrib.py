"""Where a sniport worker's CPU goes, from a `perf` call-graph recording (bench/PROFILES.md).

py-spy --native pauses the process at every sample and over-counts time spent in system
calls; `perf` samples the CPU itself, kernel included, and sees the compiled (mypyc) modules
as C functions of the shared library ``sniport_native__mypyc...so``. This reads the text of
``perf script -F ip,sym,dso`` (one sample per block of frames, innermost first) and prints:

- by library: the innermost frame's object (kernel, libcrypto, libpython, sniport's
  compiled code, uvloop, httptools, libc), as ``perf report --sort dso`` would;
- by caller: each sample charged to the nearest frame that is sniport's (a compiled
  function), uvloop's or httptools' (everything the interpreter, libc or the kernel does
  under it counts for it), which says which code of ours a cost comes from;
- who enters the interpreter (code that still runs as Python bytecode).

Usage (WORKER = the worker's pid, while the load runs):

    perf record -F 499 --call-graph dwarf,16384 -p WORKER -o perf.data -- sleep 3
    perf script -i perf.data -F ip,sym,dso > perf.txt
    python3 bench/perf_attrib.py perf.txt
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

Frame = tuple[str, str]  # (symbol, object file)
Sample = list[Frame]  # innermost first


def load(path: Path) -> list[Sample]:
    samples: list[Sample] = []
    frames: Sample = []
    for line in path.read_text(errors="replace").splitlines():
        line = line.strip()
        if not line:
            if frames:
                samples.append(frames)
            frames = []
            continue
        ip, _, rest = line.partition(" ")
        sym, _, dso = rest.rpartition(" (")
        frames.append((sym.strip() or ip, Path(dso.rstrip(")")).name or "?"))
    if frames:
        samples.append(frames)
    return samples


def owner(sym: str) -> str | None:
    """sniport's compiled function, uvloop or httptools; None for everything under them."""
    if sym.startswith(("CPyDef_", "CPyPy_")):
        return sym.removeprefix("CPyPy_").removeprefix("CPyDef_")
    if sym.startswith("__pyx_") and "uvloop" in sym:
        return "uvloop (the loop, its TLS protocol and what it calls)"
    if sym.startswith("llhttp") or (sym.startswith("__pyx_") and "httptools" in sym):
        return "httptools/llhttp"
    return None


def library(dso: str) -> str:
    """The innermost frame's object file, named for what it is."""
    names = {"sniport_native": "sniport, compiled (mypyc)", "libpython": "CPython runtime",
             "libcrypto": "OpenSSL (libcrypto)", "libssl": "OpenSSL (libssl)",
             "kernel": "kernel", "loop.cpython": "uvloop/libuv",
             "parser.cpython": "httptools/llhttp", "libc.so": "libc (malloc, memcpy)"}
    return next((name for key, name in names.items() if key in dso), dso)


def report(samples: list[Sample], top: int) -> list[str]:
    total = len(samples)
    by_owner: Counter[str] = Counter()
    by_lib: Counter[str] = Counter()
    interp: Counter[str] = Counter()
    for frames in samples:
        syms = [sym for sym, _ in frames]
        # An inlined frame has no object of its own: the function it was inlined into has.
        by_lib[library(next((dso for _, dso in frames if dso != "inlined"), "?"))] += 1
        by_owner[next((o for o in map(owner, syms) if o), "(none of ours)")] += 1
        entries = [i for i, f in enumerate(syms) if f.startswith("_PyEval_EvalFrameDefault")]
        if entries:
            caller = next((owner(f) for f in syms[entries[-1] + 1:] if owner(f)), None)
            interp[caller or "(top level)"] += 1

    def rows(title: str, counts: Counter[str]) -> list[str]:
        out = [title]
        out += [f"  {100 * n / total:5.1f}%  {name}" for name, n in counts.most_common(top)]
        return out

    return [f"{total} samples",
            *rows("innermost frame, by object file", by_lib),
            *rows("charged to the nearest frame of ours, uvloop's or httptools'", by_owner),
            *rows("samples inside Python bytecode, by who entered the interpreter", interp)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("script", type=Path, help="output of perf script -F ip,sym,dso")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    print("\n".join(report(load(args.script), args.top)))


if __name__ == "__main__":
    main()

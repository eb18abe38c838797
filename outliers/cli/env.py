"""``outliers env``: this machine's facts and the exact int8 GEMM backend it uses, measured."""

from __future__ import annotations

import argparse
import json

from outliers.cli.common import add_int8_gemm_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("env", help="CPU, threads, torch build and each int8 GEMM backend's speed here")
    p.add_argument("--remeasure", action="store_true", help="time the backends again instead of reading the cache")
    p.add_argument("--json", metavar="PATH", help="also write the facts and timings to PATH")
    add_int8_gemm_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from outliers.cli.common import check_writable, print_table
    from outliers.quant import gemm

    json_path = check_writable(args.json) if args.json else None
    c = gemm.choice(remeasure=args.remeasure)
    m = c["machine"]
    print_table(
        [
            ("cpu", m["cpu"]),
            ("flags", " ".join(m["flags"]) or "(none of avx2, avx512, vnni, amx, asimd)"),
            ("cores", m["cores"]),
            ("threads", m["threads"]),
            ("torch", f"{m['torch']} (CPU capability {m['torch_cpu_capability']})"),
            *((k, m[k]) for k in ("onednn_max_isa", "numba_cpu_name") if m.get(k)),
            ("measured", "now" if c.get("measured_now") else f"{c.get('measured_on', '?')}, cached"),
        ]
    )
    shapes = " and ".join(f"(M, {k}) x ({n}, {k})ᵀ" for k, n in gemm.SHAPES)
    print(f"\nint8 GEMM backends, GOPS at SmolLM2's MLP shapes {shapes}, median of the two:")
    rows = [("backend", *(f"M = {gemm.ROWS[c_]}" for c_ in gemm.ROWS), "exact here", "extra weight memory")]
    for name, b in gemm.BACKENDS.items():
        cells = [f"{c['gops'][cls].get(name, 0):.1f}" if name in c["gops"][cls] else "-" for cls in gemm.ROWS]
        rows.append((name, *cells, "yes" if c["exact"].get(name) else "NO", b.extra_weight_memory))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print(("  " + "  ".join(f"{str(v):<{w}}" for v, w in zip(r, widths, strict=True))).rstrip())
    print(f"\nchoice: {gemm.describe_choice()}")
    if json_path:
        from outliers.cache import atomic_write

        atomic_write(json_path, json.dumps(c, indent=2) + "\n")
    return 0

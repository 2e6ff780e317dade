"""Benchmarks surefetch's default connection choice against fixed counts and hf_transfer, on nginx.

    python bench/defaults.py [--quick] [--size BYTES] [--limited-size BYTES] [--runs N]
                             [--limited-runs N] [--only unlimited,limited]
                             [--no-write-results] [--no-install]

The default (no ``-c``) starts with one connection and adds more only while they raise
the total rate (rust/schedule.rs, `Ramp`). The issue's targets: never worse than the best
fixed count, on loopback or behind a per-connection limit; and at least hf_transfer's
rate at a quarter of its memory. Two parts, both from nginx on 127.0.0.1 (bench/run.py's
server and method: each tool in its own process through bench/spawn.py, interleaved
rounds, every output checked and deleted):

1. unlimited: one file (1 GiB; quick: 128 MiB) with ``surefetch get --sha256`` (default),
   ``-c 1`` and ``-c 8``, and ``hf_transfer`` with 8 connections of 16 MiB chunks (no hash,
   no fsync). 1 warm-up run each, then 5 counted rounds (quick: 2).
2. limited: the same file under nginx's ``/limited/``: ``limit_rate`` 5 MiB/s with
   ``sendfile_max_chunk 64k``, so that every connection is held to the rate from its
   first byte. Rows: the default, ``-c 8`` and hf_transfer 8 x 16 MiB; ``-c 1`` would only
   show the rate itself (and take eight times as long). 3 rounds (quick: 1), 512 MiB
   (quick: 128 MiB).

Gates (the exit status is 1 only when one is missed by more than a factor of two):
unlimited default >= 0.95 x the better of -c 1 and -c 8 (ratio of medians: each row is
timed in the same interleaved rounds), >= 1.0 x hf_transfer, peak RSS <= 1/4 of
hf_transfer's; limited default >= 0.9 x (8 x 5 MiB/s). Full mode replaces its section of
bench/RESULTS.md; quick mode, --only and non-default sizes print only.
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import signal
import sys
import time

from run import (
    EN_DASH,
    LIMITED_RATE,
    MIB,
    RESULTS,
    TIMES,
    WORK,
    Gate,
    Job,
    Nginx,
    Row,
    SetupError,
    Tool,
    _fmt,
    _log,
    _on_sigterm,
    _python_peer,
    _size_text,
    _surefetch,
    check_rows,
    ensure_data,
    find_nginx,
    machine_info,
    markdown_table,
    precompile_surefetch,
    results_withheld,
    run_rounds,
    write_section,
)

DWORK = WORK / "defaults"
SECTION = "## Default connections against nginx (bench/defaults.py)"
PARTS = ("unlimited", "limited")
HF_CHUNK = 16 * MIB
CAP = 8  # the default's connection cap, and the fixed count it must match
UNLIMITED_TARGET, LIMITED_TARGET, HF_TARGET, RSS_SHARE = 0.95, 0.9, 1.0, 0.25


def _tools(limited: bool) -> list[Tool]:
    hf = ("hf_transfer", "--max-files", str(CAP), "--chunk-size", str(HF_CHUNK))
    tools = [
        Tool(
            "surefetch", "`surefetch get --sha256` (default connections)", _surefetch(), "surefetch"
        )
    ]
    if not limited:
        tools.append(Tool("surefetch-c1", "`surefetch get -c 1 --sha256`", _surefetch("-c", "1")))
    tools += [
        Tool(f"surefetch-c{CAP}", f"`surefetch get -c {CAP} --sha256`", _surefetch("-c", str(CAP))),
        Tool(
            f"hf_transfer-{CAP}x16MiB",
            f"`hf_transfer.download`, max_files={CAP}, chunk_size=16 MiB (no hash, no fsync)",
            _python_peer(*hf),
            modules=("hf_transfer",),
        ),
    ]
    return tools


def _median_ratio(row: Row | None, ref: Row | None) -> float | None:
    top = row.median() if row is not None else None
    bottom = ref.median() if ref is not None else None
    return None if top is None or not bottom else top / bottom


def _table(rows: list[Row], limit_mbps: float | None) -> str:
    header = ["tool", "median MB/s", f"default {TIMES} tool"]
    if limit_mbps is not None:
        header.append(f"{TIMES} ({CAP} {TIMES} limit)")
    header += ["peak RSS MiB", "runs", f"MB/s min{EN_DASH}max", "what"]
    default = rows[0]
    body = []
    for row in rows:
        median = row.median()
        cells = [row.name, row.status or _fmt(median, 0), _fmt(_median_ratio(default, row), 2)]
        if limit_mbps is not None:
            cells.append(_fmt(None if median is None else median / limit_mbps, 2))
        spread = f"{min(row.mbps.values()):.0f}{EN_DASH}{max(row.mbps.values()):.0f}"
        cells += [_fmt(row.peak_rss_kib / 1024 or None, 0), str(len(row.mbps))]
        cells += [spread if row.mbps else "—", row.tool.what]
        body.append(cells)
    return markdown_table(header, body)


def _gate(name: str, value: float | None, target: float, rows: list[Row]) -> Gate:
    broken = next((r for r in rows if r.tool.family == "surefetch" and r.status), None)
    if broken is not None and broken.status and broken.status.startswith("failed"):
        return Gate(name, None, target, True, TIMES, broken=f"{broken.name} {broken.status}")
    missing = next((r for r in rows if r.status is not None), None)
    if missing is not None:
        return Gate(name, None, target, True, TIMES, f"{missing.name} {missing.status}")
    return Gate(name, value, target, True, TIMES)


def unlimited_gates(rows: list[Row]) -> list[Gate]:
    by = {r.name: r for r in rows}
    sf, one, many = by["surefetch"], by["surefetch-c1"], by[f"surefetch-c{CAP}"]
    hf = by[f"hf_transfer-{CAP}x16MiB"]
    best = max((one, many), key=lambda r: r.median() or 0.0)
    gates = [
        _gate(
            f"unlimited default / best fixed count ({best.name})",
            _median_ratio(sf, best),
            UNLIMITED_TARGET,
            [sf, one, many],
        ),
        _gate("unlimited default / hf_transfer", _median_ratio(sf, hf), HF_TARGET, [sf, hf]),
    ]
    name = f"unlimited default peak RSS / hf_transfer's (target <= {RSS_SHARE:g})"
    if sf.peak_rss_kib and hf.peak_rss_kib:
        share = sf.peak_rss_kib / hf.peak_rss_kib
        gates.append(Gate(name, share, RSS_SHARE, False, TIMES))
    else:
        gates.append(Gate(name, None, RSS_SHARE, False, TIMES, "not measured"))
    return gates


def limited_gates(rows: list[Row]) -> list[Gate]:
    sf = rows[0]
    median = sf.median()
    value = None if median is None else median / (CAP * LIMITED_RATE / 1e6)
    name = f"limited default / ({CAP} {TIMES} {LIMITED_RATE // MIB} MiB/s)"
    return [_gate(name, value, LIMITED_TARGET, [sf])]


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="128 MiB, fewer runs, no RESULTS.md")
    parser.add_argument("--size", type=int, help="unlimited file size (1 GiB; quick: 128 MiB)")
    parser.add_argument("--limited-size", type=int, help="limited file size (512 MiB; quick: 128)")
    parser.add_argument("--runs", type=int, help="unlimited counted rounds (5; quick: 2)")
    parser.add_argument("--limited-runs", type=int, help="limited counted rounds (3; quick: 1)")
    parser.add_argument("--only", metavar="PART,...", help=f"parts: {', '.join(PARTS)}")
    parser.add_argument("--no-write-results", action="store_true", help="do not write RESULTS.md")
    parser.add_argument("--no-install", action="store_true", help="do not apt-get or pip install")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    precompile_surefetch()
    signal.signal(signal.SIGTERM, _on_sigterm)
    started = time.monotonic()
    size = args.size or (128 * MIB if args.quick else 1 << 30)
    limited_size = args.limited_size or (128 * MIB if args.quick else 512 * MIB)
    runs = args.runs or (2 if args.quick else 5)
    limited_runs = args.limited_runs or (1 if args.quick else 3)
    parts = [p.strip() for p in (args.only or ",".join(PARTS)).split(",") if p.strip()]
    if any(p not in PARTS for p in parts):
        print(f"bench/defaults.py: --only takes {', '.join(PARTS)}", file=sys.stderr)
        return 2
    install = not args.no_install
    docroot = WORK / "www"  # shared with bench/run.py and bench/parallel.py: files made once
    docroot.mkdir(parents=True, exist_ok=True)
    DWORK.mkdir(parents=True, exist_ok=True)
    for d in (WORK, DWORK, docroot):
        d.chmod(0o755)
    sections, gates, rows_all = [], [], []
    try:
        nginx = Nginx(find_nginx(install), DWORK, docroot)
        version = nginx.version()
        data, sha = ensure_data(docroot, size)
        limited_data = ensure_data(docroot, limited_size) if "limited" in parts else None
        nginx.start(data.name, data.stat().st_size)
        try:
            if "unlimited" in parts:
                rows = [Row(t) for t in _tools(limited=False)]
                check_rows(rows, install)
                rows_all += rows
                job = Job(nginx.url(data.name), DWORK / "out" / "download.bin", size, sha)
                _log("== unlimited")
                run_rounds(rows, job, runs, 1, nginx)
                sections += [
                    f"Unlimited: {_size_text(size)} from {version} on 127.0.0.1; 1 warm-up "
                    f"and {runs} interleaved rounds per tool; default {TIMES} tool is the "
                    "ratio of medians; MB = 10^6 bytes.",
                    "",
                    _table(rows, None),
                    "",
                ]
                gates += unlimited_gates(rows)
            if limited_data is not None:
                path, limited_sha = limited_data
                rows = [Row(t) for t in _tools(limited=True)]
                check_rows(rows, install)
                rows_all += rows
                url = nginx.url(f"limited/{path.name}")
                job = Job(url, DWORK / "out" / "download.bin", limited_size, limited_sha)
                _log("== limited")
                run_rounds(rows, job, limited_runs, 0, nginx)
                sections += [
                    f"Limited: {_size_text(limited_size)} from {version} with `limit_rate "
                    f"{LIMITED_RATE // MIB}m; sendfile_max_chunk 64k` (each connection held to "
                    f"{LIMITED_RATE / 1e6:.2f} MB/s from its first byte); {limited_runs} "
                    f"interleaved rounds, no warm-up; {TIMES} ({CAP} {TIMES} limit) is the "
                    f"median MB/s over {CAP} connections' worth of the limit.",
                    "",
                    _table(rows, CAP * LIMITED_RATE / 1e6),
                    "",
                ]
                gates += limited_gates(rows)
        finally:
            nginx.stop()
            shutil.rmtree(DWORK / "out", ignore_errors=True)
    except SetupError as exc:
        _log(f"bench/defaults.py: {exc}")
        return 1
    lines = [g.line() for g in gates]
    report = "\n".join([*sections, *lines])
    print(report)
    why_not = results_withheld(args, rows_all)
    if why_not is None and (args.size or args.limited_size):
        why_not = "non-default sizes"
    if why_not is None:
        when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        info = "\n".join(f"- {k}: {v}" for k, v in machine_info(version))
        cmd = " ".join(["python bench/defaults.py", *sys.argv[1:]])
        write_section(f"{SECTION}\n\n{when}, `{cmd}`\n\n{info}\n\n{report}\n")
        _log(f"wrote its section of {RESULTS}")
    else:
        _log(f"not writing {RESULTS.name} ({why_not})")
    failed = any(g.status == "FAIL" for g in gates)
    _log(f"bench: {'FAIL' if failed else 'ok'} in {time.monotonic() - started:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Judges a kosoku (Autobahn|Testsuite) fuzzing-client report of the gateway's echo endpoint.

    python3 scripts/autobahn_summary.py REPORT_DIR --max-message-size BYTES [--seconds N]
                                        [--summary FILE]

Reads REPORT_DIR/index.json (and the per-case JSON files for the details of cases that did not
pass), prints a table per section (OK / NON-STRICT / INFORMATIONAL / FAILED, and for section 9
the cases above the message size limit), one line per case that is not plain OK, and exits 1
when
  - a case of any section but 9 is not OK, NON-STRICT or INFORMATIONAL (both the behaviour and
    the closing behaviour), or
  - a section 9 case whose message fits --max-message-size did not pass, or
  - a section 9 case whose message is larger was not refused with close 1009 (message too big).
scripts/autobahn runs it.
"""

import argparse
import json
import os
import sys
from collections import OrderedDict

PASSING = {"OK", "NON-STRICT", "INFORMATIONAL"}
MIB = 1024 * 1024

# Message sizes of the section 9 cases, from kosoku's copies of Autobahn's case files
# (kosoku/cases/case9_*.py: DATALEN, or LEN for 9.7/9.8): 9.1 text and 9.2 binary single
# frames of 64 KiB to 16 MiB; 9.3 text and 9.4 binary 4 MiB messages in fragments of 64 B to
# 4 MiB; 9.5 text and 9.6 binary 1 MiB frames sent in TCP chops; 9.7/9.8 1000 messages of at
# most 4 KiB each.
SIZES_9 = {}
for group in ("9.1", "9.2"):
    for i, size in enumerate([64 * 1024, 256 * 1024, MIB, 4 * MIB, 8 * MIB, 16 * MIB], 1):
        SIZES_9[f"{group}.{i}"] = size
for group in ("9.3", "9.4"):
    for i in range(1, 10):
        SIZES_9[f"{group}.{i}"] = 4 * MIB
for group in ("9.5", "9.6"):
    for i in range(1, 7):
        SIZES_9[f"{group}.{i}"] = MIB
for group in ("9.7", "9.8"):
    for i, size in enumerate([0, 16, 64, 256, 1024, 4096], 1):
        SIZES_9[f"{group}.{i}"] = size


def sort_key(case_id):
    return [int(p) for p in case_id.split(".")]


def human(n):
    if n >= MIB and n % MIB == 0:
        return f"{n // MIB} MiB"
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024} KiB"
    return f"{n} B"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report_dir")
    ap.add_argument("--max-message-size", type=int, required=True)
    ap.add_argument("--seconds", type=int, default=None)
    ap.add_argument("--summary", default=None, help="also write the summary to this file")
    args = ap.parse_args()
    limit = args.max_message_size

    with open(os.path.join(args.report_dir, "index.json")) as f:
        index = json.load(f)
    cases = {}
    for agent_cases in index.values():
        cases.update(agent_cases)
    if not cases:
        print("autobahn: the report holds no cases", file=sys.stderr)
        return 1

    def details(case_id):
        entry = cases[case_id]
        try:
            with open(os.path.join(args.report_dir, entry["reportfile"])) as f:
                return json.load(f)
        except (OSError, KeyError, ValueError):
            return {}

    columns = ["OK", "NON-STRICT", "INFORMATIONAL", "ABOVE LIMIT", "FAILED"]
    sections = OrderedDict()
    notes = []
    failures = 0
    for case_id in sorted(cases, key=sort_key):
        entry = cases[case_id]
        section = case_id.split(".")[0]
        behavior, closing = entry.get("behavior"), entry.get("behaviorClose")
        passed = behavior in PASSING and closing in PASSING
        size = SIZES_9.get(case_id) if section == "9" else None
        counts = sections.setdefault(section, OrderedDict((c, 0) for c in columns))
        if size is not None and size > limit:
            # Above the limit the gateway must refuse the message with 1009 (and Autobahn, which
            # expects an echo, then reports the case as failed: that is the configured limit).
            code = entry.get("remoteCloseCode")
            if code == 1009:
                counts["ABOVE LIMIT"] += 1
                notes.append(
                    f"{case_id:<8} ABOVE LIMIT  its {human(size)} message is over "
                    f"max_message_size {human(limit)}: refused with close 1009 as configured "
                    f"(Autobahn expected an echo: {behavior}/{closing})"
                )
            else:
                counts["FAILED"] += 1
                failures += 1
                d = details(case_id)
                notes.append(
                    f"{case_id:<8} FAILED       its {human(size)} message is over "
                    f"max_message_size {human(limit)}, so close 1009 was due; the gateway "
                    f"closed with {code} ({behavior}/{closing}: {d.get('result', '')} "
                    f"{d.get('resultClose', '')})"
                )
            continue
        if not passed:
            counts["FAILED"] += 1
            failures += 1
            d = details(case_id)
            notes.append(
                f"{case_id:<8} FAILED       {behavior}/{closing}: {d.get('result', '')} | "
                f"{d.get('resultClose', '')} (close code {entry.get('remoteCloseCode')})"
            )
            continue
        verdict = behavior if behavior != "OK" else closing
        counts[verdict] += 1
        if verdict != "OK":
            d = details(case_id)
            notes.append(f"{case_id:<8} {verdict:<12} {d.get('result', '')}")

    lines = []
    took = f" in {args.seconds} s" if args.seconds is not None else ""
    lines.append(
        f"Autobahn|Testsuite (kosoku) against the echo endpoint: {len(cases)} cases{took}, "
        f"max_message_size {human(limit)}"
    )
    lines.append("")
    header = f"{'section':<8}" + "".join(f"{c:>15}" for c in columns) + f"{'total':>8}"
    lines.append(header)
    totals = OrderedDict((c, 0) for c in columns)
    for section, counts in sections.items():
        row = f"{section:<8}" + "".join(f"{counts[c]:>15}" for c in columns)
        lines.append(row + f"{sum(counts.values()):>8}")
        for c in columns:
            totals[c] += counts[c]
    lines.append(
        f"{'all':<8}" + "".join(f"{totals[c]:>15}" for c in columns)
        + f"{sum(totals.values()):>8}"
    )
    if notes:
        lines.append("")
        lines.extend(notes)
    lines.append("")
    if failures:
        lines.append(f"autobahn: {failures} case(s) FAILED; report: {args.report_dir}/index.html")
    else:
        lines.append(f"autobahn: all cases passed; report: {args.report_dir}/index.html")
    text = "\n".join(lines)
    print(text)
    if args.summary:
        with open(args.summary, "w") as f:
            f.write(text + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

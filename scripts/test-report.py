#!/usr/bin/env python3
"""What a test run cost, from nextest's JUnit report: the slowest tests, the skipped ones
and the time of each phase of `scripts/test.sh`, as tables.

Usage: test-report.py JUNIT.xml [--skips FILE] [--cpu FILE] [--phase NAME=SECONDS]... [--top N]
"""

import argparse
import sys
import xml.etree.ElementTree as ET


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("junit")
    parser.add_argument("--skips", help="the run's skip list (one line per skipped test)")
    parser.add_argument("--cpu", help="`NAME SECONDS` lines: each test's CPU with its VMs")
    parser.add_argument("--phase", action="append", default=[], help="NAME=SECONDS")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()

    try:
        root = ET.parse(args.junit).getroot()
    except (OSError, ET.ParseError) as e:
        print(f"test-report: no report at `{args.junit}` ({e})", file=sys.stderr)
        return 1

    cases = []
    for case in root.iter("testcase"):
        status = "passed"
        if case.find("failure") is not None or case.find("error") is not None:
            status = "FAILED"
        elif case.find("skipped") is not None:
            status = "skipped"
        elif case.find("flakyFailure") is not None or case.find("rerunFailure") is not None:
            status = "flaky"
        cases.append((float(case.get("time", "0")), case.get("name", "?"), status))
    cases.sort(reverse=True)
    summed = sum(t for t, _, _ in cases)
    cpu = {}
    if args.cpu:
        try:
            with open(args.cpu) as f:
                for line in f:
                    name, _, seconds = line.strip().rpartition(" ")
                    if name:
                        cpu[name] = cpu.get(name, 0.0) + float(seconds)
        except (FileNotFoundError, ValueError):
            pass

    out = sys.stderr
    print(f"\n## Slowest tests ({len(cases)} ran, {summed:.0f} s of test time in all)\n", file=out)
    if cpu:
        print(f"(CPU: the test's processes and the VMs they started, {sum(cpu.values()):.0f} s in all)\n", file=out)
    print("| seconds | CPU seconds | test | result |", file=out)
    print("|---:|---:|---|---|", file=out)
    for seconds, name, status in cases[: args.top]:
        used = f"{cpu[name]:.0f}" if name in cpu else ""
        print(f"| {seconds:.1f} | {used} | {name} | {status} |", file=out)
    if cpu:
        print("\n## Most CPU\n", file=out)
        print("| CPU seconds | test |", file=out)
        print("|---:|---|", file=out)
        for name, used in sorted(cpu.items(), key=lambda kv: -kv[1])[: args.top]:
            print(f"| {used:.0f} | {name} |", file=out)

    skipped = []
    if args.skips:
        try:
            with open(args.skips) as f:
                skipped = [line.strip() for line in f if line.strip()]
        except FileNotFoundError:
            pass
    print(f"\n## Skipped for missing parts: {len(skipped)}\n", file=out)
    for line in skipped:
        print(f"- {line}", file=out)

    if args.phase:
        print("\n## Time of the run\n", file=out)
        print("| phase | seconds | minutes |", file=out)
        print("|---|---:|---:|", file=out)
        for phase in args.phase:
            name, _, seconds = phase.partition("=")
            print(f"| {name} | {int(seconds)} | {int(seconds) / 60:.1f} |", file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Build the built-in corpus: the Python standard library's .py files as jsonl.

Each line is ``{"text": <file contents>, "path": <path relative to the stdlib>}``, files in
sorted order, so the corpus is the same on every machine with the same Python. The stdlib is
found with ``sysconfig`` (site-packages is excluded). ``--copies N`` writes N copies, each file
prefixed with a ``# copy K`` line so they are not duplicates (benchmarks at 10x the corpus).
"""
import argparse
import json
import os
import sys
import sysconfig


def stdlib_files(include_tests: bool):
    root = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "dist-packages", "__pycache__", "idlelib", "turtledemo"}
    if not include_tests:
        skip |= {"test", "tests", "idle_test"}
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in skip)
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                yield root, os.path.relpath(path, root)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="jsonl file to write")
    p.add_argument("--copies", type=int, default=1, help="write the corpus this many times (distinct copies)")
    p.add_argument("--include-tests", action="store_true", help="also the stdlib's test packages")
    args = p.parse_args(argv)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    n = size = 0
    with open(tmp, "w", encoding="utf-8") as out:
        for copy in range(args.copies):
            for root, rel in stdlib_files(args.include_tests):
                try:
                    with open(os.path.join(root, rel), encoding="utf-8") as f:
                        text = f.read()
                except (OSError, UnicodeDecodeError):
                    continue  # a few test fixtures are not UTF-8
                if args.copies > 1:
                    text = f"# copy {copy}\n{text}"
                line = json.dumps({"text": text, "path": rel}, ensure_ascii=False)
                out.write(line + "\n")
                n += 1
                size += len(line) + 1
    os.replace(tmp, args.out)
    print(f"{args.out}: {n} files, {size / 1e6:.1f} MB (Python {sys.version.split()[0]} stdlib)", file=sys.stderr)


if __name__ == "__main__":
    main()

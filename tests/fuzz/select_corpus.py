#!/usr/bin/env python3
"""Pick at most LIMIT corpus files that keep the most coverage.

`cargo fuzz cmin` keeps every file that adds a feature, smallest first, which
for the packet and session targets is well over a thousand files. This reads
the control file of a libFuzzer merge and chooses greedily: first the seed
files (named `seed-*`), then the file that adds the most new coverage edges,
then, once every edge is covered, the most new features; ties go to the
smaller file. It copies the chosen files to OUTDIR and prints what they
cover.

    T=$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release
    mkdir -p /tmp/merged /tmp/chosen
    $T/session -merge=1 -max_len=8192 -merge_control_file=/tmp/session.ctl /tmp/merged corpus/session
    python3 select_corpus.py /tmp/session.ctl 200 /tmp/chosen
    rm -r corpus/session && mv /tmp/chosen corpus/session
"""

import os
import shutil
import sys


def main() -> None:
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    control, limit, outdir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    lines = open(control).read().splitlines()
    count = int(lines[0])
    files = lines[2 : 2 + count]
    features: dict[int, set[int]] = {}
    edges: dict[int, set[int]] = {}
    for line in lines[2 + count :]:
        parts = line.split()
        if parts and parts[0] == "FT":
            features[int(parts[1])] = set(map(int, parts[2:]))
        elif parts and parts[0] == "COV":
            edges[int(parts[1])] = set(map(int, parts[2:]))
    size = {i: os.path.getsize(f) for i, f in enumerate(files)}
    chosen = [i for i, f in enumerate(files) if os.path.basename(f).startswith("seed-")]
    for sets in (edges, features):
        covered = set().union(*(sets.get(i, set()) for i in chosen))
        remaining = set(sets) - set(chosen)
        while len(chosen) < limit and remaining:
            best = max(remaining, key=lambda i: (len(sets[i] - covered), -size[i]))
            if not sets[best] - covered:
                break
            chosen.append(best)
            covered |= sets[best]
            remaining.discard(best)

    def union(sets: dict[int, set[int]], which) -> int:
        return len(set().union(*(sets.get(i, set()) for i in which)))

    print(
        f"chose {len(chosen)} of {count} files: "
        f"edges {union(edges, chosen)}/{union(edges, range(count))}, "
        f"features {union(features, chosen)}/{union(features, range(count))}, "
        f"{sum(size[i] for i in chosen)} bytes"
    )
    os.makedirs(outdir, exist_ok=True)
    for i in chosen:
        shutil.copy(files[i], os.path.join(outdir, os.path.basename(files[i])))


if __name__ == "__main__":
    main()

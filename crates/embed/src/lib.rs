//! # arches-embed
//!
//! Local text embeddings behind the [`EmbeddingProvider`] port: [`MiniLmEmbedder`] runs
//! `sentence-transformers/all-MiniLM-L6-v2` (a 6-layer BERT, 384 dimensions, 22.7 M
//! parameters) on the CPU and computes exactly what sentence-transformers computes for that
//! model (its `modules.json`: `Transformer` → `Pooling` (mean) → `Normalize`):
//!
//! 1. WordPiece tokens of each text by the model's `tokenizer.json` (BERT normaliser:
//!    lower-casing, accents kept as the config says), `[CLS] … [SEP]`, **truncated to
//!    `max_seq_length` tokens** (256 for this model, from `sentence_bert_config.json`; the
//!    text after it does not count; [`MiniLmEmbedder::token_count`] tells whether a text is
//!    cut);
//! 2. the BERT forward pass over a batch padded to its longest text, with an attention mask;
//! 3. the mean of the last hidden states over the real (unpadded) tokens;
//! 4. L2 normalisation.
//!
//! Inference: our own forward pass on plain `f32` slices (`bert.rs`), matrix products by
//! `faer` (pure Rust; its AVX-512/AVX2 kernels are chosen at run time, so a generic build runs
//! everywhere). A pass packs its texts without padding, and attention runs per text. candle
//! was the first engine: its small products did not keep two cores busy and it reached
//! 0.3–0.6× of PyTorch on an idle machine (`crates/embed/bench/README.md`). The model ships
//! as safetensors only; tract and ONNX Runtime need an ONNX export, and Debian bookworm
//! packages no `libonnxruntime`.
//!
//! Threads: rayon's global pool, sized by `RAYON_NUM_THREADS` (default: one per CPU). A call
//! with at least as many passes as threads runs its passes side by side, one per thread;
//! otherwise each pass spreads over the pool. Inference runs on tokio's blocking pool, at
//! most [`MiniLmOptions::max_concurrency`] calls at once.

mod bert;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arches_core::embedding::{
    check_batch, l2_normalize, EmbeddingError, EmbeddingProvider, Embeddings,
    DEFAULT_MAX_TEXT_BYTES,
};
use async_trait::async_trait;
use serde::Deserialize;
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};
use tokio::sync::Semaphore;

use bert::{read_json, Bert, BertConfig, Threads};

/// The model's name as this crate reports it ([`Embeddings::model`]) unless
/// [`MiniLmOptions::model_name`] says otherwise.
pub const MINILM_MODEL_NAME: &str = "all-MiniLM-L6-v2";
/// The folder name `scripts/fetch-model` puts the model in, under `$ARCHES_MODEL_DIR`
/// (default `~/.cache/arches/models`).
pub const MINILM_DIR_NAME: &str = "all-MiniLM-L6-v2";
/// Default [`MiniLmOptions::max_batch`]: 1,024 texts per call.
pub const DEFAULT_MAX_BATCH: usize = 1024;
/// Default [`MiniLmOptions::inference_batch`]: 32 texts per forward pass, the default
/// `batch_size` of sentence-transformers' `encode`.
pub const DEFAULT_INFERENCE_BATCH: usize = 32;

/// The model files read by [`MiniLmEmbedder::load`], relative to its directory.
pub const MODEL_FILES: [&str; 5] = [
    "config.json",
    "tokenizer.json",
    "model.safetensors",
    "sentence_bert_config.json",
    "1_Pooling/config.json",
];

/// How a [`MiniLmEmbedder`] runs.
#[derive(Clone, Debug)]
pub struct MiniLmOptions {
    /// The name reported as [`EmbeddingProvider::model`]; default [`MINILM_MODEL_NAME`].
    pub model_name: String,
    /// Most texts one [`EmbeddingProvider::embed`] call takes; default
    /// [`DEFAULT_MAX_BATCH`].
    pub max_batch: usize,
    /// Largest text, in bytes; default [`DEFAULT_MAX_TEXT_BYTES`] (64 KiB). Texts are cut to
    /// `max_seq_length` tokens anyway; this only refuses unreasonable input early.
    pub max_text_bytes: usize,
    /// Texts per forward pass; default [`DEFAULT_INFERENCE_BATCH`]. A call's texts are sorted
    /// by token count and cut into passes of this many, each padded to its longest text.
    pub inference_batch: usize,
    /// Calls whose inference may run at once on the blocking pool; default 1 (a call's passes
    /// use all of rayon's threads already).
    pub max_concurrency: usize,
    /// Tokens read per text, `[CLS]` and `[SEP]` included; `None`: the model's
    /// `max_seq_length` from `sentence_bert_config.json` (256 for all-MiniLM-L6-v2). At most
    /// the model's `max_position_embeddings` (512).
    pub max_seq_length: Option<usize>,
}

impl Default for MiniLmOptions {
    fn default() -> Self {
        Self {
            model_name: MINILM_MODEL_NAME.to_owned(),
            max_batch: DEFAULT_MAX_BATCH,
            max_text_bytes: DEFAULT_MAX_TEXT_BYTES,
            inference_batch: DEFAULT_INFERENCE_BATCH,
            max_concurrency: 1,
            max_seq_length: None,
        }
    }
}

#[derive(Deserialize)]
struct SentenceBertConfig {
    max_seq_length: usize,
}

#[derive(Deserialize)]
struct PoolingConfig {
    word_embedding_dimension: usize,
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
}

#[derive(Deserialize)]
struct Module {
    #[serde(rename = "type")]
    kind: String,
}

/// What the blocking pool shares.
struct Inner {
    bert: Bert,
    /// Truncating at `max_seq_length`, no padding.
    tokenizer: Tokenizer,
    /// The same without truncation, for [`MiniLmEmbedder::token_count`].
    counting: Tokenizer,
    inference_batch: usize,
}

/// all-MiniLM-L6-v2 (or another BERT sentence-transformers model with mean pooling) on the
/// CPU. Cheap to clone: the weights are shared.
#[derive(Clone)]
pub struct MiniLmEmbedder {
    inner: Arc<Inner>,
    permits: Arc<Semaphore>,
    model: String,
    dimension: usize,
    max_batch: usize,
    max_text_bytes: usize,
    max_seq_length: usize,
}

impl std::fmt::Debug for MiniLmEmbedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MiniLmEmbedder")
            .field("model", &self.model)
            .field("dimension", &self.dimension)
            .field("max_batch", &self.max_batch)
            .field("max_seq_length", &self.max_seq_length)
            .finish_non_exhaustive()
    }
}

fn load_error(file: &Path, reason: impl std::fmt::Display) -> EmbeddingError {
    EmbeddingError::ModelLoad {
        file: file.display().to_string(),
        reason: reason.to_string(),
    }
}

fn permanent(error: impl std::fmt::Display) -> EmbeddingError {
    EmbeddingError::Permanent(format!("inference failed: {error}"))
}

impl MiniLmEmbedder {
    /// Loads the model from `dir`: [`MODEL_FILES`] (and `modules.json` when present, which
    /// must list only `Transformer`, `Pooling` and `Normalize` modules), as
    /// `scripts/fetch-model` lays them out. Reads the 87 MiB of weights into memory.
    ///
    /// # Errors
    /// [`EmbeddingError::ModelLoad`] naming the file that is missing, unreadable, corrupt or
    /// not supported (pooling other than mean, a non-BERT config, a missing tensor), or the
    /// directory when it does not exist; [`EmbeddingError::Permanent`] for bad options.
    pub fn load(dir: &Path, options: MiniLmOptions) -> Result<Self, EmbeddingError> {
        if options.max_batch == 0 || options.inference_batch == 0 || options.max_concurrency == 0 {
            return Err(EmbeddingError::Permanent(
                "max_batch, inference_batch and max_concurrency must be positive".into(),
            ));
        }
        if !dir.is_dir() {
            return Err(load_error(
                dir,
                "no such model directory (run scripts/fetch-model to install all-MiniLM-L6-v2)",
            ));
        }
        let path = |name: &str| -> PathBuf { dir.join(name) };

        let config_path = path("config.json");
        let config: BertConfig =
            read_json(&config_path).map_err(|reason| load_error(&config_path, reason))?;
        config
            .check()
            .map_err(|reason| load_error(&config_path, reason))?;

        let st_path = path("sentence_bert_config.json");
        let st: SentenceBertConfig =
            read_json(&st_path).map_err(|reason| load_error(&st_path, reason))?;
        let max_seq_length = options.max_seq_length.unwrap_or(st.max_seq_length);
        if max_seq_length < 2 || max_seq_length > config.max_position_embeddings {
            return Err(load_error(
                &st_path,
                format!(
                    "max_seq_length {max_seq_length} must be between 2 and max_position_embeddings {}",
                    config.max_position_embeddings
                ),
            ));
        }

        let pooling_path = path("1_Pooling/config.json");
        let pooling: PoolingConfig =
            read_json(&pooling_path).map_err(|reason| load_error(&pooling_path, reason))?;
        if !pooling.pooling_mode_mean_tokens
            || pooling.pooling_mode_cls_token
            || pooling.pooling_mode_max_tokens
            || pooling.pooling_mode_mean_sqrt_len_tokens
        {
            return Err(load_error(
                &pooling_path,
                "only mean pooling (pooling_mode_mean_tokens alone) is supported",
            ));
        }
        if pooling.word_embedding_dimension != config.hidden_size {
            return Err(load_error(
                &pooling_path,
                format!(
                    "word_embedding_dimension {} differs from the model's hidden_size {}",
                    pooling.word_embedding_dimension, config.hidden_size
                ),
            ));
        }

        let modules_path = path("modules.json");
        if modules_path.exists() {
            let modules: Vec<Module> =
                read_json(&modules_path).map_err(|reason| load_error(&modules_path, reason))?;
            if let Some(other) = modules.iter().find(|module| {
                !matches!(
                    module.kind.as_str(),
                    "sentence_transformers.models.Transformer"
                        | "sentence_transformers.models.Pooling"
                        | "sentence_transformers.models.Normalize"
                )
            }) {
                return Err(load_error(
                    &modules_path,
                    format!("module {} is not supported", other.kind),
                ));
            }
        }

        let tokenizer_path = path("tokenizer.json");
        let mut counting = Tokenizer::from_file(&tokenizer_path)
            .map_err(|error| load_error(&tokenizer_path, error))?;
        counting.with_padding(None);
        counting
            .with_truncation(None)
            .map_err(|error| load_error(&tokenizer_path, error))?;
        let mut tokenizer = counting.clone();
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_seq_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|error| load_error(&tokenizer_path, error))?;
        if tokenizer.get_vocab_size(true) > config.vocab_size {
            return Err(load_error(
                &tokenizer_path,
                format!(
                    "its vocabulary ({} tokens) is larger than the model's vocab_size {}",
                    tokenizer.get_vocab_size(true),
                    config.vocab_size
                ),
            ));
        }

        let weights_path = path("model.safetensors");
        let bytes =
            std::fs::read(&weights_path).map_err(|error| load_error(&weights_path, error))?;
        let bert = Bert::load(&bytes, &config).map_err(|error| load_error(&weights_path, error))?;
        drop(bytes);

        Ok(Self {
            inner: Arc::new(Inner {
                bert,
                tokenizer,
                counting,
                inference_batch: options.inference_batch,
            }),
            permits: Arc::new(Semaphore::new(options.max_concurrency)),
            model: options.model_name,
            dimension: config.hidden_size,
            max_batch: options.max_batch,
            max_text_bytes: options.max_text_bytes,
            max_seq_length,
        })
    }

    /// Tokens read per text, `[CLS]` and `[SEP]` included (256 for all-MiniLM-L6-v2): the
    /// rest of a longer text is ignored.
    pub fn max_seq_length(&self) -> usize {
        self.max_seq_length
    }

    /// Tokens of `text` before truncation, `[CLS]` and `[SEP]` included: the text is cut
    /// when this is over [`MiniLmEmbedder::max_seq_length`].
    ///
    /// # Errors
    /// [`EmbeddingError::Permanent`] when the tokenizer fails.
    pub fn token_count(&self, text: &str) -> Result<usize, EmbeddingError> {
        self.inner
            .counting
            .encode(text, true)
            .map(|encoding| encoding.len())
            .map_err(permanent)
    }

    /// [`EmbeddingProvider::embed`] on the calling thread (no runtime needed; it blocks for
    /// the whole inference, so call it off async tasks).
    ///
    /// # Errors
    /// As [`EmbeddingProvider::embed`].
    pub fn embed_blocking(&self, texts: &[String]) -> Result<Embeddings, EmbeddingError> {
        check_batch(texts, self.max_batch, self.max_text_bytes)?;
        let (vectors, tokens) = self.inner.run(texts)?;
        Ok(Embeddings {
            vectors,
            model: self.model.clone(),
            dimension: self.dimension,
            tokens: Some(tokens),
        })
    }
}

impl Inner {
    /// Vectors of `texts` in order, and the tokens read.
    ///
    /// The texts are sorted by token count (longest first) and cut into passes of
    /// `inference_batch`; with at least as many passes as rayon has threads, the passes run
    /// side by side, each on one thread (no synchronisation inside a pass, which is what
    /// kept the small matrix products of a multi-threaded pass from using every core);
    /// otherwise they run one after the other, each spread over the pool.
    fn run(&self, texts: &[String]) -> Result<(Vec<Vec<f32>>, u64), EmbeddingError> {
        use rayon::prelude::*;
        let inputs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let encodings = self
            .tokenizer
            .encode_batch(inputs, true)
            .map_err(permanent)?;
        let tokens: u64 = encodings.iter().map(|e| e.len() as u64).sum();
        // Longest first: the longest passes start first, so the last ones to finish are short.
        let mut order: Vec<usize> = (0..encodings.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(encodings[i].len()));
        let passes: Vec<&[usize]> = order.chunks(self.inference_batch).collect();
        let embed_pass = |pass: &&[usize], threads: Threads| {
            let ids: Vec<&[u32]> = pass.iter().map(|&i| encodings[i].get_ids()).collect();
            self.bert.embed_pass(&ids, threads).map_err(permanent)
        };
        let pooled: Vec<Vec<Vec<f32>>> = if passes.len() >= rayon::current_num_threads().max(2) {
            passes
                .par_iter()
                .with_max_len(1)
                .map(|pass| embed_pass(pass, Threads::One))
                .collect::<Result<_, _>>()?
        } else {
            passes
                .iter()
                .map(|pass| embed_pass(pass, Threads::Pool))
                .collect::<Result<_, _>>()?
        };
        let mut vectors: Vec<Vec<f32>> = vec![Vec::new(); texts.len()];
        for (pass, pooled) in passes.iter().zip(pooled) {
            for (&i, mut vector) in pass.iter().zip(pooled) {
                if vector.iter().any(|x| !x.is_finite()) {
                    return Err(permanent(format!("text {i} gave a non-finite vector")));
                }
                l2_normalize(&mut vector);
                vectors[i] = vector;
            }
        }
        Ok((vectors, tokens))
    }
}

#[async_trait]
impl EmbeddingProvider for MiniLmEmbedder {
    fn model(&self) -> &str {
        &self.model
    }

    /// 384 for all-MiniLM-L6-v2 (the model's `hidden_size`).
    fn dimension(&self) -> usize {
        self.dimension
    }

    fn max_batch(&self) -> usize {
        self.max_batch
    }

    fn max_text_bytes(&self) -> usize {
        self.max_text_bytes
    }

    /// Runs on tokio's blocking pool, at most [`MiniLmOptions::max_concurrency`] calls at
    /// once; texts past [`MiniLmEmbedder::max_seq_length`] tokens are truncated.
    async fn embed(&self, texts: &[String]) -> Result<Embeddings, EmbeddingError> {
        check_batch(texts, self.max_batch, self.max_text_bytes)?;
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| EmbeddingError::Unavailable("the embedder is shut down".into()))?;
        let this = self.clone();
        let texts = texts.to_vec();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            this.embed_blocking(&texts)
        })
        .await
        .map_err(|error| {
            EmbeddingError::Unavailable(format!("the inference thread failed: {error}"))
        })?
    }
}

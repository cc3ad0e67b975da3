//! The embedding provider port: texts in, one unit-length vector per text out. Adapters do
//! the work: a local model on the CPU (`arches-embed`'s all-MiniLM-L6-v2) or an
//! OpenAI-compatible `POST /embeddings` endpoint (`arches-tools`). Callers (indexing and
//! search tools) use only this trait and compare vectors by cosine, which for the unit vectors
//! returned here is their dot product.
//!
//! Bounds: every provider states the largest batch it takes ([`EmbeddingProvider::max_batch`])
//! and the largest text in bytes ([`EmbeddingProvider::max_text_bytes`], by default
//! [`DEFAULT_MAX_TEXT_BYTES`]); [`check_batch`] is the shared check, done before any work. A
//! model with a bounded context (in tokens) truncates longer texts and says so in its docs;
//! the byte bound only stops unreasonable inputs early.

use async_trait::async_trait;

/// Default bound of one text, in bytes of UTF-8: 64 KiB. Larger than any context window in
/// use (OpenAI's embedding models take 8,192 tokens, about 32 KiB of English; all-MiniLM-L6-v2
/// reads 256 tokens), small enough that a batch of them is a bounded request.
pub const DEFAULT_MAX_TEXT_BYTES: usize = 64 * 1024;

/// The vectors of one batch of texts.
#[derive(Clone, Debug, PartialEq)]
pub struct Embeddings {
    /// One vector per text, in the order of the texts; each has [`Embeddings::dimension`]
    /// finite components and Euclidean (L2) norm 1 (within float rounding), so the cosine of
    /// two texts is the dot product of their vectors.
    pub vectors: Vec<Vec<f32>>,
    /// The model that made them, as the provider names it (for example `all-MiniLM-L6-v2`).
    pub model: String,
    /// Components per vector (384 for all-MiniLM-L6-v2).
    pub dimension: usize,
    /// Tokens the model read for the whole batch (after truncation), when the provider knows;
    /// `None` is "unknown", never zero.
    pub tokens: Option<u64>,
}

/// Why an embedding request failed. Messages name the cause and never hold an API key.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EmbeddingError {
    /// Bad input: the batch has no text.
    #[error("the batch is empty: give at least one text to embed")]
    EmptyBatch,
    /// Bad input: the batch has more texts than the provider takes at once.
    #[error("the batch has {got} texts, over the provider's bound of {max}: split it")]
    BatchTooLarge {
        /// Texts given.
        got: usize,
        /// The provider's [`EmbeddingProvider::max_batch`].
        max: usize,
    },
    /// Bad input: one text is longer than the provider's byte bound.
    #[error("text {index} of the batch is {bytes} bytes, over the bound of {max} bytes")]
    TextTooLong {
        /// The text's position in the batch (from 0).
        index: usize,
        /// Its length in bytes of UTF-8.
        bytes: usize,
        /// The provider's [`EmbeddingProvider::max_text_bytes`].
        max: usize,
    },
    /// The provider could not be reached or failed transiently (connection error, timeout,
    /// 408, 429, 5xx after the adapter's retries, an open circuit breaker, the inference pool
    /// shut down): a later try may succeed.
    #[error("the embedding provider is unavailable: {0}")]
    Unavailable(String),
    /// The provider refused the request or answered something that is not embeddings (a
    /// 4xx, a wrong count, a non-finite number, an inference failure): trying again will not
    /// help.
    #[error("embedding failed: {0}")]
    Permanent(String),
    /// A local model could not be loaded: a file missing, unreadable or corrupt.
    #[error("cannot load the embedding model: {file}: {reason}")]
    ModelLoad {
        /// The file at fault, as a path (or the model directory when it is missing).
        file: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl EmbeddingError {
    /// Whether a later try may succeed (only [`EmbeddingError::Unavailable`]).
    pub fn retryable(&self) -> bool {
        matches!(self, EmbeddingError::Unavailable(_))
    }

    /// Whether the caller's input is at fault (empty batch, batch or text over a bound).
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            EmbeddingError::EmptyBatch
                | EmbeddingError::BatchTooLarge { .. }
                | EmbeddingError::TextTooLong { .. }
        )
    }
}

/// The embedding provider port.
///
/// Retries, timeouts and circuit breaking of transient failures are the adapter's; a returned
/// [`EmbeddingError::Unavailable`] means they are spent.
#[async_trait]
pub trait EmbeddingProvider: Send + Sync {
    /// The model's name as the provider knows it.
    fn model(&self) -> &str;

    /// Components of every vector this provider returns.
    fn dimension(&self) -> usize;

    /// Most texts one [`EmbeddingProvider::embed`] call takes (at least 1).
    fn max_batch(&self) -> usize;

    /// Largest text one call takes, in bytes of UTF-8; [`DEFAULT_MAX_TEXT_BYTES`] unless the
    /// provider says otherwise.
    fn max_text_bytes(&self) -> usize {
        DEFAULT_MAX_TEXT_BYTES
    }

    /// Embeds `texts`: one L2-normalised vector of [`EmbeddingProvider::dimension`]
    /// components per text, in order.
    ///
    /// # Errors
    /// Bad input ([`EmbeddingError::EmptyBatch`], [`EmbeddingError::BatchTooLarge`],
    /// [`EmbeddingError::TextTooLong`]) before any work; the provider unavailable
    /// (retryable) or failing permanently.
    async fn embed(&self, texts: &[String]) -> Result<Embeddings, EmbeddingError>;
}

/// Checks a batch against a provider's bounds: not empty, at most `max_batch` texts, each at
/// most `max_text_bytes` bytes.
///
/// # Errors
/// The first problem found, as [`EmbeddingError::EmptyBatch`],
/// [`EmbeddingError::BatchTooLarge`] or [`EmbeddingError::TextTooLong`] (naming the text).
pub fn check_batch(
    texts: &[String],
    max_batch: usize,
    max_text_bytes: usize,
) -> Result<(), EmbeddingError> {
    if texts.is_empty() {
        return Err(EmbeddingError::EmptyBatch);
    }
    if texts.len() > max_batch {
        return Err(EmbeddingError::BatchTooLarge {
            got: texts.len(),
            max: max_batch,
        });
    }
    if let Some((index, text)) = texts
        .iter()
        .enumerate()
        .find(|(_, text)| text.len() > max_text_bytes)
    {
        return Err(EmbeddingError::TextTooLong {
            index,
            bytes: text.len(),
            max: max_text_bytes,
        });
    }
    Ok(())
}

/// Scales `vector` to Euclidean norm 1 in place, as PyTorch's `F.normalize(p=2, eps=1e-12)`
/// does (the divisor is at least 1e-12, so a zero vector stays zero). Returns the norm it
/// had.
pub fn l2_normalize(vector: &mut [f32]) -> f32 {
    let norm = vector
        .iter()
        .map(|x| f64::from(*x) * f64::from(*x))
        .sum::<f64>()
        .sqrt() as f32;
    let divisor = norm.max(1e-12);
    for x in vector.iter_mut() {
        *x /= divisor;
    }
    norm
}

/// The cosine similarity of two vectors of the same length, in [-1, 1]; 0 when either is
/// zero or the lengths differ.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return 0.0;
    }
    let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (f64::from(*x), f64::from(*y));
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    if na == 0.0 || nb == 0.0 {
        return 0.0;
    }
    (dot / (na.sqrt() * nb.sqrt())).clamp(-1.0, 1.0) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_checked_in_order() {
        assert_eq!(check_batch(&[], 4, 10), Err(EmbeddingError::EmptyBatch));
        let texts: Vec<String> = vec!["a".into(); 5];
        assert_eq!(
            check_batch(&texts, 4, 10),
            Err(EmbeddingError::BatchTooLarge { got: 5, max: 4 })
        );
        let texts = vec!["short".to_owned(), "x".repeat(11)];
        let error = check_batch(&texts, 4, 10).unwrap_err();
        assert_eq!(
            error,
            EmbeddingError::TextTooLong {
                index: 1,
                bytes: 11,
                max: 10
            }
        );
        assert!(error.is_bad_input() && !error.retryable());
        assert!(error.to_string().contains("text 1"), "{error}");
        assert!(check_batch(&texts[..1], 4, 10).is_ok());
    }

    #[test]
    fn only_unavailable_is_retryable() {
        assert!(EmbeddingError::Unavailable("down".into()).retryable());
        assert!(!EmbeddingError::Permanent("bad".into()).retryable());
        let load = EmbeddingError::ModelLoad {
            file: "/m/model.safetensors".into(),
            reason: "missing".into(),
        };
        assert!(!load.retryable() && !load.is_bad_input());
        assert!(load.to_string().contains("/m/model.safetensors"));
    }

    #[test]
    fn normalising_gives_unit_vectors() {
        let mut v = vec![3.0, 4.0];
        assert!((l2_normalize(&mut v) - 5.0).abs() < 1e-6);
        assert!((v[0] - 0.6).abs() < 1e-6 && (v[1] - 0.8).abs() < 1e-6);
        let mut zero = vec![0.0f32; 3];
        assert_eq!(l2_normalize(&mut zero), 0.0);
        assert_eq!(zero, vec![0.0; 3]);
        assert!((cosine(&[1.0, 0.0], &[2.0, 0.0]) - 1.0).abs() < 1e-6);
        assert_eq!(cosine(&[1.0, 0.0], &[0.0, 1.0]), 0.0);
        assert_eq!(cosine(&[1.0], &[1.0, 2.0]), 0.0);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 2.0]), 0.0);
    }
}

//! The confidence of an answer, in [0, 1], by one of two methods.
//!
//! **Token log-probabilities** (`logprobs`), when the server gives them: the geometric mean
//! of the answer tokens' probabilities,
//!
//! ```text
//! confidence = exp( (1/n) · Σᵢ ln p(tokenᵢ) )   over the n tokens of the answer
//! ```
//!
//! the inverse of the answer's perplexity (Jurafsky & Martin, *Speech and Language
//! Processing*, 3rd ed. draft, §3.3 "Evaluating Language Models: Perplexity"). It is 1 when
//! every token was certain and falls towards 0 as tokens were guessed; being a mean per token
//! it does not shrink with the answer's length. Log-probabilities above 0 (rounding on some
//! servers) count as 0; an answer without tokens, or with a non-finite log-probability, has
//! none.
//!
//! **Agreement** (`agreement`), when the server gives no log-probabilities: N answers are
//! drawn for the same request and compared as canonical JSON (object keys sorted, numbers
//! with an integral value written as integers); the confidence is the share of the N
//! samples equal to the modal (most frequent) answer, `count(modal) / N`. Samples that did
//! not parse or broke the output schema count in N but never agree. This is the
//! self-consistency vote of Wang et al., "Self-Consistency Improves Chain of Thought
//! Reasoning in Language Models" (ICLR 2023), used as a confidence as in Xiong et al., "Can
//! LLMs Express Their Uncertainty?" (ICLR 2024), §3 "consistency". Ties go to the earliest
//! sample, so the first answer wins a tie it is part of.

use serde_json::{Map, Number, Value};

/// The geometric mean of the tokens' probabilities, `exp(mean(logprobs))`, in [0, 1];
/// `None` without tokens or with a NaN or infinite log-probability.
pub fn from_logprobs(logprobs: &[f64]) -> Option<f64> {
    if logprobs.is_empty() || logprobs.iter().any(|value| !value.is_finite()) {
        return None;
    }
    let sum: f64 = logprobs.iter().map(|value| value.min(0.0)).sum();
    let mean = sum / logprobs.len() as f64;
    Some(mean.exp().clamp(0.0, 1.0))
}

/// The outcome of an agreement vote.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Agreement {
    /// The index of the modal answer's first occurrence among the samples.
    pub modal: usize,
    /// How many samples equal the modal answer.
    pub agreeing: usize,
    /// `agreeing / samples.len()`, in [0, 1].
    pub confidence: f64,
}

/// The vote over `samples` (a `None` is a sample without a usable answer); `None` when no
/// sample has an answer.
pub fn agreement(samples: &[Option<Value>]) -> Option<Agreement> {
    let keys: Vec<Option<String>> = samples
        .iter()
        .map(|sample| sample.as_ref().map(|value| canonical(value).to_string()))
        .collect();
    let mut best: Option<(usize, usize)> = None;
    for (index, key) in keys.iter().enumerate() {
        let Some(key) = key else { continue };
        if keys[..index]
            .iter()
            .any(|earlier| earlier.as_ref() == Some(key))
        {
            continue;
        }
        let count = keys
            .iter()
            .filter(|other| other.as_ref() == Some(key))
            .count();
        if best.is_none_or(|(_, best_count)| count > best_count) {
            best = Some((index, count));
        }
    }
    let (modal, agreeing) = best?;
    Some(Agreement {
        modal,
        agreeing,
        confidence: agreeing as f64 / samples.len() as f64,
    })
}

/// `value` with object keys sorted (recursively) and integral floats written as integers,
/// so equal answers compare equal whatever their key order or number spelling.
pub fn canonical(value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            let mut out = Map::new();
            for (key, child) in entries {
                out.insert(key.clone(), canonical(child));
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(items.iter().map(canonical).collect()),
        Value::Number(number) => match number.as_f64() {
            Some(float)
                if number.is_f64()
                    && float.fract() == 0.0
                    && float.abs() < 9.007_199_254_740_992e15 =>
            {
                // |float| < 2^53: exactly an integer.
                Value::Number(Number::from(float as i64))
            }
            _ => value.clone(),
        },
        _ => value.clone(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn logprob_confidence_is_the_geometric_mean_of_probabilities() {
        // p = 0.5 and 0.8: sqrt(0.4) = 0.632…
        let value = from_logprobs(&[0.5f64.ln(), 0.8f64.ln()]).unwrap();
        assert!((value - 0.4f64.sqrt()).abs() < 1e-12);
        assert_eq!(from_logprobs(&[0.0, 0.0]), Some(1.0));
        assert_eq!(from_logprobs(&[1e-9]), Some(1.0));
        assert_eq!(from_logprobs(&[]), None);
        assert_eq!(from_logprobs(&[f64::NAN]), None);
        assert_eq!(from_logprobs(&[f64::NEG_INFINITY]), None);
    }

    #[test]
    fn agreement_is_the_share_of_the_modal_answer() {
        let vote = agreement(&[
            Some(json!({"a": 1, "b": 2})),
            Some(json!({"b": 2.0, "a": 1})),
            Some(json!({"a": 2})),
        ])
        .unwrap();
        assert_eq!(vote.modal, 0);
        assert_eq!(vote.agreeing, 2);
        assert!((vote.confidence - 2.0 / 3.0).abs() < 1e-12);

        // The earliest wins a tie; unusable samples count in N.
        let vote = agreement(&[None, Some(json!("x")), Some(json!("y"))]).unwrap();
        assert_eq!(vote.modal, 1);
        assert!((vote.confidence - 1.0 / 3.0).abs() < 1e-12);

        // A later majority beats the first answer.
        let vote = agreement(&[Some(json!(1)), Some(json!(2)), Some(json!(2))]).unwrap();
        assert_eq!(vote.modal, 1);
        assert_eq!(agreement(&[None, None]), None);
    }
}

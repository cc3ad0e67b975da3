//! The BERT encoder's forward pass (Devlin et al. 2019, as Hugging Face `transformers`'
//! `BertModel` computes it in eval mode: no dropout), on candle's CPU backend in `f32`.
//!
//! Shapes: `B` texts in a batch, `L` tokens of the longest (the others padded), `H` the hidden
//! size (384 for MiniLM-L6), `A` attention heads (12), `D = H / A` (32), `I` the intermediate
//! size (1536). Hidden states are kept as a `[B·L, H]` matrix between layers, so every dense
//! layer is one matrix product.
//!
//! Two rewrites that change nothing but rounding: the query, key and value projections are
//! one `[H, 3H]` product, and the attention scale `1/√D` is folded into the query weights at
//! load time.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

/// The fields of a Hugging Face `config.json` that the forward pass needs.
#[derive(Clone, Debug, Deserialize)]
pub(crate) struct BertConfig {
    /// Rows of the word-embedding table.
    pub vocab_size: usize,
    /// `H`.
    pub hidden_size: usize,
    /// Encoder layers.
    pub num_hidden_layers: usize,
    /// `A`.
    pub num_attention_heads: usize,
    /// `I`.
    pub intermediate_size: usize,
    /// `gelu` (exact, with erf), or `gelu_new` / `gelu_pytorch_tanh` (tanh approximation).
    pub hidden_act: String,
    /// Rows of the position-embedding table: the longest input.
    pub max_position_embeddings: usize,
    /// Rows of the token-type table.
    pub type_vocab_size: usize,
    /// ε of every layer norm (1e-12 in BERT's configs).
    pub layer_norm_eps: f64,
    /// Only `absolute` is supported.
    #[serde(default)]
    pub position_embedding_type: Option<String>,
}

impl BertConfig {
    /// Problems making the configuration unusable here, as one message.
    pub(crate) fn check(&self) -> Result<(), String> {
        if self.hidden_size == 0
            || self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(format!(
                "hidden_size {} is not a positive multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.num_hidden_layers == 0 || self.intermediate_size == 0 || self.type_vocab_size == 0 {
            return Err(
                "num_hidden_layers, intermediate_size and type_vocab_size must be positive".into(),
            );
        }
        if !matches!(
            self.hidden_act.as_str(),
            "gelu" | "gelu_new" | "gelu_pytorch_tanh"
        ) {
            return Err(format!(
                "hidden_act {:?} is not supported (gelu, gelu_new, gelu_pytorch_tanh)",
                self.hidden_act
            ));
        }
        match self.position_embedding_type.as_deref() {
            None | Some("absolute") => Ok(()),
            Some(other) => Err(format!(
                "position_embedding_type {other:?} is not supported (absolute)"
            )),
        }
    }
}

/// The function applied after a dense layer's bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Activation {
    /// None: `y = x + b`.
    Identity,
    /// `gelu(x) = x·Φ(x) = x/2·(1 + erf(x/√2))`, Hugging Face's `gelu`.
    GeluErf,
    /// `x/2·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`, Hugging Face's `gelu_new`.
    GeluTanh,
}

/// `eˣ` for `x ≤ 0` as Cephes' `expf` computes it (range reduction `x = n·ln 2 + r`, a
/// degree-6 polynomial for `eʳ`, `2ⁿ` built in the exponent bits): relative error about
/// 2·10⁻⁷; arguments below −87 give about 2⁻¹²⁶. Written without calls or branches so that
/// loops over it vectorise (libm's `expf` is a call per element).
#[inline(always)]
fn exp_non_positive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 in two parts (Cody and Waite), so `x − n·ln 2` keeps its low bits.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2²³: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 0.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_2e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let e = p * r * r + r + 1.0;
    e * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// `erf(x)` by Abramowitz and Stegun, *Handbook of Mathematical Functions* (1964), formula
/// 7.1.26: absolute error at most 1.5·10⁻⁷, below `f32` rounding of the activations.
#[inline(always)]
fn erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_8,
        -1.453_152_1,
        1.061_405_4,
    ];
    let a = x.abs();
    let t = 1.0 / (1.0 + P * a);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    (1.0 - poly * exp_non_positive(-a * a)).copysign(x)
}

impl Activation {
    #[inline(always)]
    fn apply(self, x: f32) -> f32 {
        match self {
            Activation::Identity => x,
            Activation::GeluErf => 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2)),
            Activation::GeluTanh => {
                const SQRT_2_OVER_PI: f32 = 0.797_884_6;
                0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x)).tanh())
            }
        }
    }

    /// `out[i] = act(row[i] + bias[i])`; one loop per activation, so each vectorises.
    fn apply_row(self, out: &mut [f32], row: &[f32], bias: &[f32]) {
        let items = out.iter_mut().zip(row).zip(bias);
        match self {
            Activation::Identity => items.for_each(|((y, x), b)| *y = x + b),
            Activation::GeluErf => items.for_each(|((y, x), b)| {
                *y = Activation::GeluErf.apply(x + b);
            }),
            Activation::GeluTanh => items.for_each(|((y, x), b)| {
                *y = Activation::GeluTanh.apply(x + b);
            }),
        }
    }
}

/// Elements per rayon task of [`BiasActivation`]: 64 Ki (256 KiB of `f32`).
const CHUNK_ELEMENTS: usize = 64 * 1024;

/// `y = act(x + b)` over the rows of a contiguous `[N, out]` matrix, on rayon's pool: candle's
/// CPU element-wise ops run on one thread, and its `gelu_erf` evaluates erf in `f64`, which
/// took a large share of the forward pass (1,536 activations per token and layer).
struct BiasActivation<'a> {
    bias: &'a [f32],
    activation: Activation,
}

impl candle_core::CustomOp1 for BiasActivation<'_> {
    fn name(&self) -> &'static str {
        "bias-activation"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let candle_core::CpuStorage::F32(data) = storage else {
            candle_core::bail!("bias-activation: f32 input only")
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("bias-activation: contiguous input only")
        };
        let width = self.bias.len();
        let input = &data[start..end];
        if width == 0 || layout.dims().last() != Some(&width) {
            candle_core::bail!(
                "bias-activation: bias of {width} for a matrix of shape {:?}",
                layout.dims()
            )
        }
        let chunk = (CHUNK_ELEMENTS / width).max(1) * width;
        let mut out = vec![0f32; input.len()];
        out.par_chunks_mut(chunk)
            .zip(input.par_chunks(chunk))
            .for_each(|(out, input)| {
                for (out_row, row) in out.chunks_exact_mut(width).zip(input.chunks_exact(width)) {
                    self.activation.apply_row(out_row, row, self.bias);
                }
            });
        Ok((candle_core::CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// A dense layer `y = act(x·Wᵀ + b)` with `W` as stored (`[out, in]`).
struct Dense {
    weight: Tensor,
    bias: Vec<f32>,
}

impl Dense {
    fn load(
        vb: &VarBuilder,
        prefix: &str,
        out_dim: usize,
        in_dim: usize,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        Ok((
            vb.get((out_dim, in_dim), &format!("{prefix}.weight"))?,
            vb.get(out_dim, &format!("{prefix}.bias"))?,
        ))
    }

    fn new(weight: Tensor, bias: &Tensor) -> candle_core::Result<Self> {
        Ok(Self {
            weight,
            bias: bias.to_vec1::<f32>()?,
        })
    }

    /// `x`: `[N, in]` → `[N, out]`.
    fn forward(&self, x: &Tensor, activation: Activation) -> candle_core::Result<Tensor> {
        x.matmul(&self.weight.t()?)?
            .apply_op1_no_bwd(&BiasActivation {
                bias: &self.bias,
                activation,
            })
    }
}

/// A layer norm's scale and shift.
struct Norm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl Norm {
    fn load(vb: &VarBuilder, prefix: &str, dim: usize, eps: f64) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get(dim, &format!("{prefix}.weight"))?,
            bias: vb.get(dim, &format!("{prefix}.bias"))?,
            eps: eps as f32,
        })
    }

    /// Normalises the last dimension of a contiguous `x`.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::layer_norm(&x.contiguous()?, &self.weight, &self.bias, self.eps)
    }
}

/// One encoder layer.
struct Layer {
    /// Query (pre-scaled by `1/√D`), key and value projections side by side: `[3H, H]`.
    qkv: Dense,
    attention_out: Dense,
    attention_norm: Norm,
    intermediate: Dense,
    output: Dense,
    output_norm: Norm,
}

/// The BERT encoder with its weights.
pub(crate) struct Bert {
    word: Tensor,
    position: Tensor,
    /// The token-type-0 row (every input here is one segment): `[H]`.
    token_type: Tensor,
    embedding_norm: Norm,
    layers: Vec<Layer>,
    heads: usize,
    hidden: usize,
    activation: Activation,
    device: Device,
}

impl Bert {
    /// Loads the weights named as `BertModel` saves them (`embeddings.*`, `encoder.layer.N.*`,
    /// with or without a `bert.` prefix) from safetensors bytes.
    ///
    /// # Errors
    /// Corrupt safetensors, or a tensor missing or of the wrong shape (candle's message names
    /// it).
    pub(crate) fn load(bytes: Vec<u8>, config: &BertConfig) -> candle_core::Result<Self> {
        let device = Device::Cpu;
        let vb = VarBuilder::from_buffered_safetensors(bytes, DType::F32, &device)?;
        let vb = if vb.contains_tensor("embeddings.word_embeddings.weight") {
            vb
        } else {
            vb.pp("bert")
        };
        let (h, i) = (config.hidden_size, config.intermediate_size);
        let eps = config.layer_norm_eps;
        let word = vb.get((config.vocab_size, h), "embeddings.word_embeddings.weight")?;
        let position = vb.get(
            (config.max_position_embeddings, h),
            "embeddings.position_embeddings.weight",
        )?;
        let token_type = vb
            .get(
                (config.type_vocab_size, h),
                "embeddings.token_type_embeddings.weight",
            )?
            .get(0)?;
        let embedding_norm = Norm::load(&vb, "embeddings.LayerNorm", h, eps)?;
        let scale = 1.0 / ((h / config.num_attention_heads) as f64).sqrt();
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for n in 0..config.num_hidden_layers {
            let p = format!("encoder.layer.{n}");
            let (qw, qb) = Dense::load(&vb, &format!("{p}.attention.self.query"), h, h)?;
            let (kw, kb) = Dense::load(&vb, &format!("{p}.attention.self.key"), h, h)?;
            let (vw, vbias) = Dense::load(&vb, &format!("{p}.attention.self.value"), h, h)?;
            let qkv = Dense::new(
                Tensor::cat(&[&qw.affine(scale, 0.0)?, &kw, &vw], 0)?,
                &Tensor::cat(&[&qb.affine(scale, 0.0)?, &kb, &vbias], 0)?,
            )?;
            let dense = |name: &str, out_dim: usize, in_dim: usize| {
                let (weight, bias) = Dense::load(&vb, &format!("{p}.{name}"), out_dim, in_dim)?;
                Dense::new(weight, &bias)
            };
            layers.push(Layer {
                qkv,
                attention_out: dense("attention.output.dense", h, h)?,
                attention_norm: Norm::load(
                    &vb,
                    &format!("{p}.attention.output.LayerNorm"),
                    h,
                    eps,
                )?,
                intermediate: dense("intermediate.dense", i, h)?,
                output: dense("output.dense", h, i)?,
                output_norm: Norm::load(&vb, &format!("{p}.output.LayerNorm"), h, eps)?,
            });
        }
        Ok(Self {
            word,
            position,
            token_type,
            embedding_norm,
            layers,
            heads: config.num_attention_heads,
            hidden: h,
            activation: if config.hidden_act == "gelu" {
                Activation::GeluErf
            } else {
                Activation::GeluTanh
            },
            device,
        })
    }

    /// The last hidden states of a padded batch.
    ///
    /// `ids`: `B·L` token ids, row-major (`L` per text, padding ids anywhere masked out);
    /// `mask`: `B·L` ones for real tokens and zeros for padding. Returns `[B, L, H]`.
    ///
    /// # Errors
    /// A token id outside the vocabulary, `L` over the position table, or a candle failure.
    pub(crate) fn forward(
        &self,
        ids: Vec<u32>,
        mask: &[f32],
        batch: usize,
        len: usize,
    ) -> candle_core::Result<Tensor> {
        let (h, heads) = (self.hidden, self.heads);
        let d = h / heads;
        let ids = Tensor::from_vec(ids, batch * len, &self.device)?;
        let positions = self.position.narrow(0, 0, len)?;
        let x = self
            .word
            .index_select(&ids, 0)?
            .reshape((batch, len, h))?
            .broadcast_add(&positions)?
            .broadcast_add(&self.token_type)?;
        let mut x = self.embedding_norm.forward(&x.reshape((batch * len, h))?)?;
        // 0 where attended, the most negative f32 at padding: softmax gives padding weight 0.
        let bias: Vec<f32> = mask
            .iter()
            .map(|m| if *m > 0.0 { 0.0 } else { f32::MIN })
            .collect();
        let bias = Tensor::from_vec(bias, (batch, 1, 1, len), &self.device)?;
        for layer in &self.layers {
            let qkv = layer
                .qkv
                .forward(&x, Activation::Identity)?
                .reshape((batch, len, 3, heads, d))?
                .permute((2, 0, 3, 1, 4))?; // [3, B, A, L, D]
            let q = qkv.get(0)?.contiguous()?;
            let k = qkv.get(1)?.contiguous()?;
            let v = qkv.get(2)?.contiguous()?;
            let scores = q.matmul(&k.t()?)?.broadcast_add(&bias)?; // [B, A, L, L]
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let context = probs
                .matmul(&v)? // [B, A, L, D]
                .transpose(1, 2)?
                .reshape((batch * len, h))?;
            let attended = layer
                .attention_out
                .forward(&context, Activation::Identity)?;
            x = layer.attention_norm.forward(&(attended + &x)?)?;
            let inner = layer.intermediate.forward(&x, self.activation)?;
            let out = layer.output.forward(&inner, Activation::Identity)?;
            x = layer.output_norm.forward(&(out + &x)?)?;
        }
        x.reshape((batch, len, h))
    }

    /// Mean of the hidden states over the attended tokens, as sentence-transformers' `Pooling`
    /// with `pooling_mode_mean_tokens` computes it: `Σ mask·h / max(Σ mask, 1e-9)`.
    /// `hidden`: `[B, L, H]`, `mask` as for [`Bert::forward`]. Returns `B` vectors of `H`.
    pub(crate) fn mean_pool(
        &self,
        hidden: &Tensor,
        mask: Vec<f32>,
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        let (batch, len, _) = hidden.dims3()?;
        let mask = Tensor::from_vec(mask, (batch, len, 1), &self.device)?;
        let summed = hidden.broadcast_mul(&mask)?.sum(1)?; // [B, H]
        let counts = mask.sum(1)?.clamp(1e-9, f64::MAX)?; // [B, 1]
        summed.broadcast_div(&counts)?.to_vec2::<f32>()
    }
}

/// Reads a JSON file of the model directory.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, String> {
    let text = std::fs::read_to_string(path).map_err(|error| error.to_string())?;
    serde_json::from_str(&text).map_err(|error| format!("not the expected JSON: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> BertConfig {
        BertConfig {
            vocab_size: 10,
            hidden_size: 8,
            num_hidden_layers: 1,
            num_attention_heads: 2,
            intermediate_size: 16,
            hidden_act: "gelu".into(),
            max_position_embeddings: 16,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            position_embedding_type: None,
        }
    }

    #[test]
    fn the_fast_exponential_is_accurate() {
        let mut x = -90.0f32;
        while x <= 0.0 {
            let (fast, exact) = (exp_non_positive(x), x.exp());
            assert!(
                (fast - exact).abs() <= 3e-7 * exact + 1e-37,
                "exp({x}) = {fast}, not {exact}"
            );
            x += 0.0137;
        }
        assert_eq!(exp_non_positive(0.0), 1.0);
    }

    #[test]
    fn the_activations_match_their_definitions() {
        // erf against values of Abramowitz and Stegun's table 7.1.
        for (x, expected) in [
            (0.0, 0.0),
            (0.5, 0.520_499_9),
            (1.0, 0.842_700_8),
            (2.0, 0.995_322_3),
        ] {
            assert!((erf(x) - expected).abs() < 2e-7, "erf({x}) = {}", erf(x));
            assert!((erf(-x) + expected).abs() < 2e-7);
        }
        assert!((Activation::GeluErf.apply(1.0) - 0.841_344_7).abs() < 1e-6);
        assert!((Activation::GeluTanh.apply(1.0) - 0.841_192).abs() < 1e-5);
        assert_eq!(Activation::Identity.apply(-3.5), -3.5);
        let x = Tensor::new(&[[1.0f32, -1.0], [0.5, 2.0]], &Device::Cpu).unwrap();
        let y = x
            .apply_op1_no_bwd(&BiasActivation {
                bias: &[1.0, 0.0],
                activation: Activation::Identity,
            })
            .unwrap();
        assert_eq!(
            y.to_vec2::<f32>().unwrap(),
            vec![vec![2.0, -1.0], vec![1.5, 2.0]]
        );
    }

    #[test]
    fn configs_are_checked() {
        assert!(config().check().is_ok());
        let mut bad = config();
        bad.num_attention_heads = 3;
        assert!(bad.check().unwrap_err().contains("multiple"));
        let mut bad = config();
        bad.hidden_act = "relu".into();
        assert!(bad.check().unwrap_err().contains("relu"));
        let mut bad = config();
        bad.position_embedding_type = Some("relative_key".into());
        assert!(bad.check().is_err());
    }

    #[test]
    fn padding_does_not_change_the_pooled_vector() {
        // Random-ish weights for a tiny model, then one text alone and padded in a batch.
        let config = config();
        let mut tensors = std::collections::HashMap::new();
        let mut seed = 7u64;
        let mut fill = |shape: &[usize]| {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = (0..n)
                .map(|_| {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
                })
                .collect();
            Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
        };
        let (h, i) = (8, 16);
        tensors.insert(
            "embeddings.word_embeddings.weight".to_owned(),
            fill(&[10, h]),
        );
        tensors.insert(
            "embeddings.position_embeddings.weight".to_owned(),
            fill(&[16, h]),
        );
        tensors.insert(
            "embeddings.token_type_embeddings.weight".to_owned(),
            fill(&[2, h]),
        );
        for (name, dim) in [
            ("embeddings.LayerNorm", h),
            ("encoder.layer.0.attention.output.LayerNorm", h),
            ("encoder.layer.0.output.LayerNorm", h),
        ] {
            tensors.insert(format!("{name}.weight"), fill(&[dim]));
            tensors.insert(format!("{name}.bias"), fill(&[dim]));
        }
        for (name, out, inp) in [
            ("attention.self.query", h, h),
            ("attention.self.key", h, h),
            ("attention.self.value", h, h),
            ("attention.output.dense", h, h),
            ("intermediate.dense", i, h),
            ("output.dense", h, i),
        ] {
            tensors.insert(format!("encoder.layer.0.{name}.weight"), fill(&[out, inp]));
            tensors.insert(format!("encoder.layer.0.{name}.bias"), fill(&[out]));
        }
        let path = tempfile::NamedTempFile::new().unwrap();
        candle_core::safetensors::save(&tensors, path.path()).unwrap();
        let bert = Bert::load(std::fs::read(path.path()).unwrap(), &config).unwrap();

        let alone = bert.forward(vec![1, 4, 5, 2], &[1.0; 4], 1, 4).unwrap();
        let alone = bert.mean_pool(&alone, vec![1.0; 4]).unwrap();
        let mask = vec![1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0];
        let ids = vec![1, 4, 5, 2, 0, 0, 1, 3, 3, 3, 3, 2];
        let batch = bert.forward(ids, &mask, 2, 6).unwrap();
        let batch = bert.mean_pool(&batch, mask).unwrap();
        for (a, b) in alone[0].iter().zip(&batch[0]) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        assert!(
            bert.forward(vec![11], &[1.0], 1, 1).is_err(),
            "id outside the vocabulary"
        );
    }
}

//! The BERT encoder's forward pass (Devlin et al. 2019, as Hugging Face `transformers`'
//! `BertModel` computes it in eval mode: no dropout) in `f32`, on plain slices: matrix
//! products by `faer` (its AVX-512/AVX2 kernels chosen at run time), the rest by loops of our
//! own compiled for AVX2+FMA when the CPU has it (`pulp`'s run-time dispatch).
//!
//! Shapes: `H` the hidden size (384 for MiniLM-L6), `A` attention heads (12), `D = H / A`
//! (32), `I` the intermediate size (1536). A pass takes several texts **packed without
//! padding**: their `T = Σ lᵢ` tokens are the rows of one `[T, H]` matrix, so every dense
//! layer is one matrix product over real tokens only, and attention runs per text over its
//! own `lᵢ` rows (no mask needed). This is the "remove padding" layout of NVIDIA's
//! FasterTransformer / ByteDance's "effective transformer"; it gives the same numbers as a
//! padded, masked batch up to rounding, since a masked position gets weight exactly 0.
//!
//! Two more rewrites that change nothing but rounding: the query, key and value projections
//! are one `[H, 3H]` product, and the attention scale `1/√D` is folded into the query
//! weights at load time.
//!
//! This module never allocates per element, never panics on model input (token ids and
//! lengths are checked first), and does no I/O.

use std::path::Path;

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;
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

    /// `row[i] = act(row[i] + bias[i])` over the rows of a `[N, bias.len()]` matrix; one loop
    /// per activation, each compiled for the best instruction set the CPU has.
    fn apply_rows(self, rows: &mut [f32], bias: &[f32]) {
        pulp::Arch::new().dispatch(
            #[inline(always)]
            || {
                for row in rows.chunks_exact_mut(bias.len()) {
                    let items = row.iter_mut().zip(bias);
                    match self {
                        Activation::Identity => items.for_each(|(y, b)| *y += b),
                        Activation::GeluErf => items.for_each(|(y, b)| {
                            *y = Activation::GeluErf.apply(*y + b);
                        }),
                        Activation::GeluTanh => items.for_each(|(y, b)| {
                            *y = Activation::GeluTanh.apply(*y + b);
                        }),
                    }
                }
            },
        )
    }
}

/// `row = softmax(row)` for each row of `rows` (`width` wide), max-subtracted (so every
/// exponent is ≤ 0 and [`exp_non_positive`] applies).
fn softmax_rows(rows: &mut [f32], width: usize) {
    pulp::Arch::new().dispatch(
        #[inline(always)]
        || {
            for row in rows.chunks_exact_mut(width) {
                let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                let mut sum = 0.0;
                for x in row.iter_mut() {
                    *x = exp_non_positive(*x - max);
                    sum += *x;
                }
                let scale = 1.0 / sum;
                row.iter_mut().for_each(|x| *x *= scale);
            }
        },
    )
}

/// `Σ f(xᵢ)` in 16 interleaved partial sums, so that the loop vectorises (a plain `f32` sum
/// must be added in order, one element at a time); rounding differs from the ordered sum only
/// in the last bits.
#[inline(always)]
fn lane_sum(xs: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    const LANES: usize = 16;
    let mut lanes = [0.0f32; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            *lane += f(x);
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|&x| f(x)).sum();
    lanes.iter().sum::<f32>() + tail
}

/// Rows per rayon task of the element-wise kernels when a pass runs on several threads:
/// 64 rows of 384–1,536 `f32` (96–384 KiB).
const ROWS_PER_TASK: usize = 64;

/// How a pass uses the threads: alone on the calling thread (other threads run other
/// passes), or spread over rayon's pool (one pass at a time).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Threads {
    /// Everything on the calling thread.
    One,
    /// Matrix products, attention and element-wise kernels on rayon's pool.
    Pool,
}

impl Threads {
    fn par(self) -> Par {
        match self {
            Threads::One => Par::Seq,
            Threads::Pool => Par::rayon(0),
        }
    }

    /// `f` on each run of whole rows of `data` (`width` wide).
    fn for_rows(self, data: &mut [f32], width: usize, f: impl Fn(&mut [f32]) + Sync + Send) {
        match self {
            Threads::One => f(data),
            Threads::Pool => data.par_chunks_mut(ROWS_PER_TASK * width).for_each(f),
        }
    }
}

/// A dense layer `y = act(x·Wᵀ + b)` with `W` as stored (`[out, in]`, row-major).
struct Dense {
    weight: Vec<f32>,
    bias: Vec<f32>,
    in_dim: usize,
    out_dim: usize,
}

impl Dense {
    /// `x`: `[N, in]` → `out`: `[N, out]` (overwritten).
    fn forward(&self, x: &[f32], out: &mut [f32], activation: Activation, threads: Threads) {
        let rows = x.len() / self.in_dim;
        debug_assert_eq!(x.len(), rows * self.in_dim);
        debug_assert_eq!(out.len(), rows * self.out_dim);
        matmul(
            MatMut::from_row_major_slice_mut(out, rows, self.out_dim),
            Accum::Replace,
            MatRef::from_row_major_slice(x, rows, self.in_dim),
            MatRef::from_row_major_slice(&self.weight, self.out_dim, self.in_dim).transpose(),
            1.0f32,
            threads.par(),
        );
        threads.for_rows(out, self.out_dim, |rows| {
            activation.apply_rows(rows, &self.bias)
        });
    }
}

/// A layer norm's scale and shift (Ba, Kiros and Hinton 2016), over the last dimension.
struct Norm {
    weight: Vec<f32>,
    bias: Vec<f32>,
    eps: f32,
}

impl Norm {
    /// `x = norm(x + residual)` row by row (`residual` may be empty: no residual).
    fn forward(&self, x: &mut [f32], residual: &[f32], threads: Threads) {
        let width = self.weight.len();
        let apply = |rows: &mut [f32], residual: &[f32]| {
            pulp::Arch::new().dispatch(
                #[inline(always)]
                || {
                    for (n, row) in rows.chunks_exact_mut(width).enumerate() {
                        if !residual.is_empty() {
                            let add = &residual[n * width..(n + 1) * width];
                            row.iter_mut().zip(add).for_each(|(x, r)| *x += r);
                        }
                        let mean = lane_sum(row, |x| x) / width as f32;
                        let variance = lane_sum(row, |x| (x - mean) * (x - mean)) / width as f32;
                        let scale = 1.0 / (variance + self.eps).sqrt();
                        for ((x, w), b) in row.iter_mut().zip(&self.weight).zip(&self.bias) {
                            *x = (*x - mean) * scale * w + b;
                        }
                    }
                },
            )
        };
        match threads {
            Threads::One => apply(x, residual),
            Threads::Pool => {
                let chunk = ROWS_PER_TASK * width;
                if residual.is_empty() {
                    x.par_chunks_mut(chunk).for_each(|rows| apply(rows, &[]));
                } else {
                    x.par_chunks_mut(chunk)
                        .zip(residual.par_chunks(chunk))
                        .for_each(|(rows, residual)| apply(rows, residual));
                }
            }
        }
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
    /// `[vocab, H]`.
    word: Vec<f32>,
    /// `[max_position_embeddings, H]`.
    position: Vec<f32>,
    /// The token-type-0 row (every input here is one segment): `[H]`.
    token_type: Vec<f32>,
    embedding_norm: Norm,
    layers: Vec<Layer>,
    heads: usize,
    hidden: usize,
    intermediate: usize,
    vocab: usize,
    max_positions: usize,
    activation: Activation,
}

/// The weights file, parsed (the bytes stay where they were read).
struct Weights<'a> {
    tensors: safetensors::SafeTensors<'a>,
    /// `""` or `"bert."`: `BertModel` saves names without a prefix, `BertFor…` models with.
    prefix: &'static str,
}

impl Weights<'_> {
    /// The `f32` values of tensor `name` (little-endian `F32` in the file), which must have
    /// `shape`.
    fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, String> {
        let full = format!("{}{name}", self.prefix);
        let view = self
            .tensors
            .tensor(&full)
            .map_err(|error| format!("tensor {full}: {error}"))?;
        if view.shape() != shape {
            return Err(format!(
                "tensor {full} has shape {:?}, expected {shape:?}",
                view.shape()
            ));
        }
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(format!(
                "tensor {full} is {:?}; only F32 weights are supported",
                view.dtype()
            ));
        }
        Ok(view
            .data()
            .chunks_exact(4)
            .map(|bytes| f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
            .collect())
    }

    fn dense(&self, name: &str, out_dim: usize, in_dim: usize) -> Result<Dense, String> {
        Ok(Dense {
            weight: self.get(&format!("{name}.weight"), &[out_dim, in_dim])?,
            bias: self.get(&format!("{name}.bias"), &[out_dim])?,
            in_dim,
            out_dim,
        })
    }

    fn norm(&self, name: &str, dim: usize, eps: f64) -> Result<Norm, String> {
        Ok(Norm {
            weight: self.get(&format!("{name}.weight"), &[dim])?,
            bias: self.get(&format!("{name}.bias"), &[dim])?,
            eps: eps as f32,
        })
    }
}

/// A pass's buffers, sized for its `T` tokens.
struct Buffers {
    /// Hidden states `[T, H]`.
    x: Vec<f32>,
    /// `[T, 3H]`.
    qkv: Vec<f32>,
    /// Attention context, then the attention output: `[T, H]`.
    context: Vec<f32>,
    /// `[T, H]`.
    projected: Vec<f32>,
    /// `[T, I]`.
    inner: Vec<f32>,
}

impl Bert {
    /// Loads the weights named as `BertModel` saves them (`embeddings.*`, `encoder.layer.N.*`,
    /// with or without a `bert.` prefix) from safetensors bytes.
    ///
    /// # Errors
    /// Corrupt safetensors, or a tensor missing, of the wrong shape or not `F32` (the message
    /// names it).
    pub(crate) fn load(bytes: &[u8], config: &BertConfig) -> Result<Self, String> {
        let tensors = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|error| format!("not a safetensors file: {error}"))?;
        let prefix = if tensors.tensor("embeddings.word_embeddings.weight").is_ok() {
            ""
        } else {
            "bert."
        };
        let weights = Weights { tensors, prefix };
        let (h, i) = (config.hidden_size, config.intermediate_size);
        let eps = config.layer_norm_eps;
        let word = weights.get("embeddings.word_embeddings.weight", &[config.vocab_size, h])?;
        let position = weights.get(
            "embeddings.position_embeddings.weight",
            &[config.max_position_embeddings, h],
        )?;
        let mut token_type = weights.get(
            "embeddings.token_type_embeddings.weight",
            &[config.type_vocab_size, h],
        )?;
        token_type.truncate(h);
        let embedding_norm = weights.norm("embeddings.LayerNorm", h, eps)?;
        let scale = 1.0 / ((h / config.num_attention_heads) as f32).sqrt();
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for n in 0..config.num_hidden_layers {
            let p = format!("encoder.layer.{n}");
            let query = weights.dense(&format!("{p}.attention.self.query"), h, h)?;
            let key = weights.dense(&format!("{p}.attention.self.key"), h, h)?;
            let value = weights.dense(&format!("{p}.attention.self.value"), h, h)?;
            let mut weight = Vec::with_capacity(3 * h * h);
            weight.extend(query.weight.iter().map(|w| w * scale));
            weight.extend_from_slice(&key.weight);
            weight.extend_from_slice(&value.weight);
            let mut bias = Vec::with_capacity(3 * h);
            bias.extend(query.bias.iter().map(|b| b * scale));
            bias.extend_from_slice(&key.bias);
            bias.extend_from_slice(&value.bias);
            layers.push(Layer {
                qkv: Dense {
                    weight,
                    bias,
                    in_dim: h,
                    out_dim: 3 * h,
                },
                attention_out: weights.dense(&format!("{p}.attention.output.dense"), h, h)?,
                attention_norm: weights.norm(&format!("{p}.attention.output.LayerNorm"), h, eps)?,
                intermediate: weights.dense(&format!("{p}.intermediate.dense"), i, h)?,
                output: weights.dense(&format!("{p}.output.dense"), h, i)?,
                output_norm: weights.norm(&format!("{p}.output.LayerNorm"), h, eps)?,
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
            intermediate: i,
            vocab: config.vocab_size,
            max_positions: config.max_position_embeddings,
            activation: if config.hidden_act == "gelu" {
                Activation::GeluErf
            } else {
                Activation::GeluTanh
            },
        })
    }

    /// The mean-pooled last hidden states of `texts` (token ids each, `[CLS] … [SEP]`), one
    /// vector of `H` per text in order: the mean over a text's tokens, as
    /// sentence-transformers' `Pooling` with `pooling_mode_mean_tokens` computes it (over the
    /// attended tokens, which here are all of them). Not normalised.
    ///
    /// # Errors
    /// An empty text, a token id outside the vocabulary or a text longer than the position
    /// table.
    pub(crate) fn embed_pass(
        &self,
        texts: &[&[u32]],
        threads: Threads,
    ) -> Result<Vec<Vec<f32>>, String> {
        let h = self.hidden;
        for (n, ids) in texts.iter().enumerate() {
            if ids.is_empty() || ids.len() > self.max_positions {
                return Err(format!(
                    "text {n} of the pass has {} tokens, not between 1 and {}",
                    ids.len(),
                    self.max_positions
                ));
            }
            if let Some(id) = ids.iter().find(|&&id| id as usize >= self.vocab) {
                return Err(format!(
                    "token id {id} is outside the vocabulary of {}",
                    self.vocab
                ));
            }
        }
        let lengths: Vec<usize> = texts.iter().map(|ids| ids.len()).collect();
        let total: usize = lengths.iter().sum();
        let mut buffers = Buffers {
            x: Vec::with_capacity(total * h),
            qkv: vec![0.0; total * 3 * h],
            context: vec![0.0; total * h],
            projected: vec![0.0; total * h],
            inner: vec![0.0; total * self.intermediate],
        };
        for ids in texts {
            for (position, &id) in ids.iter().enumerate() {
                let word = &self.word[id as usize * h..][..h];
                let place = &self.position[position * h..][..h];
                buffers.x.extend(
                    word.iter()
                        .zip(place)
                        .zip(&self.token_type)
                        .map(|((w, p), t)| w + p + t),
                );
            }
        }
        self.embedding_norm.forward(&mut buffers.x, &[], threads);
        for layer in &self.layers {
            self.layer(layer, &lengths, &mut buffers, threads);
        }
        let mut pooled = Vec::with_capacity(texts.len());
        let mut start = 0;
        for &len in &lengths {
            let mut sum = vec![0.0f32; h];
            for row in buffers.x[start * h..(start + len) * h].chunks_exact(h) {
                sum.iter_mut().zip(row).for_each(|(s, x)| *s += x);
            }
            let scale = 1.0 / len as f32;
            sum.iter_mut().for_each(|s| *s *= scale);
            pooled.push(sum);
            start += len;
        }
        Ok(pooled)
    }

    /// One encoder layer over the packed hidden states in `buffers.x`.
    fn layer(&self, layer: &Layer, lengths: &[usize], buffers: &mut Buffers, threads: Threads) {
        layer
            .qkv
            .forward(&buffers.x, &mut buffers.qkv, Activation::Identity, threads);
        self.attention(&buffers.qkv, &mut buffers.context, lengths, threads);
        layer.attention_out.forward(
            &buffers.context,
            &mut buffers.projected,
            Activation::Identity,
            threads,
        );
        // x = norm(projected + x), written into `projected`, which then becomes `x`.
        layer
            .attention_norm
            .forward(&mut buffers.projected, &buffers.x, threads);
        std::mem::swap(&mut buffers.x, &mut buffers.projected);
        layer
            .intermediate
            .forward(&buffers.x, &mut buffers.inner, self.activation, threads);
        layer.output.forward(
            &buffers.inner,
            &mut buffers.projected,
            Activation::Identity,
            threads,
        );
        layer
            .output_norm
            .forward(&mut buffers.projected, &buffers.x, threads);
        std::mem::swap(&mut buffers.x, &mut buffers.projected);
    }

    /// Scaled dot-product attention (Vaswani et al. 2017), each text over its own tokens:
    /// `context = softmax(Q·Kᵀ)·V` per head (the `1/√D` is in `Q` already). `qkv`: `[T, 3H]`
    /// (queries, keys, values side by side, head-major within each); `context`: `[T, H]`.
    fn attention(&self, qkv: &[f32], context: &mut [f32], lengths: &[usize], threads: Threads) {
        let h = self.hidden;
        // Each text's rows of `context`, with its first row's index.
        let mut jobs = Vec::with_capacity(lengths.len());
        let mut rest = context;
        let mut start = 0;
        for &len in lengths {
            let (rows, tail) = rest.split_at_mut(len * h);
            jobs.push((start, len, rows));
            rest = tail;
            start += len;
        }
        let run = |(start, len, rows): &mut (usize, usize, &mut [f32])| {
            self.attend_one(&qkv[*start * 3 * h..(*start + *len) * 3 * h], rows, *len)
        };
        match threads {
            Threads::One => jobs.iter_mut().for_each(run),
            Threads::Pool => jobs.par_iter_mut().for_each(run),
        }
    }

    /// Attention over one text of `len` tokens: `qkv` `[len, 3H]` → `context` `[len, H]`.
    fn attend_one(&self, qkv: &[f32], context: &mut [f32], len: usize) {
        let h = self.hidden;
        let d = h / self.heads;
        let mut scores = vec![0.0f32; len * len];
        // One head's context, contiguous: faer 0.24's x86 kernel wrote 8 bytes past the end
        // of a row-strided destination (found by valgrind), so the product goes here and is
        // copied into its columns of `context`.
        let mut head_context = vec![0.0f32; len * d];
        for head in 0..self.heads {
            let view = |offset: usize| {
                MatRef::from_row_major_slice_with_stride(&qkv[offset + head * d..], len, d, 3 * h)
            };
            let (query, key, value) = (view(0), view(h), view(2 * h));
            matmul(
                MatMut::from_row_major_slice_mut(&mut scores, len, len),
                Accum::Replace,
                query,
                key.transpose(),
                1.0f32,
                Par::Seq,
            );
            softmax_rows(&mut scores, len);
            matmul(
                MatMut::from_row_major_slice_mut(&mut head_context, len, d),
                Accum::Replace,
                MatRef::from_row_major_slice(&scores, len, len),
                value,
                1.0f32,
                Par::Seq,
            );
            for (row, part) in context
                .chunks_exact_mut(h)
                .zip(head_context.chunks_exact(d))
            {
                row[head * d..(head + 1) * d].copy_from_slice(part);
            }
        }
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
        let mut x = vec![1.0f32, -1.0, 0.5, 2.0];
        Activation::Identity.apply_rows(&mut x, &[1.0, 0.0]);
        assert_eq!(x, vec![2.0, -1.0, 1.5, 2.0]);
        let mut x = vec![0.0f32, 1.0];
        Activation::GeluErf.apply_rows(&mut x, &[1.0, 0.0]);
        assert!((x[0] - 0.841_344_7).abs() < 1e-6 && (x[1] - 0.841_344_7).abs() < 1e-6);
    }

    #[test]
    fn softmax_rows_sum_to_one() {
        let mut rows = vec![1.0f32, 2.0, 3.0, -100.0, 0.0, 100.0];
        softmax_rows(&mut rows, 3);
        let e = [1.0f32.exp(), 2.0f32.exp(), 3.0f32.exp()];
        let sum: f32 = e.iter().sum();
        for (got, want) in rows[..3].iter().zip(e.iter().map(|x| x / sum)) {
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
        assert!((rows[5] - 1.0).abs() < 1e-6 && rows[3] < 1e-30);
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

    /// Safetensors bytes of a tiny random BERT of [`config`].
    fn tiny_model() -> Vec<u8> {
        let (h, i) = (8, 16);
        let mut seed = 7u64;
        let mut fill = |n: usize| -> Vec<u8> {
            (0..n)
                .flat_map(|_| {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (((seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5).to_le_bytes()
                })
                .collect()
        };
        let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        let mut add = |name: String, shape: Vec<usize>| {
            let data = fill(shape.iter().product());
            tensors.push((name, shape, data));
        };
        add("embeddings.word_embeddings.weight".into(), vec![10, h]);
        add("embeddings.position_embeddings.weight".into(), vec![16, h]);
        add("embeddings.token_type_embeddings.weight".into(), vec![2, h]);
        for name in [
            "embeddings.LayerNorm",
            "encoder.layer.0.attention.output.LayerNorm",
            "encoder.layer.0.output.LayerNorm",
        ] {
            add(format!("{name}.weight"), vec![h]);
            add(format!("{name}.bias"), vec![h]);
        }
        for (name, out, inp) in [
            ("attention.self.query", h, h),
            ("attention.self.key", h, h),
            ("attention.self.value", h, h),
            ("attention.output.dense", h, h),
            ("intermediate.dense", i, h),
            ("output.dense", h, i),
        ] {
            add(format!("encoder.layer.0.{name}.weight"), vec![out, inp]);
            add(format!("encoder.layer.0.{name}.bias"), vec![out]);
        }
        let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
            .iter()
            .map(|(name, shape, data)| {
                let view = safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    shape.clone(),
                    data,
                )
                .unwrap();
                (name.clone(), view)
            })
            .collect();
        safetensors::serialize(views, None).unwrap()
    }

    /// The same forward pass written out plainly, one text at a time with no packing or
    /// fusing, for comparison.
    fn reference_pool(bytes: &[u8], config: &BertConfig, ids: &[u32]) -> Vec<f32> {
        let tensors = safetensors::SafeTensors::deserialize(bytes).unwrap();
        let weights = Weights {
            tensors,
            prefix: "",
        };
        let get = |name: &str, shape: &[usize]| weights.get(name, shape).unwrap();
        let (h, i, heads) = (8usize, 16usize, 2usize);
        let d = h / heads;
        let norm = |x: &mut Vec<f32>, name: &str| {
            let (w, b) = (
                get(&format!("{name}.weight"), &[h]),
                get(&format!("{name}.bias"), &[h]),
            );
            for row in x.chunks_exact_mut(h) {
                let mean = row.iter().sum::<f32>() / h as f32;
                let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / h as f32;
                for k in 0..h {
                    row[k] =
                        (row[k] - mean) / (var + config.layer_norm_eps as f32).sqrt() * w[k] + b[k];
                }
            }
        };
        let dense = |x: &[f32], name: &str, out: usize, inp: usize| -> Vec<f32> {
            let (w, b) = (
                get(&format!("{name}.weight"), &[out, inp]),
                get(&format!("{name}.bias"), &[out]),
            );
            x.chunks_exact(inp)
                .flat_map(|row| {
                    (0..out)
                        .map(|o| b[o] + (0..inp).map(|k| row[k] * w[o * inp + k]).sum::<f32>())
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        let (word, pos, tt) = (
            get("embeddings.word_embeddings.weight", &[10, h]),
            get("embeddings.position_embeddings.weight", &[16, h]),
            get("embeddings.token_type_embeddings.weight", &[2, h]),
        );
        let len = ids.len();
        let mut x: Vec<f32> = ids
            .iter()
            .enumerate()
            .flat_map(|(p, &id)| (0..h).map(move |k| (p, id, k)))
            .map(|(p, id, k)| word[id as usize * h + k] + pos[p * h + k] + tt[k])
            .collect();
        norm(&mut x, "embeddings.LayerNorm");
        let p = "encoder.layer.0";
        let q = dense(&x, &format!("{p}.attention.self.query"), h, h);
        let k = dense(&x, &format!("{p}.attention.self.key"), h, h);
        let v = dense(&x, &format!("{p}.attention.self.value"), h, h);
        let mut context = vec![0.0f32; len * h];
        for a in 0..heads {
            for r in 0..len {
                let scores: Vec<f32> = (0..len)
                    .map(|c| {
                        (0..d)
                            .map(|j| q[r * h + a * d + j] * k[c * h + a * d + j])
                            .sum::<f32>()
                            / (d as f32).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f32::MIN, f32::max);
                let e: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f32 = e.iter().sum();
                for j in 0..d {
                    context[r * h + a * d + j] =
                        (0..len).map(|c| e[c] / sum * v[c * h + a * d + j]).sum();
                }
            }
        }
        let mut y = dense(&context, &format!("{p}.attention.output.dense"), h, h);
        y.iter_mut().zip(&x).for_each(|(y, x)| *y += x);
        norm(&mut y, &format!("{p}.attention.output.LayerNorm"));
        let inner: Vec<f32> = dense(&y, &format!("{p}.intermediate.dense"), i, h)
            .into_iter()
            .map(|u| 0.5 * u * (1.0 + erf_exact(u / 2f32.sqrt())))
            .collect();
        let mut out = dense(&inner, &format!("{p}.output.dense"), h, i);
        out.iter_mut().zip(&y).for_each(|(o, y)| *o += y);
        norm(&mut out, &format!("{p}.output.LayerNorm"));
        (0..h)
            .map(|k| out.chunks_exact(h).map(|row| row[k]).sum::<f32>() / len as f32)
            .collect()
    }

    /// erf by its Maclaurin series in `f64` (enough terms for |x| ≤ 6).
    fn erf_exact(x: f32) -> f32 {
        let x = f64::from(x).clamp(-6.0, 6.0);
        let (mut term, mut sum, mut n) = (x, x, 0.0);
        while term.abs() > 1e-17 * sum.abs().max(1e-300) && n < 400.0 {
            n += 1.0;
            term *= -x * x / n;
            sum += term / (2.0 * n + 1.0);
        }
        (sum * 2.0 / std::f64::consts::PI.sqrt()) as f32
    }

    #[test]
    fn the_packed_pass_matches_a_plain_forward_pass_on_either_thread_mode() {
        let config = config();
        let bytes = tiny_model();
        let bert = Bert::load(&bytes, &config).unwrap();
        let texts: [&[u32]; 3] = [&[1, 4, 5, 2], &[1, 3, 3, 3, 3, 2], &[1, 2]];
        for threads in [Threads::One, Threads::Pool] {
            let pooled = bert.embed_pass(&texts, threads).unwrap();
            assert_eq!(pooled.len(), 3);
            for (ids, got) in texts.iter().zip(&pooled) {
                let want = reference_pool(&bytes, &config, ids);
                for (a, b) in got.iter().zip(&want) {
                    assert!((a - b).abs() < 1e-4, "{threads:?}: {a} vs {b} for {ids:?}");
                }
            }
            // A text alone gives what it gives among others.
            let alone = bert.embed_pass(&texts[1..2], threads).unwrap();
            for (a, b) in alone[0].iter().zip(&pooled[1]) {
                assert!((a - b).abs() < 1e-5, "{a} vs {b}");
            }
        }
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        let bert = Bert::load(&tiny_model(), &config()).unwrap();
        let error = bert.embed_pass(&[&[1, 11]], Threads::One).unwrap_err();
        assert!(error.contains("token id 11"), "{error}");
        assert!(bert.embed_pass(&[&[]], Threads::One).is_err());
        assert!(bert.embed_pass(&[&[1; 17]], Threads::One).is_err());
        let error = Bert::load(b"not safetensors", &config()).err().unwrap();
        assert!(error.contains("safetensors"), "{error}");
        let mut wide = config();
        wide.hidden_size = 16;
        let error = Bert::load(&tiny_model(), &wide).err().unwrap();
        assert!(error.contains("shape"), "{error}");
    }
}

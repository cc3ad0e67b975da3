//! The vector benchmark: a seeded synthetic data set, exact ground truth, and recall@k and
//! queries per second of the HNSW collection over a sweep of `ef_search`
//! (`examples/vector_bench.rs` runs it).
//!
//! The data is a Gaussian mixture, not uniform random vectors (whose nearest neighbours
//! are all nearly equidistant in high dimension, which no embedding model produces): `centres`
//! centres drawn from N(0, I) and normalised, each point `centre + s·g` with
//! `g ~ N(0, I/dim)` and a per-centre spread `s` drawn from [0.35, 0.7], then normalised.
//! Queries are fresh draws from the same mixture (not indexed points).

use std::time::{Duration, Instant};

use arches_core::search::MetadataFilter;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::vector::{dot, normalized, Collection, HnswParams};

/// A seeded Gaussian-mixture data set of `n` normalised vectors of dimension `dim`.
pub struct Dataset {
    /// The dimension.
    pub dim: usize,
    /// `n * dim` components, row-major, every row L2-normalised.
    pub vectors: Vec<f32>,
}

impl Dataset {
    /// The number of vectors.
    pub fn len(&self) -> usize {
        self.vectors.len() / self.dim.max(1)
    }

    /// Whether there is no vector.
    pub fn is_empty(&self) -> bool {
        self.vectors.is_empty()
    }

    /// Row `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.vectors[i * self.dim..(i + 1) * self.dim]
    }
}

/// A standard normal draw (Box–Muller transform).
fn normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// The mixture's centres and spreads for `seed`.
fn mixture(dim: usize, centres: usize, seed: u64) -> (Vec<Vec<f32>>, Vec<f64>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let means = (0..centres.max(1))
        .map(|_| {
            let v: Vec<f32> = (0..dim).map(|_| normal(&mut rng) as f32).collect();
            normalized(&v)
        })
        .collect();
    let spreads = (0..centres.max(1))
        .map(|_| 0.35 + 0.35 * rng.random::<f64>())
        .collect();
    (means, spreads)
}

/// `n` points of the mixture of `centres` centres made from `mixture_seed`, drawn with
/// `seed`.
pub fn clustered(n: usize, dim: usize, centres: usize, mixture_seed: u64, seed: u64) -> Dataset {
    let (means, spreads) = mixture(dim, centres, mixture_seed);
    let mut rng = StdRng::seed_from_u64(seed);
    let scale = 1.0 / (dim as f64).sqrt();
    let mut vectors = Vec::with_capacity(n * dim);
    let mut row = vec![0f32; dim];
    for _ in 0..n {
        let c = rng.random_range(0..means.len());
        for (j, x) in row.iter_mut().enumerate() {
            *x = (f64::from(means[c][j]) + spreads[c] * scale * normal(&mut rng)) as f32;
        }
        vectors.extend_from_slice(&normalized(&row));
    }
    Dataset { dim, vectors }
}

/// The exact top `k` rows of `data` for each query (by dot product, ties by row), on
/// `threads` threads.
pub fn exact_top_k(data: &Dataset, queries: &Dataset, k: usize, threads: usize) -> Vec<Vec<usize>> {
    let threads = threads.max(1);
    let mut out: Vec<Vec<usize>> = vec![Vec::new(); queries.len()];
    std::thread::scope(|scope| {
        let chunk = queries.len().div_ceil(threads).max(1);
        for (t, slice) in out.chunks_mut(chunk).enumerate() {
            scope.spawn(move || {
                for (i, result) in slice.iter_mut().enumerate() {
                    let q = queries.row(t * chunk + i);
                    let mut scored: Vec<(f32, usize)> =
                        (0..data.len()).map(|r| (dot(q, data.row(r)), r)).collect();
                    let k = k.min(scored.len());
                    if k == 0 {
                        continue;
                    }
                    scored.select_nth_unstable_by(k - 1, |a, b| {
                        b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
                    });
                    scored.truncate(k);
                    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
                    // Collect from a borrowing iterator: `into_iter().map().collect()` would
                    // reuse (and keep) the allocation of all `n` scores.
                    *result = scored.iter().map(|&(_, r)| r).collect();
                }
            });
        }
    });
    out
}

/// One point of the `ef_search` sweep.
#[derive(Clone, Debug)]
pub struct SweepPoint {
    /// The beam width.
    pub ef: usize,
    /// Mean over queries of |found ∩ true top k| / k.
    pub recall: f64,
    /// Queries per second over all threads (wall clock).
    pub qps: f64,
    /// Mean latency of one query, in microseconds.
    pub mean_latency_us: f64,
    /// CPU time this process spent during the measurement, in seconds (Linux `/proc`; 0
    /// when unknown). On a machine shared with other work it is below `threads × wall
    /// time`.
    pub cpu_seconds: f64,
    /// Queries per CPU-second: the throughput one fully available core gives.
    pub qps_per_core: f64,
}

/// CPU time (user + system) of this process so far, in seconds, from `/proc/self/stat`
/// (clock ticks of 1/100 s on Linux).
pub fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// Builds a collection of `data` (ids are row numbers) with `params`; returns it and the
/// build time.
///
/// Errors: [`arches_core::search::SearchError::InvalidArgument`] for bad parameters.
pub fn build(
    data: &Dataset,
    params: HnswParams,
) -> Result<(Collection, Duration), arches_core::search::SearchError> {
    let started = Instant::now();
    let ids = (0..data.len()).map(|i| i.to_string()).collect();
    let collection = Collection::build(data.dim, params, ids, data.vectors.clone())?;
    Ok((collection, started.elapsed()))
}

/// Runs every query with beam width `ef` on `threads` threads; returns the recall@k against
/// `truth` and the throughput.
pub fn measure(
    collection: &Collection,
    queries: &Dataset,
    truth: &[Vec<usize>],
    k: usize,
    ef: usize,
    threads: usize,
) -> SweepPoint {
    let threads = threads.max(1);
    let filter = MetadataFilter::all();
    let chunk = queries.len().div_ceil(threads).max(1);
    let cpu_before = process_cpu_seconds();
    let started = Instant::now();
    let found: Vec<(usize, Vec<Vec<usize>>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let filter = &filter;
                scope.spawn(move || {
                    let start = (t * chunk).min(queries.len());
                    let end = ((t + 1) * chunk).min(queries.len());
                    let results = (start..end)
                        .map(|i| {
                            collection
                                .search_slots(queries.row(i), k, filter, Some(ef))
                                .into_iter()
                                .map(|(slot, _)| slot)
                                .collect()
                        })
                        .collect();
                    (start, results)
                })
            })
            .collect();
        handles.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_seconds = match (cpu_before, process_cpu_seconds()) {
        (Some(before), Some(after)) => (after - before).max(0.0),
        _ => 0.0,
    };
    let mut hits = 0usize;
    let mut total = 0usize;
    for (start, results) in &found {
        for (i, result) in results.iter().enumerate() {
            let want = &truth[start + i];
            total += want.len();
            hits += result.iter().filter(|slot| want.contains(slot)).count();
        }
    }
    // Slots are row numbers: `build` inserts rows in order into an empty collection.
    SweepPoint {
        ef,
        recall: hits as f64 / total.max(1) as f64,
        qps: queries.len() as f64 / elapsed.max(1e-9),
        mean_latency_us: elapsed * 1e6 * threads as f64 / queries.len().max(1) as f64,
        cpu_seconds,
        qps_per_core: if cpu_seconds > 0.0 {
            queries.len() as f64 / cpu_seconds
        } else {
            0.0
        },
    }
}

/// The resident set size and its peak of this process, in bytes (Linux `/proc`), when
/// known.
pub fn memory() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|kib| kib * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Writes `collection` as a snapshot under `dir` (as the index would) and returns the
/// bytes written and the time taken, then reloads it and returns the reload time.
///
/// Errors: storage.
pub fn persist(
    collection: &Collection,
    dir: &std::path::Path,
) -> Result<(u64, Duration, Duration), arches_core::search::SearchError> {
    let started = Instant::now();
    crate::vector::write_snapshot_for_bench(dir, collection)?;
    let written = started.elapsed();
    let bytes = crate::vector::disk_usage(dir);
    let started = Instant::now();
    crate::vector::reload_for_bench(dir, collection.params())?;
    Ok((bytes, written, started.elapsed()))
}

//! The vector index benchmark: builds an HNSW collection of `--n` seeded clustered vectors of
//! dimension `--dim` (a Gaussian mixture of `--centres` centres, normalised; see
//! `arches_search::bench`), computes the exact top `--k` of `--queries` fresh queries by brute
//! force, then sweeps `ef_search` and reports recall@k and queries per second on `--threads`
//! threads, and the QPS at the smallest `ef` whose recall reaches `--target-recall`.
//!
//! ```text
//! cargo run --release -p arches-search --example vector_bench -- \
//!     --n 100000 --dim 384 --queries 2000 --k 10 --threads 2
//! ```
//!
//! Other flags: `--m 16 --ef-construction 100 --centres 300 --seed 42 --ef 16,24,32,...`
//! `--target-recall 0.95 --dir <path>` (where the snapshot is written to measure its size;
//! a temporary directory by default).

use std::process::ExitCode;
use std::time::Instant;

use arches_search::bench;
use arches_search::HnswParams;

struct Args {
    n: usize,
    dim: usize,
    queries: usize,
    k: usize,
    threads: usize,
    m: usize,
    ef_construction: usize,
    centres: usize,
    seed: u64,
    efs: Vec<usize>,
    target_recall: f64,
    dir: Option<std::path::PathBuf>,
}

fn parse() -> Result<Args, String> {
    let mut args = Args {
        n: 100_000,
        dim: 384,
        queries: 2000,
        k: 10,
        threads: 2,
        m: HnswParams::default().m,
        ef_construction: HnswParams::default().ef_construction,
        centres: 300,
        seed: 42,
        efs: vec![10, 16, 24, 32, 48, 64, 96, 128, 192, 256],
        target_recall: 0.95,
        dir: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<usize>()
                .map_err(|_| format!("{flag}: not a number: {value}"))
        };
        match flag.as_str() {
            "--n" => args.n = number()?,
            "--dim" => args.dim = number()?,
            "--queries" => args.queries = number()?,
            "--k" => args.k = number()?,
            "--threads" => args.threads = number()?,
            "--m" => args.m = number()?,
            "--ef-construction" => args.ef_construction = number()?,
            "--centres" => args.centres = number()?,
            "--seed" => args.seed = number()? as u64,
            "--target-recall" => {
                args.target_recall = value
                    .parse()
                    .map_err(|_| format!("{flag}: not a number: {value}"))?
            }
            "--ef" => {
                args.efs = value
                    .split(',')
                    .map(|v| v.trim().parse::<usize>())
                    .collect::<Result<_, _>>()
                    .map_err(|_| format!("--ef: not a list of numbers: {value}"))?
            }
            "--dir" => args.dir = Some(value.into()),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if args.n == 0 || args.dim == 0 || args.queries == 0 || args.k == 0 || args.threads == 0 {
        return Err("--n, --dim, --queries, --k and --threads must be positive".into());
    }
    Ok(args)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("vector_bench: {message}");
            return ExitCode::from(2);
        }
    };
    let params = HnswParams {
        m: args.m,
        ef_construction: args.ef_construction,
        ef_search: 64,
    };
    println!(
        "data: {} vectors + {} queries, dim {}, Gaussian mixture of {} centres (seed {}), normalised; cosine",
        args.n, args.queries, args.dim, args.centres, args.seed
    );
    println!(
        "index: arches-search HNSW, M {}, ef_construction {} (built on 1 thread); k {}; queries on {} threads",
        params.m, params.ef_construction, args.k, args.threads
    );
    let started = Instant::now();
    let data = bench::clustered(args.n, args.dim, args.centres, args.seed, args.seed + 1);
    let queries = bench::clustered(
        args.queries,
        args.dim,
        args.centres,
        args.seed,
        args.seed + 2,
    );
    println!("generated in {:.1} s", started.elapsed().as_secs_f64());
    let started = Instant::now();
    let truth = bench::exact_top_k(&data, &queries, args.k, args.threads);
    let brute = started.elapsed().as_secs_f64();
    println!(
        "exact brute force: {:.1} s ({:.0} queries/s)",
        brute,
        args.queries as f64 / brute
    );
    let rss_before = bench::memory().map(|(rss, _)| rss);
    let (collection, build_time) = match bench::build(&data, params) {
        Ok(built) => built,
        Err(error) => {
            eprintln!("vector_bench: {error}");
            return ExitCode::FAILURE;
        }
    };
    drop(data);
    println!(
        "build: {:.1} s ({:.0} inserts/s)",
        build_time.as_secs_f64(),
        args.n as f64 / build_time.as_secs_f64()
    );
    if let (Some((rss, peak)), Some(before)) = (bench::memory(), rss_before) {
        println!(
            "memory: process RSS {:.0} MiB after build ({:.0} MiB before it, with the data set and \
             ground truth; peak {:.0} MiB); index: vectors {:.0} MiB + graph {:.0} MiB",
            mib(rss),
            mib(before),
            mib(peak),
            mib((args.n * args.dim * 4) as u64),
            mib(collection.graph_memory_bytes() as u64)
        );
    }
    let tmp = std::env::temp_dir().join(format!("arches-vector-bench-{}", std::process::id()));
    let dir = args.dir.clone().unwrap_or(tmp.clone());
    match bench::persist(&collection, &dir) {
        Ok((bytes, written, reloaded)) => println!(
            "disk: {:.0} MiB (snapshot written in {:.1} s, reloaded in {:.1} s)",
            mib(bytes),
            written.as_secs_f64(),
            reloaded.as_secs_f64()
        ),
        Err(error) => println!("disk: not measured: {error}"),
    }
    if args.dir.is_none() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    println!();
    println!(
        "| ef_search | recall@{} | QPS ({} threads, wall clock) | mean latency (µs) | CPU share | QPS per CPU-second |",
        args.k, args.threads
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    let mut best: Option<bench::SweepPoint> = None;
    for &ef in &args.efs {
        let point = bench::measure(&collection, &queries, &truth, args.k, ef, args.threads);
        let wall = args.queries as f64 / point.qps.max(1e-9);
        println!(
            "| {} | {:.4} | {:.0} | {:.0} | {:.2} of {} cores | {:.0} |",
            point.ef,
            point.recall,
            point.qps,
            point.mean_latency_us,
            point.cpu_seconds / wall,
            args.threads,
            point.qps_per_core
        );
        if best.is_none() && point.recall >= args.target_recall {
            best = Some(point);
        }
    }
    println!();
    match best {
        Some(point) => {
            println!(
                "smallest ef with recall@{} >= {}: ef {} -> recall {:.4}, {:.0} QPS on {} threads \
                 (wall clock), {:.0} QPS per CPU-second ({:.0} on {} fully available cores)",
                args.k,
                args.target_recall,
                point.ef,
                point.recall,
                point.qps,
                args.threads,
                point.qps_per_core,
                point.qps_per_core * args.threads as f64,
                args.threads
            );
            ExitCode::SUCCESS
        }
        None => {
            println!("no ef reached recall@{} >= {}", args.k, args.target_recall);
            ExitCode::FAILURE
        }
    }
}

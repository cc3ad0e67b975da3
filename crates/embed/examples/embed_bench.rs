//! Throughput of [`MiniLmEmbedder`] (texts per second), against the Python baseline
//! `crates/embed/bench/embed_bench.py` on the same texts, batch size and maximum length.
//!
//! Make the corpus (the paragraphs of The Rust Programming Language as the toolchain ships
//! it, in file-name order, `print.html` left out since it repeats every chapter; deduplicated;
//! at least 40 characters each; one JSON string per line):
//!
//! ```text
//! cargo run --release -p arches-embed --example embed_bench -- \
//!     --extract-book "$(rustc --print sysroot)/share/doc/rust/html/book" \
//!     --count 2000 --out /tmp/embed-corpus.jsonl
//! ```
//!
//! Measure (threads: `RAYON_NUM_THREADS`, which sizes the rayon pool the passes run on):
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo run --release -p arches-embed --example embed_bench -- \
//!     --model-dir "$(scripts/fetch-model)" --texts /tmp/embed-corpus.jsonl --batch 32
//! ```
//!
//! Each run embeds every text in one `embed` call (sorted by token count inside, passes of
//! `--batch`), as sentence-transformers' `encode` does with `batch_size`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use arches_core::embedding::EmbeddingProvider;
use arches_embed::{MiniLmEmbedder, MiniLmOptions};

struct Args {
    model_dir: Option<PathBuf>,
    texts: Option<PathBuf>,
    batch: usize,
    runs: usize,
    dump: Option<PathBuf>,
    extract_book: Option<PathBuf>,
    count: usize,
    out: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        model_dir: None,
        texts: None,
        batch: 32,
        runs: 3,
        dump: None,
        extract_book: None,
        count: 2000,
        out: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let number = |text: String| {
            text.parse::<usize>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("{flag} needs a positive number, got {text:?}"))
        };
        match flag.as_str() {
            "--model-dir" => args.model_dir = Some(value()?.into()),
            "--texts" => args.texts = Some(value()?.into()),
            "--batch" => args.batch = number(value()?)?,
            "--runs" => args.runs = number(value()?)?,
            "--dump" => args.dump = Some(value()?.into()),
            "--extract-book" => args.extract_book = Some(value()?.into()),
            "--count" => args.count = number(value()?)?,
            "--out" => args.out = Some(value()?.into()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(args)
}

/// `text` with tags removed, the common entities decoded and whitespace collapsed.
fn plain(html: &str) -> String {
    let mut text = String::with_capacity(html.len());
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' if in_tag => in_tag = false,
            _ if !in_tag => text.push(c),
            _ => {}
        }
    }
    let text = text
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&#x27;", "'")
        .replace("&nbsp;", " ")
        .replace("&amp;", "&");
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The first `count` distinct paragraphs (`<p>…</p>`, at least 40 characters) of the book's
/// pages in file-name order.
fn extract_book(dir: &Path, count: usize) -> Result<Vec<String>, String> {
    let mut pages: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|error| format!("{}: {error}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| {
            path.extension().is_some_and(|ext| ext == "html")
                && path.file_name().is_some_and(|name| name != "print.html")
        })
        .collect();
    pages.sort();
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for page in pages {
        let html = std::fs::read_to_string(&page)
            .map_err(|error| format!("{}: {error}", page.display()))?;
        let mut rest = html.as_str();
        while let Some(start) = rest.find("<p>") {
            let after = &rest[start + 3..];
            let Some(end) = after.find("</p>") else { break };
            let text = plain(&after[..end]);
            rest = &after[end + 4..];
            if text.chars().count() >= 40 && seen.insert(text.clone()) {
                out.push(text);
                if out.len() == count {
                    return Ok(out);
                }
            }
        }
    }
    Ok(out)
}

/// CPU seconds this process has used (user + system), from `/proc/self/stat` (fields 14
/// and 15, in clock ticks of 1/100 s, Linux's `USER_HZ`); `None` elsewhere.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn main() -> Result<(), String> {
    let args = parse_args()?;
    if let Some(dir) = &args.extract_book {
        let out = args.out.as_ref().ok_or("--extract-book needs --out FILE")?;
        let texts = extract_book(dir, args.count)?;
        let lines: Vec<String> = texts
            .iter()
            .map(|text| serde_json::to_string(text).map_err(|error| error.to_string()))
            .collect::<Result<_, _>>()?;
        std::fs::write(out, lines.join("\n") + "\n")
            .map_err(|error| format!("{}: {error}", out.display()))?;
        let chars: usize = texts.iter().map(|text| text.chars().count()).sum();
        println!(
            "wrote {} paragraphs ({chars} characters) to {}",
            texts.len(),
            out.display()
        );
        return Ok(());
    }

    let model_dir = args
        .model_dir
        .ok_or("give --model-dir DIR (see scripts/fetch-model)")?;
    let texts_path = args.texts.ok_or("give --texts FILE (JSON lines)")?;
    let texts: Vec<String> = std::fs::read_to_string(&texts_path)
        .map_err(|error| format!("{}: {error}", texts_path.display()))?
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| serde_json::from_str(line).map_err(|error| error.to_string()))
        .collect::<Result<_, _>>()?;
    if texts.is_empty() {
        return Err("the corpus is empty".into());
    }
    let options = MiniLmOptions {
        max_batch: texts.len(),
        inference_batch: args.batch,
        ..MiniLmOptions::default()
    };
    let embedder = MiniLmEmbedder::load(&model_dir, options).map_err(|error| error.to_string())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| error.to_string())?;
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all CPUs".into());
    let truncated = texts
        .iter()
        .filter(|text| {
            embedder
                .token_count(text)
                .is_ok_and(|n| n > embedder.max_seq_length())
        })
        .count();

    // Warm-up, as the Python side does.
    let warm = &texts[..texts.len().min(args.batch * 2)];
    runtime
        .block_on(embedder.embed(warm))
        .map_err(|error| error.to_string())?;
    let mut rates = Vec::new();
    let mut last = None;
    for run in 1..=args.runs {
        let start = Instant::now();
        let cpu_start = cpu_seconds();
        let embeddings = runtime
            .block_on(embedder.embed(&texts))
            .map_err(|error| error.to_string())?;
        let seconds = start.elapsed().as_secs_f64();
        let cpu = match (cpu_start, cpu_seconds()) {
            (Some(before), Some(after)) => format!(", {:.1} CPU s", after - before),
            _ => String::new(),
        };
        rates.push(texts.len() as f64 / seconds);
        println!(
            "run {run}: {} texts ({} tokens) in {seconds:.2} s{cpu} = {:.1} texts/s",
            texts.len(),
            embeddings.tokens.unwrap_or(0),
            texts.len() as f64 / seconds
        );
        last = Some(embeddings);
    }
    rates.sort_by(f64::total_cmp);
    println!(
        "rust arches-embed (faer), threads {threads}, batch {}, max_seq_length {} ({truncated} texts truncated): median {:.1} texts/s, best {:.1} texts/s",
        args.batch,
        embedder.max_seq_length(),
        rates[rates.len() / 2],
        rates[rates.len() - 1]
    );
    if let (Some(path), Some(embeddings)) = (args.dump, last) {
        let lines: Vec<String> = embeddings
            .vectors
            .iter()
            .map(|vector| serde_json::to_string(vector).unwrap_or_default())
            .collect();
        std::fs::write(&path, lines.join("\n") + "\n")
            .map_err(|error| format!("{}: {error}", path.display()))?;
    }
    Ok(())
}

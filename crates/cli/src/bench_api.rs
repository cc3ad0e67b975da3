//! `arches bench api`: the HTTP API under load. The server is built as `arches serve` builds
//! it (same router, layers, auth and in-process engine, real Argon2id) on a fresh temporary
//! home and served on a loopback port in this process; the load generator opens
//! `connections` HTTP/1.1 keep-alive connections (hyper's client connection, no pool) and
//! each sends its requests back to back for `duration`, timing every request from write to
//! the last body byte. Both share the machine's cores, as any load generator here would.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use arches_server::app::{self, BuildOptions};
use arches_server::config::ServerConfig;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper::{Method, Request};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// What `arches bench api` loads.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApiScenario {
    /// `GET /api/v1/runs/{id}` of a finished run, with a JWT.
    GetRun,
    /// `POST /api/v1/runs` triggering a one-task `noop` pipeline, with a JWT.
    Trigger,
}

/// Settings of one `arches bench api` measurement.
#[derive(Debug, Clone)]
pub struct ApiBenchSettings {
    /// The request measured.
    pub scenario: ApiScenario,
    /// Concurrent keep-alive connections.
    pub connections: usize,
    /// Measured time, after `warmup`.
    pub duration: Duration,
    /// Time sending requests before measuring.
    pub warmup: Duration,
    /// Store durability.
    pub durability: arches_core::records::Durability,
}

/// One connection's results.
#[derive(Default)]
struct Tally {
    /// Request latencies in microseconds.
    latencies: Vec<u32>,
    /// Answers that were not the expected status.
    errors: u64,
}

/// Sends `method path` with `body` on `sender` and returns the status and body.
async fn send(
    sender: &mut http1::SendRequest<Full<Bytes>>,
    method: Method,
    path: &str,
    token: &str,
    body: Option<&Value>,
) -> anyhow::Result<(u16, Bytes)> {
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "127.0.0.1")
        .header("authorization", format!("Bearer {token}"));
    let payload = match body {
        Some(body) => {
            request = request.header("content-type", "application/json");
            Bytes::from(serde_json::to_vec(body)?)
        }
        None => Bytes::new(),
    };
    sender.ready().await.context("the connection closed")?;
    let response = sender
        .send_request(request.body(Full::new(payload))?)
        .await
        .context("the request failed")?;
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await?.to_bytes();
    Ok((status, bytes))
}

/// Opens one HTTP/1.1 connection to `address`.
async fn connect(address: std::net::SocketAddr) -> anyhow::Result<http1::SendRequest<Full<Bytes>>> {
    let stream = TcpStream::connect(address)
        .await
        .with_context(|| format!("cannot connect to {address}"))?;
    stream.set_nodelay(true)?;
    let (sender, connection) = http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// Runs one measurement and prints its report; see the module docs.
///
/// # Errors
/// The server does not build or serve, or the set-up requests fail.
pub async fn bench_api(settings: ApiBenchSettings) -> anyhow::Result<()> {
    let home = tempfile::tempdir().context("cannot create a temporary directory")?;
    let mut config = ServerConfig {
        home: home.path().to_path_buf(),
        durability: match settings.durability {
            arches_core::records::Durability::Normal => arches_server::config::Durability::Normal,
            arches_core::records::Durability::Full => arches_server::config::Durability::Full,
        },
        ..ServerConfig::default()
    };
    // The limits would answer 429 long before the server is saturated: raise them.
    config.rate_limits.per_ip_per_sec = u32::MAX / 2;
    config.rate_limits.per_ip_burst = u32::MAX / 2;
    config.rate_limits.per_user_per_sec = u32::MAX / 2;
    config.rate_limits.per_user_burst = u32::MAX / 2;
    config.workers.slots = Some(64);
    let built = app::build(config, BuildOptions::default())
        .await
        .context("the server does not build")?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let stop = CancellationToken::new();
    let signal = stop.clone();
    let server = tokio::spawn(async move {
        app::serve(built, listener, async move { signal.cancelled().await }).await
    });

    // Set-up through the API: the first user, a pipeline, one finished run.
    let mut setup = connect(address).await?;
    let signup =
        json!({"email": "bench@example.test", "password": "correct horse battery staple 42"});
    let (status, body) = send(
        &mut setup,
        Method::POST,
        "/api/v1/auth/signup",
        "",
        Some(&signup),
    )
    .await?;
    if status != 201 && status != 200 {
        bail!(
            "sign-up answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    let login =
        json!({"email": "bench@example.test", "password": "correct horse battery staple 42"});
    let (status, body) = send(
        &mut setup,
        Method::POST,
        "/api/v1/auth/login",
        "",
        Some(&login),
    )
    .await?;
    if status != 200 {
        bail!(
            "login answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    let token = serde_json::from_slice::<Value>(&body)?["access_token"]
        .as_str()
        .context("login gave no access token")?
        .to_owned();
    let pipeline = Request::builder()
        .method(Method::POST)
        .uri("/api/v1/pipelines")
        .header("host", "127.0.0.1")
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/yaml")
        .body(Full::new(Bytes::from_static(
            b"name: tiny\ntasks:\n  - id: one\n    tool: noop\n",
        )))?;
    setup.ready().await?;
    let response = setup.send_request(pipeline).await?;
    if response.status().as_u16() != 201 {
        bail!("creating the pipeline answered {}", response.status());
    }
    response.into_body().collect().await?;
    let trigger = json!({"pipeline": "tiny"});
    let (status, body) = send(
        &mut setup,
        Method::POST,
        "/api/v1/runs",
        &token,
        Some(&trigger),
    )
    .await?;
    if status != 201 {
        bail!(
            "triggering a run answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    let run_id = serde_json::from_slice::<Value>(&body)?["id"]
        .as_str()
        .context("the run has no id")?
        .to_owned();

    let (method, path, body, expected) = match settings.scenario {
        ApiScenario::GetRun => (Method::GET, format!("/api/v1/runs/{run_id}"), None, 200),
        ApiScenario::Trigger => (Method::POST, "/api/v1/runs".to_owned(), Some(trigger), 201),
    };
    let warmup_end = Instant::now() + settings.warmup;
    let end = warmup_end + settings.duration;
    let mut connections = Vec::with_capacity(settings.connections);
    for _ in 0..settings.connections.max(1) {
        let mut sender = connect(address).await?;
        let (method, path, body, token) =
            (method.clone(), path.clone(), body.clone(), token.clone());
        connections.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            loop {
                let started = Instant::now();
                if started >= end {
                    break;
                }
                let answer = send(&mut sender, method.clone(), &path, &token, body.as_ref()).await;
                let measured = started >= warmup_end;
                match answer {
                    Ok((status, _)) if status == expected => {
                        if measured {
                            let micros = started.elapsed().as_micros();
                            tally
                                .latencies
                                .push(u32::try_from(micros).unwrap_or(u32::MAX));
                        }
                    }
                    Ok(_) => tally.errors += u64::from(measured),
                    Err(_) => {
                        tally.errors += 1;
                        match connect(address).await {
                            Ok(fresh) => sender = fresh,
                            Err(_) => break,
                        }
                    }
                }
            }
            tally
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    for connection in connections {
        let tally = connection.await?;
        latencies.extend(tally.latencies);
        errors += tally.errors;
    }
    stop.cancel();
    server.await??;
    latencies.sort_unstable();
    let at = |q: f64| {
        let index = ((latencies.len() as f64 - 1.0) * q).round() as usize;
        latencies.get(index).map_or(0.0, |&v| f64::from(v) / 1000.0)
    };
    println!(
        "{:?}: {} connections, {:.1} s measured ({:.1} s warm-up), durability {}",
        settings.scenario,
        settings.connections,
        settings.duration.as_secs_f64(),
        settings.warmup.as_secs_f64(),
        settings.durability.as_str(),
    );
    println!(
        "  {} requests, {:.0} requests/s, {} errors",
        latencies.len(),
        latencies.len() as f64 / settings.duration.as_secs_f64(),
        errors
    );
    println!(
        "  latency ms: p50 {:.3}  p90 {:.3}  p99 {:.3}  max {:.3}",
        at(0.5),
        at(0.9),
        at(0.99),
        at(1.0)
    );
    Ok(())
}

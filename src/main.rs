//! The `paysync` command line: parses arguments, loads settings, runs a command and
//! maps errors to exit codes (2 for invalid configuration, 1 for other failures).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// jemalloc instead of glibc malloc: 15% less CPU per request at 0 ms, and with
/// one arena per CPU and quick page purging no more peak memory (README,
/// "Benchmarks"). Unprefixed, so that librdkafka and OpenSSL allocate from it too
/// instead of keeping glibc's per-thread arenas beside it: 3.4 MiB less peak RSS
/// at 0 ms for the same CPU.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read once at its start (`MALLOC_CONF` in the
/// environment still overrides them): one arena (the thread caches take most of
/// the load), dirty pages returned after 100 ms, no muzzy stage. Against one arena
/// per CPU and 1 s: the same CPU per request, 2–8 MiB less peak RSS (README,
/// benchmarks).
#[allow(non_upper_case_globals)]
#[export_name = "malloc_conf"]
pub static malloc_conf: &[u8] = b"narenas:1,dirty_decay_ms:100,muzzy_decay_ms:0\0";
use paysync::config::{LogFormat, Settings, Sources, EXIT_CONFIG};

/// The longest duration a flag accepts (as the configuration's keys): a
/// deadline is added to the clock, and a bound keeps that from overflowing.
const MAX_FLAG_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// A duration flag (`30s`, `2m`, ...): more than zero and at most 7 days, else
/// a usage error (exit 2) that names the flag.
fn duration_flag(value: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(value).map_err(|e| e.to_string())?;
    if d.is_zero() {
        return Err("must be greater than zero".into());
    }
    if d > MAX_FLAG_DURATION {
        return Err("must be at most 7 days".into());
    }
    Ok(d)
}

#[derive(Parser)]
#[command(
    name = "paysync",
    version,
    about = "Kafka-driven payment status synchronizer",
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// `paysync run --role`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum RunRole {
    /// The processor, and the webhook intake when `[webhooks]` exists.
    All,
    /// The processor only.
    Processor,
    /// The webhook intake only.
    Webhooks,
}

impl From<RunRole> for paysync::app::Role {
    fn from(r: RunRole) -> Self {
        match r {
            RunRole::All => paysync::app::Role::All,
            RunRole::Processor => paysync::app::Role::Processor,
            RunRole::Webhooks => paysync::app::Role::Webhooks,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the processor: consume status-check requests, publish status events.
    Run {
        /// TOML settings file (every key can be overridden by PAYSYNC_<SECTION>__<KEY>).
        #[arg(long, env = "PAYSYNC_CONFIG")]
        config: Option<PathBuf>,
        /// What this process runs: the processor and the webhook intake (`all`),
        /// or either alone.
        #[arg(long, value_enum, default_value = "all", env = "PAYSYNC_ROLE")]
        role: RunRole,
    },
    /// Run the whole pipeline in one process: in-process Kafka, a CM.com simulator and sample requests.
    Demo {
        /// Address for /metrics, /healthz and /readyz while the demo runs.
        #[arg(long, default_value = "127.0.0.1:9464")]
        listen: SocketAddr,
        /// Show paysync's info-level logs on stderr.
        #[arg(long)]
        verbose: bool,
    },
    /// Validate the configuration and print it with secrets masked.
    CheckConfig {
        /// TOML settings file.
        #[arg(long, env = "PAYSYNC_CONFIG")]
        config: Option<PathBuf>,
        /// Print only the topics this configuration needs, one per line.
        #[arg(long)]
        topics: bool,
    },
    /// Check payments' statuses now, through the same connector path as `run`, with
    /// no Kafka: one event per id as one JSON line, printed as each ends. Exit 0 when
    /// every check got a status from the connector, 1 when one failed (its line says
    /// why), 2 for a bad configuration or argument (ids checked before it are
    /// printed).
    Check {
        /// TOML settings file.
        #[arg(long, env = "PAYSYNC_CONFIG")]
        config: Option<PathBuf>,
        /// Connector (default: processing.default_connector).
        #[arg(long)]
        connector: Option<String>,
        /// Merchant account (default: processing.default_merchant).
        #[arg(long)]
        merchant: Option<String>,
        /// UCS payment method type, e.g. IDEAL (default: the connector's).
        #[arg(long)]
        method: Option<String>,
        /// Expected amount in minor units (checked against the connector's; needs --currency).
        #[arg(long, allow_negative_numbers = true)]
        amount: Option<i64>,
        /// ISO 4217 currency of --amount.
        #[arg(long)]
        currency: Option<String>,
        /// Overall deadline of each id's check, retries and an open circuit
        /// included: an id that runs out is a failed check (CONNECTOR_TIMEOUT).
        #[arg(long, default_value = "30s", value_parser = duration_flag)]
        timeout: Duration,
        /// Connector transaction ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Send dead letters back to the input topic, each once whatever filters
    /// earlier runs used (the position is kept in the consumer group
    /// `<group_id>.redrive`). Without --reason, only letters that can succeed once
    /// their cause is fixed (unknown_merchant, unknown_connector,
    /// unsupported_payment_method, internal_error, publish_refused). SIGINT and
    /// SIGTERM stop it after the batch under way, committed (exit 130).
    Redrive {
        /// TOML settings file.
        #[arg(long, env = "PAYSYNC_CONFIG")]
        config: Option<PathBuf>,
        /// Only dead letters with this reason (paysync's own `paysync-error-code`;
        /// repeatable; `none` for letters without one). Required for letters whose
        /// bytes cannot be processed as they are (invalid_json, oversize, ...).
        #[arg(long = "reason")]
        reasons: Vec<String>,
        /// Send at most this many.
        #[arg(long)]
        max: Option<u64>,
        /// Count and list what would be sent; send and commit nothing.
        #[arg(long)]
        dry_run: bool,
        /// Send letters again that earlier runs already sent.
        #[arg(long)]
        force: bool,
        /// Skip letters already redriven this many times (`paysync-redrive-count`).
        #[arg(long, default_value_t = 3)]
        max_redrives: u32,
    },
    /// Print the Avro schemas (event, then request) with their single-object fingerprints.
    Schema {
        /// Print only this schema, exactly as committed (for other tools).
        #[arg(long, value_enum)]
        only: Option<WhichSchema>,
    },
    /// Ask a running paysync whether it is healthy: GET /healthz (or /readyz with
    /// --ready) and exit 0 on 200, 1 otherwise (container health checks).
    Healthcheck {
        /// The URL to ask; default: /healthz (or /readyz) on the configured `http.listen`.
        #[arg(long)]
        url: Option<url::Url>,
        /// Ask /readyz instead of /healthz.
        #[arg(long)]
        ready: bool,
        /// TOML settings file (for `http.listen`).
        #[arg(long, env = "PAYSYNC_CONFIG")]
        config: Option<PathBuf>,
        /// Give up after this long.
        #[arg(long, default_value = "3s", value_parser = duration_flag)]
        timeout: Duration,
    },
    /// Serve the connector simulator (every simulated connector's API on one port) for local stacks and load tests.
    #[command(alias = "simulate-cm")]
    Simulate {
        /// Listen address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Fixed latency of Get Transaction in milliseconds.
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
        /// Fraction of Get Transaction calls answered 503 (0 to 1).
        #[arg(long, default_value_t = 0.0)]
        error_rate: f64,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum WhichSchema {
    /// `PaymentStatusEvent` (schemas/payment_status_event.avsc).
    Event,
    /// `StatusCheckRequest` (schemas/status_check_request.avsc).
    Request,
}

fn print_schemas(only: Option<WhichSchema>) {
    use paysync::codec::avro::{Schemas, EVENT_SCHEMA_JSON, REQUEST_SCHEMA_JSON};
    let schemas = Schemas::get();
    let all = [
        (
            WhichSchema::Event,
            "schemas/payment_status_event.avsc",
            EVENT_SCHEMA_JSON,
            schemas.event_fingerprint,
        ),
        (
            WhichSchema::Request,
            "schemas/status_check_request.avsc",
            REQUEST_SCHEMA_JSON,
            schemas.request_fingerprint,
        ),
    ];
    for (which, file, json, fingerprint) in all {
        match only {
            Some(o) if o as u8 != which as u8 => continue,
            Some(_) => println!("{}", json.trim_end()),
            None => {
                let wire: Vec<String> = fingerprint
                    .to_le_bytes()
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                println!("# {file}");
                println!(
                    "# fingerprint (CRC-64-AVRO of the Parsing Canonical Form): {fingerprint:016x}"
                );
                println!(
                    "# on the wire after C3 01 (little-endian): {}",
                    wire.join(" ")
                );
                println!("{}", json.trim_end());
            }
        }
    }
}

fn load(config: Option<PathBuf>) -> Result<Settings, ExitCode> {
    Settings::load(&Sources::from_process(config)).map_err(|e| {
        eprintln!("paysync: {e}");
        ExitCode::from(EXIT_CONFIG as u8)
    })
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("paysync: cannot start the runtime: {e}");
            ExitCode::FAILURE
        })
}

/// Settings, warnings-only text logs and a runtime, for the one-shot commands
/// (`check`, `redrive`).
fn tool(config: Option<PathBuf>) -> Result<(Settings, tokio::runtime::Runtime), ExitCode> {
    let settings = load(config)?;
    paysync::telemetry::init_tracing(LogFormat::Text, "warn");
    Ok((settings, runtime()?))
}

/// Completes on SIGTERM or SIGINT. The handlers are installed when this is
/// called (not when the future is first polled), so a signal that arrives while
/// paysync is still starting (initializing transactions, say) is not lost to the
/// default action.
fn termination() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate()).ok();
        let int = signal(SignalKind::interrupt()).ok();
        async move {
            match (term, int) {
                (Some(mut term), Some(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {},
                        _ = int.recv() => {},
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Schema { only } => {
            print_schemas(only);
            ExitCode::SUCCESS
        }
        Command::CheckConfig { config, topics } => match load(config) {
            Ok(settings) if topics => {
                for topic in settings.topics() {
                    println!("{topic}");
                }
                ExitCode::SUCCESS
            }
            Ok(settings) => {
                print!("{}", settings.to_masked_toml());
                println!("\n# topics this configuration needs (paysync does not create them):");
                for topic in settings.topics() {
                    println!("#   {topic}");
                }
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Run { config, role } => {
            let settings = match load(config) {
                Ok(s) => s,
                Err(code) => return code,
            };
            paysync::telemetry::init_tracing(settings.log.format, &settings.log.level);
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(code) => return code,
            };
            let result = rt.block_on(async {
                let shutdown = termination();
                paysync::app::run(settings, role.into(), shutdown).await
            });
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "start-up failed");
                    eprintln!("paysync: {e}");
                    ExitCode::from(e.exit_code())
                }
            }
        }
        Command::Check {
            config,
            connector,
            merchant,
            method,
            amount,
            currency,
            timeout,
            ids,
        } => {
            let (settings, rt) = match tool(config) {
                Ok(x) => x,
                Err(code) => return code,
            };
            let args = paysync::check::CheckArgs {
                connector,
                merchant,
                method,
                amount,
                currency,
                timeout,
                ids,
            };
            let (mut all_answered, mut invalid) = (true, false);
            let mut emit = |line: paysync::check::Line| match line {
                paysync::check::Line::Checked { json, answered } => {
                    println!("{json}");
                    all_answered &= answered;
                }
                paysync::check::Line::Invalid(why) => {
                    eprintln!("paysync check: {why}");
                    invalid = true;
                }
            };
            let result = rt.block_on(paysync::check::run(&settings, &args, &mut emit));
            match result {
                Err(e) => {
                    eprintln!("paysync check: {e}");
                    ExitCode::from(EXIT_CONFIG as u8)
                }
                Ok(()) if invalid => ExitCode::from(EXIT_CONFIG as u8),
                Ok(()) if all_answered => ExitCode::SUCCESS,
                Ok(()) => ExitCode::FAILURE,
            }
        }
        Command::Redrive {
            config,
            reasons,
            max,
            dry_run,
            force,
            max_redrives,
        } => {
            let (settings, rt) = match tool(config) {
                Ok(x) => x,
                Err(code) => return code,
            };
            let options = paysync::kafka::redrive::RedriveOptions {
                reasons,
                max,
                dry_run,
                force,
                max_redrives,
            };
            // SIGINT/SIGTERM: finish and commit the batch under way, then stop.
            let stop = Arc::new(AtomicBool::new(false));
            let flag = stop.clone();
            let result = rt.block_on(async move {
                let watcher = tokio::spawn(async move {
                    termination().await;
                    eprintln!("paysync redrive: stopping after the batch under way");
                    flag.store(true, Ordering::Release);
                });
                let result = paysync::kafka::redrive::run(&settings, &options, stop).await;
                watcher.abort();
                result
            });
            match result {
                Ok(report) => {
                    print!("{report}");
                    if report.failed.is_some() {
                        ExitCode::FAILURE
                    } else if report.interrupted {
                        ExitCode::from(130)
                    } else {
                        ExitCode::SUCCESS
                    }
                }
                Err(e) => {
                    eprintln!("paysync redrive: {e}");
                    ExitCode::from(e.exit_code())
                }
            }
        }
        Command::Demo { listen, verbose } => {
            paysync::telemetry::init_tracing(
                LogFormat::Text,
                if verbose { "info" } else { "warn" },
            );
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(code) => return code,
            };
            match rt.block_on(paysync::demo::run(paysync::demo::DemoOptions { listen })) {
                Ok(summary) => {
                    println!("{summary}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("paysync demo failed: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Healthcheck {
            url,
            ready,
            config,
            timeout,
        } => {
            let url = match url {
                Some(u) => u,
                None => match load(config) {
                    Ok(settings) => paysync::server::probe_url(settings.http.listen, ready),
                    Err(code) => return code,
                },
            };
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("paysync: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(paysync::server::probe(&url, timeout)) {
                Ok(body) => {
                    println!("{url}: {body}");
                    ExitCode::SUCCESS
                }
                Err(why) => {
                    eprintln!("{url}: {why}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Simulate {
            listen,
            latency_ms,
            error_rate,
        } => {
            paysync::telemetry::init_tracing(LogFormat::Auto, "info");
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(code) => return code,
            };
            rt.block_on(async move {
                let latency = if latency_ms == 0 {
                    paysync::demo::simulator::Latency::None
                } else {
                    paysync::demo::simulator::Latency::Fixed(Duration::from_millis(latency_ms))
                };
                let options = paysync::demo::simulator::SimOptions {
                    latency,
                    error_rate: error_rate.clamp(0.0, 1.0),
                    ..Default::default()
                };
                match paysync::demo::simulator::Simulator::start(listen, options).await {
                    Ok(sim) => {
                        tracing::info!(url = %sim.base_url(), "connector simulator listening");
                        termination().await;
                        sim.stop().await;
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("paysync: {e}");
                        ExitCode::FAILURE
                    }
                }
            })
        }
    }
}

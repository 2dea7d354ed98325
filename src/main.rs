//! The `subgate` binary: parse the command line, load the configuration,
//! run the chosen subcommand.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use subgate::config::Settings;

/// A line on stderr that is lost, not a panic, when stderr is gone
/// (`eprintln!` panics on a closed pipe).
macro_rules! report {
    ($($arg:tt)*) => {{
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// jemalloc, with its background threads purging freed pages: after a
/// spike (consumers that stopped reading large events, say) the node's
/// memory goes back to the OS within seconds, where glibc's malloc kept
/// all of it (BENCHMARKS.md, "Consumers that stop reading").
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "subgate",
    version,
    about = "A horizontally scalable GraphQL subscription gateway"
)]
struct Cli {
    /// A configuration file layered over config/default.toml and config/$SUBGATE_ENV.toml.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node (the default).
    Serve,
    /// Print the GraphQL schema (SDL).
    Schema,
    /// Mint a development JWT signed with the configured secret.
    Token {
        /// The user id (`sub` claim).
        #[arg(long)]
        sub: String,
        /// Lifetime, such as 15m, 1h or 7d.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
        /// Space-separated scopes, e.g. "publish".
        #[arg(long)]
        scope: Option<String>,
    },
    /// Print the effective configuration as JSON, secrets redacted.
    Config,
    /// Exit 0 when a node's /healthz answers 200 (the container HEALTHCHECK).
    Healthcheck {
        /// The URL to probe; default: this configuration's own /healthz.
        #[arg(long)]
        url: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A probe with an explicit URL needs no configuration: it must answer
    // even where the node's own settings would not load in this shell.
    if let Some(Command::Healthcheck { url: Some(url) }) = &cli.command {
        return healthcheck(url);
    }
    let dir = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    let loaded = Settings::load(&dir, cli.config.as_deref()).and_then(|mut s| {
        // Sized to the open-files limit (raised to its hard maximum first).
        let files = subgate::config::capacity::raise_file_limit();
        s.apply_file_limit(files)?;
        Ok(s)
    });
    let settings = match loaded {
        Ok(s) => s,
        Err(errors) => {
            // One line per problem, each naming its key.
            for e in &errors.0 {
                report!("subgate: {e}");
            }
            return ExitCode::FAILURE;
        }
    };
    match cli.command.unwrap_or(Command::Serve) {
        Command::Schema => {
            use std::io::Write;
            match write!(std::io::stdout(), "{}", subgate::graphql::sdl()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(_) => ExitCode::FAILURE,
            }
        }
        Command::Token { sub, ttl, scope } => {
            let auth = match subgate::auth::Authenticator::from_settings(&settings) {
                Ok(a) => a,
                Err(e) => {
                    report!("subgate: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match auth.mint(&sub, ttl, scope.as_deref()) {
                Ok(token) => {
                    use std::io::Write;
                    match writeln!(std::io::stdout(), "{token}") {
                        Ok(()) => ExitCode::SUCCESS,
                        Err(_) => ExitCode::FAILURE,
                    }
                }
                Err(e) => {
                    report!("subgate: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Healthcheck { url } => {
            let url = url.unwrap_or_else(|| subgate::healthcheck::default_url(&settings));
            healthcheck(&url)
        }
        Command::Config => print_config(&settings),
        Command::Serve => serve(settings),
    }
}

fn healthcheck(url: &str) -> ExitCode {
    match subgate::healthcheck::check(url) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report!("subgate: unhealthy: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `subgate config`: the settings every layer added up to, as JSON, with
/// secrets redacted.
fn print_config(settings: &Settings) -> ExitCode {
    let text = serde_json::to_string_pretty(&settings.redacted()).unwrap_or_default();
    // A closed stdout (`subgate config | head -1`) is not a failure worth
    // a panic: the write is tried once and its error ends the command.
    use std::io::Write;
    match writeln!(std::io::stdout(), "{text}") {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}

/// One structured line saying what this node runs as: the environment,
/// the files layered and the effective settings (secrets redacted).
fn log_configuration(settings: &Settings) {
    let files = if settings.loaded.sources.is_empty() {
        "none (built-in defaults)".to_owned()
    } else {
        settings.loaded.sources.join(", ")
    };
    let server = &settings.server;
    tracing::info!(
        environment = settings.environment.as_str(),
        config_files = %files,
        drain_timeout_seconds = server.drain_timeout_seconds,
        drain_grace_seconds = server.drain_grace_seconds,
        max_connections = settings.connection_limit(),
        open_files_limit = settings.loaded.capacity.and_then(|c| c.files).map(|f| f.soft),
        max_sockets_per_worker = settings.loaded.capacity.map(|c| c.max_sockets_per_worker),
        redis = settings.uses_redis(),
        redis_mode = settings.redis.mode.as_str(),
        introspection = settings.introspection_enabled(),
        settings = %settings.redacted(),
        "configuration: environment {} from {files}",
        settings.environment.as_str(),
    );
}

fn serve(settings: Settings) -> ExitCode {
    subgate::telemetry::init(&settings);
    for warning in &settings.loaded.deprecations {
        tracing::warn!("configuration: {warning}");
    }
    let addr = (settings.server.host.clone(), settings.server.port);
    let listener = match std::net::TcpListener::bind((addr.0.as_str(), addr.1)) {
        Ok(l) => l,
        Err(e) => {
            subgate::telemetry::flush(std::time::Duration::from_secs(1));
            report!(
                "subgate: invalid configuration: server.port: cannot listen on {}:{}: {e}",
                addr.0,
                addr.1
            );
            return ExitCode::FAILURE;
        }
    };
    // The node is built inside the runtime: the broker starts tasks.
    let runtime = actix_web::rt::System::new();
    let result = runtime.block_on(async move {
        let state = subgate::app::build(settings).map_err(|e| e.to_string())?;
        // Once nothing in the configuration can fail any more: a refused
        // configuration stays one line per problem.
        log_configuration(&state.settings);
        subgate::app::serve(state, listener)
            .await
            .map_err(|e| e.to_string())
    });
    // Dropping the runtime would wait for its blocking threads, and one
    // may be stuck for many seconds in a DNS lookup of an unreachable Redis
    // host: the drain is over and the exit must not wait past
    // `server.drain_timeout_seconds`, so the runtime is left to the exit.
    std::mem::forget(runtime);
    // The last log lines ("stopped"), unless stderr is stalled.
    subgate::telemetry::flush(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report!("subgate: {e}");
            ExitCode::FAILURE
        }
    }
}

//! The `subgate` binary: parse the command line, load the configuration,
//! run the chosen subcommand.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use subgate::config::Settings;

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
    let settings = match Settings::load(&dir, cli.config.as_deref()) {
        Ok(s) => s,
        Err(errors) => {
            // One line per problem, each naming its key.
            for e in &errors.0 {
                eprintln!("subgate: {e}");
            }
            return ExitCode::FAILURE;
        }
    };
    match cli.command.unwrap_or(Command::Serve) {
        Command::Schema => {
            print!("{}", subgate::graphql::sdl());
            ExitCode::SUCCESS
        }
        Command::Token { sub, ttl, scope } => {
            let auth = match subgate::auth::Authenticator::from_settings(&settings) {
                Ok(a) => a,
                Err(e) => {
                    eprintln!("subgate: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match auth.mint(&sub, ttl, scope.as_deref()) {
                Ok(token) => {
                    println!("{token}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("subgate: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Healthcheck { url } => {
            let url = url.unwrap_or_else(|| subgate::healthcheck::default_url(&settings));
            healthcheck(&url)
        }
        Command::Serve => serve(settings),
    }
}

fn healthcheck(url: &str) -> ExitCode {
    match subgate::healthcheck::check(url) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("subgate: unhealthy: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(settings: Settings) -> ExitCode {
    subgate::telemetry::init(&settings);
    for warning in &settings.deprecations {
        tracing::warn!("configuration: {warning}");
    }
    let addr = (settings.server.host.clone(), settings.server.port);
    let listener = match std::net::TcpListener::bind((addr.0.as_str(), addr.1)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "subgate: invalid configuration: server.port: cannot listen on {}:{}: {e}",
                addr.0, addr.1
            );
            return ExitCode::FAILURE;
        }
    };
    // The node is built inside the runtime: the broker starts tasks.
    let runtime = actix_web::rt::System::new();
    let result = runtime.block_on(async move {
        let state = subgate::app::build(settings).map_err(|e| e.to_string())?;
        subgate::app::serve(state, listener)
            .await
            .map_err(|e| e.to_string())
    });
    // Dropping the runtime would wait for its blocking threads, and one
    // may be stuck for many seconds in a DNS lookup of an unreachable Redis
    // host: the drain is over and the exit must not wait past
    // `server.drain_timeout_seconds`, so the runtime is left to the exit.
    std::mem::forget(runtime);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("subgate: {e}");
            ExitCode::FAILURE
        }
    }
}

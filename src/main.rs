//! The `fhirwall` binary: `run` (default), `check`, `demo`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc: the request path allocates many small, short-lived objects
/// (headers, strings, futures) across worker threads; glibc malloc spent
/// ~20% of the proxy's CPU on them under load (see README, Benchmarks).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "fhirwall",
    version,
    about = "SMART on FHIR enforcement gateway"
)]
struct Cli {
    /// Log as JSON lines (to stderr).
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Run {
        #[arg(long, short, default_value = "config.yaml")]
        config: PathBuf,
    },
    /// Validate a configuration without starting; reports every problem.
    Check {
        #[arg(long, short, default_value = "config.yaml")]
        config: PathBuf,
    },
    /// Start a self-contained sandbox: gateway, synthetic FHIR server and a local issuer.
    Demo {
        /// Address of the demo gateway.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        /// Address of the demo admin listener.
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: String,
    },
}

fn init_logs(json: bool) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(cli.log_json);
    let command = cli.command.unwrap_or(Command::Run {
        config: "config.yaml".into(),
    });
    match command {
        Command::Check { config } => match fhirwall::config::load(&config) {
            Ok(s) => {
                println!(
                    "{}: OK ({} issuer(s), proxy {}, admin {}, upstream {})",
                    config.display(),
                    s.issuers.len(),
                    s.listen,
                    s.admin_listen,
                    s.upstream.addr
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        },
        Command::Run { config } => {
            let settings = match fhirwall::config::load(&config) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("{e}\nfhirwall: refusing to start");
                    return ExitCode::from(2);
                }
            };
            match fhirwall::server::run(settings) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("fhirwall: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Demo { listen, admin } => match fhirwall::demo::run(&listen, &admin) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("fhirwall demo: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

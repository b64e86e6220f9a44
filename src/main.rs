//! The `fhirwall` binary: `run` (default), `check`, `explain`, `test`, `demo`.

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

// Parsed once per process: the size of its largest variant is no cost.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Run {
        #[arg(long, short, default_value = "config.yaml")]
        config: PathBuf,
        /// Take the listening sockets over from a running fhirwall
        /// (zero-downtime restart) through `server.upgrade_sock`, once
        /// this one's keys are loaded: send the running one SIGQUIT within
        /// five seconds of the "waiting" log line, or name it with
        /// --upgrade-from.
        #[arg(long)]
        upgrade: bool,
        /// Like --upgrade, and this process sends the running one (this
        /// pid) SIGQUIT itself when it is ready.
        /// (A positive process id: kill(2) reads 0 and negative ones as
        /// process groups, -1 as every process.)
        #[arg(long, value_name = "PID", value_parser = clap::value_parser!(i32).range(1..))]
        upgrade_from: Option<i32>,
    },
    /// Validate a configuration without starting; reports every problem.
    Check {
        #[arg(long, short, default_value = "config.yaml")]
        config: PathBuf,
    },
    /// Explain how a request would be decided, stage by stage, without
    /// contacting the upstream (the token is given as its claims JSON).
    Explain {
        #[arg(long, short, default_value = "config.yaml")]
        config: PathBuf,
        /// File holding the token's claims (JSON), or for a token the
        /// gateway introspects, the introspection answer (it has `active`;
        /// judged as the gateway judges the answer)…
        #[arg(long, required_unless_present = "token")]
        claims: Option<PathBuf>,
        /// …or the token itself (a JWT: its claims are read, its signature
        /// is not checked offline); `-` reads it from standard input, which
        /// keeps a live token out of `ps` and shell history.
        #[arg(long, conflicts_with = "claims")]
        token: Option<String>,
        #[arg(long, default_value = "GET")]
        method: String,
        /// Path below the public base (`Observation?code=x`) or full URL.
        #[arg(long)]
        url: String,
        /// Request body file (a Bundle, a written resource as JSON, or a
        /// form with --content-type application/x-www-form-urlencoded).
        #[arg(long)]
        body: Option<PathBuf>,
        /// The body's media type, as the request would send it (a written
        /// Binary under a type that names no FHIR format is raw content).
        #[arg(long)]
        content_type: Option<String>,
        /// bearer, dpop or mtls (assumed verified).
        #[arg(long, default_value = "bearer")]
        binding: String,
        /// Client address, for `source` rules.
        #[arg(long)]
        source: Option<std::net::IpAddr>,
        /// A break-glass reason declared with the request.
        #[arg(long)]
        break_glass: Option<String>,
        /// A conditional create's If-None-Exist header.
        #[arg(long)]
        if_none_exist: Option<String>,
        /// When the request is made (RFC 3339, e.g. 2026-11-25T14:30:00Z),
        /// for time rules and token ages; now by default.
        #[arg(long)]
        at: Option<String>,
    },
    /// Run policy tests (`policies/tests/*.yaml` by default): each case's
    /// claims and request must get its expected decision and rule.
    Test {
        #[arg(long, short, default_value = "config.yaml")]
        config: PathBuf,
        /// Test files or directories.
        #[arg(default_value = "policies/tests")]
        paths: Vec<PathBuf>,
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

/// Libraries whose debug and trace logs print what fhirwall never logs
/// (Pingora: request headers with the Authorization token, query values,
/// body bytes; hyper and reqwest likewise): a `RUST_LOG` that turns
/// debug or trace on for everything holds them at `info`, unless it names
/// them itself.
const QUIET_BELOW_INFO: &[&str] = &[
    "pingora",
    "pingora_core",
    "pingora_proxy",
    "pingora_http",
    "hyper",
    "hyper_util",
    "h2",
    "reqwest",
];

fn init_logs(json: bool) {
    let asked = std::env::var("RUST_LOG").unwrap_or_default();
    let mut filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let verbose_for_all = asked.split(',').any(|d| {
        let d = d.trim();
        !d.contains('=')
            && d.parse::<tracing_subscriber::filter::LevelFilter>()
                .is_ok_and(|l| l > tracing_subscriber::filter::LevelFilter::INFO)
    });
    for target in QUIET_BELOW_INFO {
        let named = asked
            .split(',')
            .any(|d| d.trim().split(['=', '[']).next() == Some(target));
        if verbose_for_all && !named {
            if let Ok(d) = format!("{target}=info").parse() {
                filter = filter.add_directive(d);
            }
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The settings `explain` and `test` decide with: without the upstream's
/// lookup or the files only serving needs (keys, certificates, the audit
/// directory).
fn load_or_exit(config: &std::path::Path) -> Result<fhirwall::config::Settings, ExitCode> {
    fhirwall::config::load_offline(config).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(2)
    })
}

fn explain(
    config: &std::path::Path,
    claims: Option<&std::path::Path>,
    token: Option<&str>,
    mut req: fhirwall::explain::ExplainRequest,
    body: Option<PathBuf>,
) -> ExitCode {
    let settings = match load_or_exit(config) {
        Ok(s) => s,
        Err(c) => return c,
    };
    // `--token -`: from standard input (kept out of `ps` and history).
    let stdin_token;
    let token = match token {
        Some("-") => {
            let mut t = String::new();
            if let Err(e) = std::io::Read::read_to_string(&mut std::io::stdin(), &mut t) {
                eprintln!("--token -: standard input: {e}");
                return ExitCode::from(2);
            }
            stdin_token = t;
            Some(stdin_token.trim())
        }
        other => other,
    };
    // A token given alone is read whole, header too (`explain_token`).
    let token_only = if claims.is_none() { token } else { None };
    let parsed = match (claims, token) {
        (Some(path), _) => std::fs::read_to_string(path)
            .map_err(|e| format!("{}: {e}", path.display()))
            .and_then(|t| {
                serde_json::from_str::<serde_json::Value>(&t)
                    .map_err(|e| format!("{}: {e}", path.display()))
            }),
        (None, Some(t)) if fhirwall::token::token_kind(t) == "opaque" => {
            Err("--token: not a JWT (give its introspection answer as --claims)".to_string())
        }
        // Read below, header too.
        (None, Some(_)) => Ok(serde_json::Value::Null),
        (None, None) => Err("give --claims or --token".to_string()),
    };
    let claims = match parsed {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let body = match body.map(std::fs::read_to_string).transpose() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("body: {e}");
            return ExitCode::from(2);
        }
    };
    req.body = body;
    let e = match token_only {
        Some(t) => fhirwall::explain::explain_token(&settings, t, &req, now()),
        None => fhirwall::explain::explain(&settings, &claims, &req, now()),
    };
    for (i, (stage, verdict)) in e.stages.iter().enumerate() {
        println!("{}. {stage:<9} {verdict}", i + 1);
    }
    println!(
        "=> {}{}",
        e.decision.to_uppercase(),
        e.rule.map(|r| format!(" (rule {r})")).unwrap_or_default()
    );
    match e.decision {
        "allow" => ExitCode::SUCCESS,
        // Nothing was decided: the question itself is malformed.
        "error" => ExitCode::from(2),
        _ => ExitCode::from(1),
    }
}

fn test(config: &std::path::Path, paths: &[PathBuf]) -> ExitCode {
    let settings = match load_or_exit(config) {
        Ok(s) => s,
        Err(c) => return c,
    };
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(p)
                .into_iter()
                .flatten()
                .filter_map(|e| e.ok().map(|e| e.path()))
                // Any case, as policy files are read.
                .filter(|f| {
                    f.extension().is_some_and(|x| {
                        x.eq_ignore_ascii_case("yaml") || x.eq_ignore_ascii_case("yml")
                    })
                })
                .collect();
            found.sort();
            files.extend(found);
        } else {
            files.push(p.clone());
        }
    }
    if files.is_empty() {
        eprintln!("no policy test files found");
        return ExitCode::from(2);
    }
    let (mut cases, mut failed) = (0, 0);
    for f in files {
        let parsed = std::fs::read_to_string(&f)
            .map_err(|e| e.to_string())
            .and_then(|t| {
                serde_saphyr::from_str::<fhirwall::explain::TestFile>(&t).map_err(|e| e.to_string())
            });
        let file = match parsed {
            Ok(t) => t,
            Err(e) => {
                eprintln!("{}: {e}", f.display());
                return ExitCode::from(2);
            }
        };
        // A file without cases tests nothing: said, not passed.
        if file.cases.is_empty() {
            eprintln!(
                "{}: no cases (a test file lists them under cases:)",
                f.display()
            );
            return ExitCode::from(2);
        }
        cases += file.cases.len();
        for failure in fhirwall::explain::run_tests(&settings, &file, now()) {
            failed += 1;
            println!("FAIL {}: {failure}", f.display());
        }
    }
    println!("{} case(s), {} failed", cases, failed);
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(cli.log_json);
    let command = cli.command.unwrap_or(Command::Run {
        config: "config.yaml".into(),
        upgrade: false,
        upgrade_from: None,
    });
    match command {
        Command::Check { config } => match fhirwall::config::load(&config) {
            Ok(s) => {
                let shared = match &s.redis {
                    Some(r) => format!(", shared state in {}", r.url),
                    None => String::new(),
                };
                // How many rules were read: an emptied policy directory
                // shows here, not only once it is reloaded.
                let rules = match &s.policies_dir {
                    Some(_) => format!(", {} policy rule(s)", s.policies.rules.len()),
                    None => String::new(),
                };
                println!(
                    "{}: OK ({} issuer(s), proxy {}, admin {}, upstream {}{shared}{rules})",
                    config.display(),
                    s.issuers.len(),
                    s.listen,
                    s.admin_listen,
                    s.upstream.resolved[0]
                );
                // Valid, but weaker than it may look: said as `run` says it.
                for warning in s.warnings() {
                    eprintln!("warning: {warning}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        },
        Command::Run {
            config,
            upgrade,
            upgrade_from,
        } => {
            // A reload's SIGHUP or the handover's SIGQUIT arriving while
            // the configuration loads must not end the process.
            fhirwall::server::disarm_early_signals();
            let upgrade =
                (upgrade || upgrade_from.is_some()).then_some(fhirwall::server::Takeover {
                    from_pid: upgrade_from,
                });
            let settings = match fhirwall::config::load(&config) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("{e}\nfhirwall: refusing to start");
                    return ExitCode::from(2);
                }
            };
            match fhirwall::server::run(settings, Some(config), upgrade) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("fhirwall: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Explain {
            config,
            claims,
            token,
            method,
            url,
            body,
            content_type,
            binding,
            source,
            break_glass,
            if_none_exist,
            at,
        } => explain(
            &config,
            claims.as_deref(),
            token.as_deref(),
            fhirwall::explain::ExplainRequest {
                method,
                url,
                body: None,
                content_type,
                binding,
                source,
                break_glass,
                if_none_exist,
                at,
            },
            body,
        ),
        Command::Test { config, paths } => test(&config, &paths),
        Command::Demo { listen, admin } => match fhirwall::demo::run(&listen, &admin) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("fhirwall demo: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

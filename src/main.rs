//! The `ruyi` binary: parses the command line, loads and validates the
//! configuration, and calls into the library.

use clap::{Parser, Subcommand};
use ruyi::config::{AuthMode, Config, DEFAULT_CONFIG_TOML};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "ruyi",
    version,
    about = "A thread-per-core instant-messaging gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway until SIGINT or SIGTERM.
    Serve(ServeArgs),
    /// Print the complete default configuration, with a comment on every
    /// setting.
    PrintConfig,
    /// Print a token for a uid, signed with the configured secret.
    Token(TokenArgs),
    /// Talk to a gateway: send messages, listen for them.
    Client(ruyi::client::cli::ClientArgs),
    /// Check this machine's settings for ruyi (pass, warn or fail, with the
    /// fix). Exits non-zero on a failure.
    CheckSystem {
        /// Check against this configuration (shards, limits).
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Configuration file; settings it leaves out keep their defaults.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Overrides server.listen.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Overrides server.data_dir.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Overrides server.shards (0 = one per CPU).
    #[arg(long)]
    shards: Option<u16>,
    /// Overrides auth.secret.
    #[arg(long, env = "RUYI_AUTH_SECRET", hide_env_values = true)]
    auth_secret: Option<String>,
    /// Sets auth.mode = "off": any client may connect as any uid.
    #[arg(long)]
    auth_off: bool,
    /// Overrides api.listen (the admin HTTP API).
    #[arg(long, value_name = "ADDR")]
    http: Option<SocketAddr>,
    /// Overrides ws.listen (the WebSocket listener; off unless set).
    #[arg(long, value_name = "ADDR")]
    ws: Option<SocketAddr>,
    /// Overrides wkproto.listen (WuKongIM's protocol over TCP; off unless
    /// set).
    #[arg(long, value_name = "ADDR")]
    wkproto: Option<SocketAddr>,
    /// Overrides wkproto.ws_listen (WuKongIM's protocol over WebSocket;
    /// off unless set).
    #[arg(long, value_name = "ADDR")]
    wkproto_ws: Option<SocketAddr>,
    /// Overrides api.token.
    #[arg(long, env = "RUYI_API_TOKEN", hide_env_values = true)]
    api_token: Option<String>,
}

#[derive(Debug, clap::Args)]
struct TokenArgs {
    /// Read auth.secret from this configuration file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The secret to sign with (instead of --config).
    #[arg(long, env = "RUYI_AUTH_SECRET", hide_env_values = true)]
    secret: Option<String>,
    #[arg(long)]
    uid: String,
    /// How long the token is valid, in seconds.
    #[arg(long, default_value_t = 86_400)]
    ttl_s: u64,
}

fn init_logging(default_filter: &str) {
    let _ = tracing_log::LogTracer::init();
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUYI_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::PrintConfig => {
            print!("{DEFAULT_CONFIG_TOML}");
            ExitCode::SUCCESS
        }
        Command::Token(args) => token(args),
        Command::CheckSystem { config } => {
            let config = match load_config(config.as_ref()) {
                Ok(config) => config,
                Err(error) => {
                    eprintln!("ruyi check-system: {error}");
                    return ExitCode::FAILURE;
                }
            };
            let checks = ruyi::system::checks(&config);
            if ruyi::system::report(&checks) == ruyi::system::Verdict::Fail {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Command::Serve(args) => {
            init_logging("info");
            serve(args)
        }
        Command::Client(args) => {
            init_logging("warn");
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(error) => {
                    eprintln!("ruyi client: cannot start a runtime: {error}");
                    return ExitCode::FAILURE;
                }
            };
            let code = runtime.block_on(ruyi::client::cli::run(args));
            ExitCode::from(code.clamp(0, 255) as u8)
        }
    }
}

fn load_config(path: Option<&PathBuf>) -> Result<Config, String> {
    match path {
        Some(path) => Config::load(path).map_err(|e| e.to_string()),
        None => Ok(Config::default()),
    }
}

fn token(args: TokenArgs) -> ExitCode {
    let secret = match (args.secret, args.config.as_ref()) {
        (Some(secret), _) => secret,
        (None, Some(_)) => match load_config(args.config.as_ref()) {
            Ok(config) => config.auth.secret,
            Err(error) => {
                eprintln!("ruyi token: {error}");
                return ExitCode::FAILURE;
            }
        },
        (None, None) => {
            eprintln!("ruyi token: give --config FILE or --secret (or RUYI_AUTH_SECRET)");
            return ExitCode::from(2);
        }
    };
    if secret.is_empty() {
        eprintln!("ruyi token: the secret is empty");
        return ExitCode::FAILURE;
    }
    let now_s = ruyi::time::unix_now_ms() / 1000;
    println!(
        "{}",
        ruyi::auth::issue_token(&secret, &args.uid, now_s, args.ttl_s)
    );
    ExitCode::SUCCESS
}

fn serve(args: ServeArgs) -> ExitCode {
    ruyi::server::abort_on_panic();
    let mut config = match load_config(args.config.as_ref()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("ruyi serve: {error}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(listen) = args.listen {
        config.server.listen = listen;
    }
    if let Some(data_dir) = args.data_dir {
        config.server.data_dir = data_dir;
    }
    if let Some(shards) = args.shards {
        config.server.shards = shards;
    }
    if let Some(secret) = args.auth_secret {
        config.auth.secret = secret;
    }
    if args.auth_off {
        config.auth.mode = AuthMode::Off;
    }
    if let Some(http) = args.http {
        config.api.listen = http;
    }
    if let Some(ws) = args.ws {
        config.ws.listen = ws.to_string();
    }
    if let Some(addr) = args.wkproto {
        config.wkproto.listen = addr.to_string();
    }
    if let Some(addr) = args.wkproto_ws {
        config.wkproto.ws_listen = addr.to_string();
    }
    if let Some(token) = args.api_token {
        config.api.token = token;
    }
    let signals = match signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ]) {
        Ok(signals) => signals,
        Err(error) => {
            eprintln!("ruyi serve: cannot install signal handlers: {error}");
            return ExitCode::FAILURE;
        }
    };
    // Refuse to start on a machine that cannot run the gateway, naming the
    // fix, instead of failing somewhere deep in start-up.
    let failures: Vec<_> = ruyi::system::checks(&config)
        .into_iter()
        .filter(|c| c.verdict == ruyi::system::Verdict::Fail)
        .collect();
    if !failures.is_empty() {
        for failure in &failures {
            eprintln!(
                "ruyi serve: {} check failed ({}): {}",
                failure.name,
                failure.found,
                failure.fix.as_deref().unwrap_or("see ruyi check-system")
            );
        }
        return ExitCode::FAILURE;
    }
    let handle = match ruyi::Server::start(config) {
        Ok(handle) => handle,
        Err(error) => {
            eprintln!("ruyi serve: {error}");
            return ExitCode::FAILURE;
        }
    };
    // One plain line on stdout, so scripts (and tests that start the binary
    // on port 0) learn the address.
    println!(
        "ruyi listening on {} with {} shards",
        handle.local_addr(),
        handle.shards()
    );
    if let Some(ws) = handle.ws_addr() {
        println!("ruyi websocket on ws://{ws}{}", handle.ws_path());
    }
    if let Some(addr) = handle.wkproto_addr() {
        println!("ruyi wkproto on {addr}");
    }
    if let Some(addr) = handle.wkproto_ws_addr() {
        println!(
            "ruyi wkproto websocket on ws://{addr}{}",
            handle.wkproto_ws_path()
        );
    }
    if let Some(api) = handle.api_addr() {
        println!("ruyi admin api on http://{api}");
    }
    let mut signals = signals;
    if let Some(signal) = signals.forever().next() {
        tracing::info!(signal, "shutting down");
    }
    handle.stop();
    ExitCode::SUCCESS
}

//! Log setup shared by the daemons: `tracing` to stderr, human-readable (colored on a
//! terminal) or JSON lines; the filter comes from `RUST_LOG` (default `info`).

/// Installs the global subscriber.
pub fn init(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if json {
        fmt.json().init();
    } else {
        fmt.init();
    }
}

//! `imgd-mount`: the process that serves one lazy mount for the imgd agent, and outlives
//! it. Started by `imgd` (found next to it), not by hand.

use clap::Parser;
use imgd_core::logging::LogFormat;
use std::path::PathBuf;

/// Serves the imgd lazy mount recorded in RECORD_DIR (`DATA_DIR/mounts/ID`).
#[derive(Parser)]
#[command(name = "imgd-mount", version, about)]
struct Cli {
    /// The mount's record directory, written by the agent.
    record_dir: PathBuf,
    /// Log format: text or json.
    #[arg(long, default_value = "text", value_name = "text|json")]
    log_format: LogFormat,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    imgd_core::logging::init(cli.log_format);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            println!("error: starting the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(imgd_agent::mount_process::run(&cli.record_dir)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(_) => std::process::ExitCode::FAILURE,
    }
}

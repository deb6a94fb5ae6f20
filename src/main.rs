//! `ordersync`: parse the command line, set up logging, run the command.

use clap::Parser;

/// mimalloc: requests allocate on the async threads and free on the writer
/// thread (and back); glibc's malloc spent ~20% of upsert CPU on that
/// cross-thread traffic (see README "Performance").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = ordersync::config::Cli::parse();
    let _log = ordersync::telemetry::init_logging(&cli.log_level, cli.log_format);
    match ordersync::cli::dispatch(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

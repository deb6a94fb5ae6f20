//! `ordersync`: parse the command line, set up logging, run the command.

use clap::Parser;

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

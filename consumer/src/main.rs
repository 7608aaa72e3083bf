use std::process::ExitCode;

use clap::Parser;
use spillway_consumer::{serve, Args, Settings};

#[tokio::main]
async fn main() -> ExitCode {
    spillway_consumer::init_logging();
    let settings = match Settings::from_args(Args::parse()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("spillway-consumer: {e}");
            return ExitCode::from(2);
        }
    };
    match serve(settings).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("spillway-consumer: {e:#}");
            ExitCode::FAILURE
        }
    }
}

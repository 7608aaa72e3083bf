//! The producer and consumer child processes: the test binary, re-executed in a service role.

use anyhow::anyhow;

/// The role (`producer` or `consumer`) a re-executed test binary plays.
pub(crate) const ROLE_ENV: &str = "SPILLWAY_CHAOS_ROLE";
/// The service's command-line arguments, as a JSON array.
pub(crate) const ARGS_ENV: &str = "SPILLWAY_CHAOS_ARGS";
/// The name of the test function each chaos test binary declares to call [`child_process`].
pub(crate) const ENTRY_TEST: &str = "child_process";

/// The entry point of the producer and consumer processes a scenario starts: each chaos test
/// binary declares an ignored test named `child_process` that calls this. Re-executed as
/// `<binary> child_process --exact --ignored` with the role in `SPILLWAY_CHAOS_ROLE` and the
/// service's arguments in `SPILLWAY_CHAOS_ARGS`, it runs the same `serve` function as the
/// `spillway-producer` and `spillway-consumer` binaries and exits with its outcome. Run by hand
/// (no role), it returns at once.
pub fn child_process() {
    let Ok(role) = std::env::var(ROLE_ENV) else {
        return;
    };
    spillway_consumer::init_logging();
    let code = match serve(&role) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("spillway-{role}: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

fn serve(role: &str) -> anyhow::Result<()> {
    use clap::Parser;
    let args: Vec<String> = serde_json::from_str(&std::env::var(ARGS_ENV)?)?;
    let argv = std::iter::once(format!("spillway-{role}")).chain(args);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match role {
            "producer" => {
                let s = spillway_producer::Settings::from_args(
                    spillway_producer::Args::try_parse_from(argv)?,
                )?;
                Ok(spillway_producer::serve(s).await?)
            }
            "consumer" => {
                let s = spillway_consumer::Settings::from_args(
                    spillway_consumer::Args::try_parse_from(argv)?,
                )?;
                Ok(spillway_consumer::serve(s).await?)
            }
            other => Err(anyhow!("unknown role {other}")),
        }
    })
}

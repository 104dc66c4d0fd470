//! Logs go to stderr through `tracing`, at a level chosen by the caller once.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Installs the stderr logger; later calls keep the first logger.
pub fn init_logging(level: &str) -> Result<(), String> {
    let filter = EnvFilter::try_new(format!("meshpy_dataplane={level},warn"))
        .map_err(|e| format!("invalid log level {level:?}: {e}"))?;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
    Ok(())
}

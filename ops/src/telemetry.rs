//! Logging set-up shared by every role.

use tracing_subscriber::EnvFilter;

/// Installs the global tracing subscriber. `RUST_LOG` filters (default `info`,
/// with librdkafka's and sqlx's chatter at `warn`); `WORLDLINE_LOG_FORMAT=json`
/// switches to one JSON object per line for log shippers.
pub fn init_tracing() {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,rdkafka=warn,sqlx=warn"));
    let json = std::env::var("WORLDLINE_LOG_FORMAT").is_ok_and(|v| v == "json");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests) is harmless: the first subscriber stays.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

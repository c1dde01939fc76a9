//! Serves the query API alone, from the usual settings (defaults, then
//! `WORLDLINE__…` environment variables): what `worldline serve` does, without
//! building the other roles. Handy for `ops/check-openapi.sh`.
//!
//! `WORLDLINE__DATABASE__URL=postgres://… WORLDLINE__HTTP__LISTEN=127.0.0.1:18080 \
//!  cargo run -p worldline-query-api --example serve`

use worldline_ops::{Health, Settings};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    worldline_ops::telemetry::init_tracing();
    let settings = Settings::load(None)?;
    let shutdown = worldline_ops::shutdown::on_signals();
    let app = worldline_query_api::build(&settings, Health::default()).await?;
    let (addr, task) = worldline_ops::health::serve(settings.http.listen, app, shutdown).await?;
    println!("query API at http://{addr}/ (docs at http://{addr}/docs)");
    task.await??;
    Ok(())
}

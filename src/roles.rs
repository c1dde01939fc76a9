//! Each role, built from settings and run until shutdown.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio_util::sync::CancellationToken;
use worldline_ops::{Health, Settings};
use worldline_producers::clock::{ClockOptions, run_clock};
use worldline_producers::{Appender, AppenderOptions};
use worldline_projectors::{Projector, registry, store};
use worldline_schemas::WorldId;

async fn connect(url: &str, settings: &Settings) -> anyhow::Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(settings.database.max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect(url)
        .await
        .with_context(|| format!("connecting to PostgreSQL at {}", redact(url)))
}

/// Hides a password in a connection URL before it reaches a log line.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let credentials = &url[scheme_end + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// `worldline topics create`.
pub async fn create_topics(settings: &Settings) -> anyhow::Result<()> {
    let mut specs = worldline_ops::topics::event_topic_specs(&settings.topics);
    specs.push(worldline_ops::topics::dead_letter_topic_spec(
        &settings.topics,
    ));
    let created = worldline_ops::topics::ensure_topics(&settings.kafka, &specs).await?;
    for spec in &specs {
        let state = if created.contains(&spec.name) {
            "created"
        } else {
            "exists"
        };
        println!("{:<40} {state}", spec.name);
    }
    Ok(())
}

/// `worldline migrate`.
pub async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    let pool = connect(&settings.database.url, settings).await?;
    for projector in registry::all() {
        let schema = store::SchemaName::parse(projector.name())?;
        store::prepare_schema(&pool, &schema, projector.as_ref())
            .await
            .with_context(|| format!("migrating {}", projector.name()))?;
        println!("schema {} migrated", projector.name());
    }
    grant_reader(&pool).await;
    Ok(())
}

/// Lets the read-only role (if it exists) read every projector schema.
async fn grant_reader(pool: &PgPool) {
    for projector in registry::all() {
        let schema = projector.name();
        let statements = [
            format!("GRANT USAGE ON SCHEMA {schema} TO worldline_reader"),
            format!("GRANT SELECT ON ALL TABLES IN SCHEMA {schema} TO worldline_reader"),
            format!(
                "ALTER DEFAULT PRIVILEGES IN SCHEMA {schema} GRANT SELECT ON TABLES TO worldline_reader"
            ),
        ];
        for statement in statements {
            if let Err(error) = sqlx::query(sqlx::AssertSqlSafe(statement))
                .execute(pool)
                .await
            {
                tracing::debug!(%error, "no read-only role to grant to");
                return;
            }
        }
    }
}

/// Serves `/livez`, `/readyz`, `/metrics` for roles without an HTTP API.
async fn serve_ops(
    settings: &Settings,
    health: Health,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (addr, _task) = worldline_ops::health::serve(
        settings.ops.listen,
        worldline_ops::health::router(health),
        shutdown,
    )
    .await
    .context("binding the ops listener")?;
    tracing::info!(%addr, "health and metrics at http://{addr}/metrics");
    Ok(())
}

/// `worldline produce clock`.
pub async fn produce_clock(
    settings: &Settings,
    worlds: Vec<String>,
    ticks: Option<u64>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let worlds = if worlds.is_empty() {
        settings.clock.worlds.clone()
    } else {
        worlds
    };
    let worlds = worlds
        .iter()
        .map(|w| WorldId::parse(w).with_context(|| format!("world {w:?}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    worldline_ops::topics::verify_event_topics(&settings.kafka, &settings.topics).await?;
    let health = Health::default();
    serve_ops(settings, health.clone(), shutdown.clone()).await?;
    let appender = Appender::new(
        &settings.kafka,
        worldline_producers::clock::appender_options(&settings.topics.prefix),
    )?;
    health.set("kafka", Ok(()));
    let options = ClockOptions {
        worlds,
        tick_interval_ms: settings.clock.tick_interval_ms,
        time_scale: settings.clock.time_scale,
        max_ticks: ticks,
    };
    let positions = run_clock(&settings.kafka, &appender, &options, shutdown).await?;
    appender.flush(Duration::from_secs(10))?;
    for (world, position) in positions {
        tracing::info!(%world, tick = position.tick, "clock stopped");
    }
    Ok(())
}

fn appender_for(settings: &Settings, source: &str) -> anyhow::Result<Appender> {
    Ok(Appender::new(
        &settings.kafka,
        AppenderOptions {
            topic_prefix: settings.topics.prefix.clone(),
            source: source.to_owned(),
            ..AppenderOptions::default()
        },
    )?)
}

/// `worldline produce weather`.
pub async fn produce_weather(
    settings: &Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let health = Health::default();
    serve_ops(settings, health.clone(), shutdown.clone()).await?;
    let appender = appender_for(settings, "weather")?;
    health.set("kafka", Ok(()));
    let options = worldline_producers::weather::WeatherOptions::from_settings(settings);
    let stats =
        worldline_producers::weather::run_weather(&settings.kafka, &appender, &options, shutdown)
            .await?;
    appender.flush(Duration::from_secs(10))?;
    tracing::info!(?stats, "weather producer stopped");
    Ok(())
}

/// `worldline simulate`.
pub async fn simulate(
    settings: &Settings,
    events: Option<u64>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let health = Health::default();
    serve_ops(settings, health.clone(), shutdown.clone()).await?;
    let mut options = worldline_producers::simulate::prepare_simulation(settings).await?;
    options.max_events = events;
    let appender = appender_for(settings, "simulator")?;
    health.set("kafka", Ok(()));
    let stats =
        worldline_producers::simulate::run_simulation(&appender, &options, shutdown).await?;
    appender.flush(Duration::from_secs(10))?;
    tracing::info!(?stats, "simulator stopped");
    Ok(())
}

fn select_projectors(names: &[String]) -> anyhow::Result<Vec<Arc<dyn Projector>>> {
    if names.is_empty() {
        return Ok(registry::all());
    }
    names
        .iter()
        .map(|name| {
            registry::by_name(name).with_context(|| {
                let known: Vec<&str> = registry::all().iter().map(|p| p.name()).collect();
                format!("unknown projector {name:?}; known: {}", known.join(", "))
            })
        })
        .collect()
}

/// `worldline project`.
pub async fn project(
    settings: &Settings,
    names: &[String],
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let projectors = select_projectors(names)?;
    worldline_ops::topics::verify_event_topics(&settings.kafka, &settings.topics).await?;
    let pool = connect(&settings.database.url, settings).await?;
    let health = Health::default();
    serve_ops(settings, health.clone(), shutdown.clone()).await?;
    worldline_projectors::run_projectors(settings, pool, projectors, health, shutdown).await?;
    Ok(())
}

/// `worldline dead-letters redrive`.
pub async fn redrive(settings: &Settings, name: &str) -> anyhow::Result<()> {
    let projector = select_projectors(&[name.to_owned()])?
        .pop()
        .context("no projector selected")?;
    let pool = connect(&settings.database.url, settings).await?;
    let schema = store::SchemaName::parse(projector.name())?;
    let report = worldline_projectors::redrive::redrive(&pool, projector, &schema).await?;
    println!(
        "examined {}, applied {}, still failing {}",
        report.examined, report.applied, report.still_failing
    );
    Ok(())
}

/// Renders rebuild progress on one terminal line.
fn print_progress(
    what: &str,
) -> impl Fn(worldline_projectors::replay::Progress) + Send + Sync + '_ {
    move |progress| {
        let percent = if progress.target > 0 {
            100.0 * progress.done as f64 / progress.target as f64
        } else {
            100.0
        };
        let eta = progress
            .eta_seconds()
            .map(|s| format!("{}m{:02}s", (s as u64) / 60, (s as u64) % 60))
            .unwrap_or_else(|| "--".to_owned());
        eprint!(
            "\r{what}: {}/{} records ({percent:5.1}%)  {:>9.0} rec/s  ETA {eta}   ",
            progress.done, progress.target, progress.rate
        );
    }
}

/// `worldline replay`.
pub async fn replay(
    settings: &Settings,
    names: &[String],
    all: bool,
    abort: bool,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let projectors = if all {
        registry::all()
    } else {
        select_projectors(names)?
    };
    worldline_ops::topics::verify_event_topics(&settings.kafka, &settings.topics).await?;
    let pool = connect(&settings.database.url, settings).await?;
    let rebuilds = projectors
        .iter()
        .map(|p| {
            worldline_projectors::replay::Rebuild::new(settings, pool.clone(), p.clone(), "shadow")
        })
        .collect::<Result<Vec<_>, _>>()?;
    if abort {
        for rebuild in &rebuilds {
            rebuild.abort().await?;
            println!("dropped {}", rebuild.target().as_str());
        }
        return Ok(());
    }
    let names: Vec<&str> = projectors.iter().map(|p| p.name()).collect();
    let label = format!("replaying {}", names.join(", "));
    let outcome = worldline_projectors::replay::replay_together(
        &rebuilds,
        &print_progress(&label),
        &shutdown,
    )
    .await;
    // The progress line stays; whatever comes next starts on a line of its own.
    eprintln!();
    outcome?;
    for name in names {
        println!("{name}: rebuilt from the log and swapped in");
    }
    Ok(())
}

/// `worldline verify`.
pub async fn verify(
    settings: &Settings,
    name: &str,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let projector = select_projectors(&[name.to_owned()])?
        .pop()
        .context("no projector selected")?;
    let pool = connect(&settings.database.url, settings).await?;
    let rebuild = worldline_projectors::replay::Rebuild::new(settings, pool, projector, "verify")?;
    let label = format!("verifying {name}");
    let report = rebuild.verify(&print_progress(&label), &shutdown).await?;
    eprintln!();
    for (table, live) in &report.live {
        let rebuilt = report.rebuilt.get(table);
        let verdict = if rebuilt == Some(live) {
            "same"
        } else {
            "DIFFERENT"
        };
        println!(
            "{table:<24} live {:>9} rows {}  rebuilt {:>9} rows {}  {verdict}",
            live.rows,
            &live.digest[..12.min(live.digest.len())],
            rebuilt.map_or(0, |r| r.rows),
            rebuilt.map_or("-", |r| &r.digest[..12.min(r.digest.len())]),
        );
    }
    if report.differing.is_empty() {
        println!("{name}: the live read model equals a rebuild from the log");
        Ok(())
    } else {
        bail!(
            "{name}: tables differ from a rebuild: {}",
            report.differing.join(", ")
        )
    }
}

/// `worldline world <world> --at-tick N | --at-time T`.
pub async fn world_as_of(
    settings: &Settings,
    world: &str,
    at_tick: Option<u64>,
    at_time: Option<&str>,
) -> anyhow::Result<()> {
    use worldline_projectors::world_state::{AsOf, world_state_from_log};
    let world = WorldId::parse(world).with_context(|| format!("world {world:?}"))?;
    let as_of = match (at_tick, at_time) {
        (Some(tick), _) => AsOf::Tick(tick),
        (None, Some(time)) => AsOf::Time(
            chrono::DateTime::parse_from_rfc3339(time)
                .with_context(|| format!("--at-time {time:?} is not an RFC 3339 time"))?
                .with_timezone(&chrono::Utc),
        ),
        (None, None) => AsOf::Tick(u64::MAX),
    };
    let kafka = settings.kafka.clone();
    let prefix = settings.topics.prefix.clone();
    let state =
        tokio::task::spawn_blocking(move || world_state_from_log(&kafka, &prefix, &world, as_of))
            .await
            .context("reading the log")??;
    println!("{}", serde_json::to_string_pretty(&state)?);
    Ok(())
}

fn print_archive_progress(
    what: &'static str,
) -> impl Fn(worldline_ops::archive::ArchiveProgress) + Send + Sync {
    move |p| {
        let seconds = p.elapsed.as_secs_f64().max(0.001);
        eprint!(
            "\r{what}: {}/{} records  {:>8.0} rec/s  {:>6.1} MB/s   ",
            p.records_done,
            p.records_total,
            p.records_done as f64 / seconds,
            p.payload_bytes as f64 / seconds / 1e6
        );
    }
}

/// `worldline archive export|import`.
pub async fn archive(
    settings: &Settings,
    action: crate::cli::ArchiveAction,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    use worldline_ops::archive::{self, ExportRange, ExportRequest, ImportRequest};
    match action {
        crate::cli::ArchiveAction::Export {
            dir,
            families,
            offsets,
            from_time,
            to_time,
        } => {
            let families = families
                .iter()
                .map(|f| f.parse::<worldline_schemas::Family>())
                .collect::<Result<Vec<_>, _>>()?;
            let range = match (offsets, from_time, to_time) {
                (Some(offsets), _, _) => ExportRange::Offsets(offsets.parse()?),
                (None, None, None) => ExportRange::All,
                (None, from, to) => ExportRange::Time {
                    from_ms: from.as_deref().map(archive::parse_time_bound).transpose()?,
                    to_ms: to.as_deref().map(archive::parse_time_bound).transpose()?,
                },
            };
            let request = ExportRequest {
                dir,
                families,
                range,
            };
            let report = archive::export(
                &settings.kafka,
                &settings.topics,
                request,
                &print_archive_progress("exporting"),
                shutdown,
            )
            .await?;
            eprintln!();
            println!("{report:?}");
        }
        crate::cli::ArchiveAction::Import {
            dir,
            allow_non_empty,
        } => {
            let request = ImportRequest {
                dir,
                allow_non_empty,
            };
            let report = archive::import(
                &settings.kafka,
                &settings.topics,
                request,
                &print_archive_progress("importing"),
                shutdown,
            )
            .await?;
            eprintln!();
            println!("{report:?}");
        }
    }
    Ok(())
}

/// `worldline events dump|tail`.
pub async fn events(
    settings: &Settings,
    action: crate::cli::EventsAction,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    use worldline_ops::inspect::{DumpRequest, StartFrom};
    let (filter, mut request) = match action {
        crate::cli::EventsAction::Dump { filter, offset } => {
            let mut request = DumpRequest::dump(shutdown);
            if let Some(offset) = offset {
                request.from = StartFrom::Offset(offset);
            }
            (filter, request)
        }
        crate::cli::EventsAction::Tail { filter } => (filter, DumpRequest::tail(shutdown)),
    };
    if !filter.families.is_empty() {
        request.families = filter
            .families
            .iter()
            .map(|f| f.parse::<worldline_schemas::Family>())
            .collect::<Result<_, _>>()?;
    }
    request.world = filter
        .world
        .as_deref()
        .map(WorldId::parse)
        .transpose()
        .context("--world")?;
    request.limit = filter.limit;
    let mut out = std::io::stdout();
    worldline_ops::inspect::dump(&settings.kafka, &settings.topics, request, &mut out).await?;
    Ok(())
}

/// `worldline serve`.
pub async fn serve(settings: &Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    // The ingest gateway appends to the event topics like every producer.
    worldline_ops::topics::verify_event_topics(&settings.kafka, &settings.topics).await?;
    // Open event streams end on shutdown instead of holding the server up.
    let query =
        worldline_query_api::build_with_shutdown(settings, Health::default(), shutdown.clone())
            .await
            .context("starting the query API")?;
    if settings.auth.tokens.is_empty() {
        tracing::warn!("no auth.tokens configured: every ingest request will get 401");
    }
    let gateway = worldline_producers::gateway::GatewayState::from_settings(settings)
        .context("starting the ingest gateway")?;
    let app = query.merge(worldline_producers::gateway::router(gateway));
    let (addr, task) = worldline_ops::health::serve(settings.http.listen, app, shutdown)
        .await
        .with_context(|| format!("binding {}", settings.http.listen))?;
    tracing::info!(%addr, "query API at http://{addr}/ (OpenAPI at /openapi.json, docs at /docs)");
    task.await??;
    Ok(())
}

/// Appends `WorldCreated` for the demo world unless the worlds read model knows it.
async fn create_world_once(settings: &Settings, world: &WorldId) -> anyhow::Result<()> {
    let pool = connect(&settings.database.url, settings).await?;
    let known: Option<String> = sqlx::query_scalar(
        "SELECT display_name FROM worlds.worlds WHERE world_id = $1 AND created_at IS NOT NULL",
    )
    .bind(world.as_str())
    .fetch_optional(&pool)
    .await?
    .flatten();
    if known.is_some() {
        return Ok(());
    }
    let created = worldline_schemas::envelope::new_envelope(
        world,
        0,
        "dev",
        worldline_schemas::pb::envelope::Body::WorldCreated(worldline_schemas::pb::WorldCreated {
            display_name: format!("Demo world {world}"),
            seed: settings.weather.seed,
            time_scale: settings.clock.time_scale,
            tick_interval_ms: u32::try_from(settings.clock.tick_interval_ms).unwrap_or(u32::MAX),
            regions: settings.weather.regions.clone(),
        }),
    );
    appender_for(settings, "dev")?.append(&created).await?;
    Ok(())
}

/// `worldline dev`: every role in one process, with a demo world.
pub async fn dev(
    mut settings: Settings,
    world: &str,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let world_id = WorldId::parse(world).with_context(|| format!("world {world:?}"))?;
    create_topics(&settings).await?;
    migrate(&settings).await?;
    settings.clock.worlds = vec![world_id.to_string()];
    settings.simulate.worlds = vec![world_id.to_string()];
    if settings.auth.tokens.is_empty() {
        // Local only: one token with every scope, printed below.
        settings
            .auth
            .tokens
            .push(worldline_ops::config::StaticToken {
                name: "dev".to_owned(),
                token: "dev-token".to_owned(),
                scopes: vec!["read".to_owned(), "ingest".to_owned(), "admin".to_owned()],
                worlds: None,
            });
    }
    create_world_once(&settings, &world_id).await?;
    let listen = settings.http.listen;
    // The printed commands must work as printed: show a configured token that
    // has the scope each one needs.
    let token_with = |scope: &str| {
        settings
            .auth
            .tokens
            .iter()
            .find(|t| t.scopes.iter().any(|s| s == scope))
            .map(|t| t.token.clone())
    };
    let read_token = token_with("read");
    let ingest_token =
        token_with("ingest").unwrap_or_else(|| "<a token with scope ingest>".to_owned());
    let mut roles = tokio::task::JoinSet::new();
    {
        let settings = settings.clone();
        let shutdown = shutdown.clone();
        roles.spawn(async move { project(&settings, &[], shutdown).await });
    }
    {
        let settings = settings.clone();
        let shutdown = shutdown.clone();
        roles.spawn(async move { produce_clock(&settings, Vec::new(), None, shutdown).await });
    }
    {
        let settings = settings.clone();
        let shutdown = shutdown.clone();
        roles.spawn(async move { produce_weather(&settings, shutdown).await });
    }
    {
        let settings = settings.clone();
        let shutdown = shutdown.clone();
        roles.spawn(async move { simulate(&settings, None, shutdown).await });
    }
    {
        let settings = settings.clone();
        let shutdown = shutdown.clone();
        roles.spawn(async move { serve(&settings, shutdown).await });
    }
    println!("worldline is running with demo world \"{world_id}\".");
    match &read_token {
        Some(token) => {
            println!(
                "  query it:  curl -H 'Authorization: Bearer {token}' http://{listen}/v1/worlds/{world_id}/clock"
            );
            println!("  web page:  http://{listen}/?world={world_id}&token={token}");
        }
        None => {
            println!(
                "  query it:  curl -H 'Authorization: Bearer <a token with scope read>' http://{listen}/v1/worlds/{world_id}/clock"
            );
            println!(
                "  web page:  http://{listen}/?world={world_id} (enter a token with scope read)"
            );
        }
    }
    println!("  API docs:  http://{listen}/docs");
    println!(
        "  append:    curl -H 'Authorization: Bearer {ingest_token}' -H 'Content-Type: application/json' \\\n             -d '{{\"type\":\"StoryChoiceMade\",\"world_tick\":1,\"data\":{{\"player_id\":\"me\",\"story_id\":\"intro\",\"node_id\":\"start\",\"choice_id\":\"wave\"}}}}' \\\n             http://{listen}/v1/worlds/{world_id}/events"
    );
    println!("  metrics:   http://{listen}/metrics");
    println!("  stop:      Ctrl-C");
    let mut failure = None;
    while let Some(joined) = roles.join_next().await {
        let outcome = joined.context("role task panicked").and_then(|r| r);
        if let Err(error) = outcome {
            tracing::error!(error = %format!("{error:#}"), "role failed; stopping the others");
            shutdown.cancel();
            failure.get_or_insert(error);
        }
    }
    match failure {
        Some(error) => bail!(error),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_logs() {
        assert_eq!(
            redact("postgres://app:s3cret@db:5432/worldline"),
            "postgres://app:***@db:5432/worldline"
        );
        assert_eq!(
            redact("postgres://app@db/worldline"),
            "postgres://app@db/worldline"
        );
    }
}

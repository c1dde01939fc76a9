//! Command-line interface.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use worldline_ops::Settings;
use worldline_ops::telemetry::init_tracing;

use crate::roles;

/// Event-sourced backbone for persistent game worlds.
#[derive(Debug, Parser)]
#[command(name = "worldline", version, about)]
pub struct Cli {
    /// TOML configuration file; `WORLDLINE__SECTION__FIELD` variables override it.
    #[arg(long, global = true, env = "WORLDLINE_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create or check the event topics.
    Topics {
        #[command(subcommand)]
        action: TopicsAction,
    },
    /// Create every projector's schema and run its migrations.
    Migrate,
    /// Run a producer.
    Produce {
        #[command(subcommand)]
        producer: ProduceCommand,
    },
    /// Players making story choices and NPCs calling models, for demos and load.
    Simulate {
        /// Stop after this many events.
        #[arg(long)]
        events: Option<u64>,
    },
    /// Run projectors (all by default), building the read models from the log.
    Project {
        /// Run only these projectors.
        #[arg(long = "projector")]
        projectors: Vec<String>,
    },
    /// Rebuild a read model from the log into a shadow schema while the live one
    /// keeps serving, then swap it in (also how a new projector version ships).
    Replay {
        /// The projectors to rebuild (several are rebuilt in one pass over the log).
        #[arg(required_unless_present = "all")]
        projectors: Vec<String>,
        /// Rebuild every projector.
        #[arg(long, conflicts_with = "projectors")]
        all: bool,
        /// Drop an interrupted rebuild instead of resuming it.
        #[arg(long)]
        abort: bool,
    },
    /// Rebuild a read model into a scratch schema and compare it with the live one.
    Verify {
        /// The projector to verify.
        projector: String,
    },
    /// Print a world's full state as it was at a tick or a time, rebuilt from the log.
    World {
        /// The world.
        world: String,
        /// Fold every event up to and including this world tick.
        #[arg(long, conflicts_with = "at_time")]
        at_tick: Option<u64>,
        /// Fold every event that occurred at or before this RFC 3339 time.
        #[arg(long)]
        at_time: Option<String>,
    },
    /// Print events of the log as JSON lines, for people debugging it.
    Events {
        #[command(subcommand)]
        action: EventsAction,
    },
    /// Export event topics to Avro object container files, or import them back.
    Archive {
        #[command(subcommand)]
        action: ArchiveAction,
    },
    /// Inspect and re-drive dead letters.
    DeadLetters {
        #[command(subcommand)]
        action: DeadLettersAction,
    },
    /// Serve the HTTP query API.
    Serve,
    /// Everything in one process with a demo world: topics, migrations, clock,
    /// projectors and the API. For trying worldline out locally.
    Dev {
        /// The demo world's id.
        #[arg(long, default_value = "demo")]
        world: String,
    },
    /// GET a URL and exit 0 on a 2xx answer, 1 otherwise: a container
    /// healthcheck for images without curl, e.g. `worldline probe http://127.0.0.1:9090/readyz`.
    Probe {
        /// The URL to GET.
        url: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 5)]
        timeout_secs: u64,
    },
}

#[derive(Debug, Subcommand)]
pub enum TopicsAction {
    /// Create missing event topics (idempotent).
    Create,
    /// Check that every event topic exists and keeps history forever.
    Check,
}

#[derive(Debug, Clone, clap::Args)]
pub struct EventFilter {
    /// Only these families (repeatable; default every family).
    #[arg(long = "family")]
    pub families: Vec<String>,
    /// Only events of this world.
    #[arg(long)]
    pub world: Option<String>,
    /// Stop after this many events.
    #[arg(long)]
    pub limit: Option<u64>,
}

#[derive(Debug, Subcommand)]
pub enum EventsAction {
    /// Every event from the beginning (or --offset) to the current end.
    Dump {
        #[command(flatten)]
        filter: EventFilter,
        /// Start at this offset in every partition instead of the beginning.
        #[arg(long)]
        offset: Option<i64>,
    },
    /// New events as they are appended, until Ctrl-C.
    Tail {
        #[command(flatten)]
        filter: EventFilter,
    },
}

#[derive(Debug, Subcommand)]
pub enum ArchiveAction {
    /// Write topics (all families by default) to a new archive directory.
    Export {
        /// Directory to create the archive in (must be empty or missing).
        #[arg(long)]
        dir: std::path::PathBuf,
        /// Only these families (repeatable).
        #[arg(long = "family")]
        families: Vec<String>,
        /// Offset ranges per partition, e.g. `0=100..200,1=0..` (`P=FROM..TO`, TO
        /// exclusive; an item without `P=` applies to every partition not listed).
        #[arg(long, conflicts_with_all = ["from_time", "to_time"])]
        offsets: Option<String>,
        /// Records at or after this time (RFC 3339 or Unix milliseconds).
        #[arg(long)]
        from_time: Option<String>,
        /// Records before this time (RFC 3339 or Unix milliseconds).
        #[arg(long)]
        to_time: Option<String>,
    },
    /// Append an archive into this cluster's topics (empty ones unless allowed).
    Import {
        /// The archive directory.
        #[arg(long)]
        dir: std::path::PathBuf,
        /// Append even into topics that already hold records.
        #[arg(long)]
        allow_non_empty: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeadLettersAction {
    /// Re-apply the dead letters that decode with this build (idempotent).
    Redrive {
        /// The projector whose dead letters to re-drive.
        #[arg(long)]
        projector: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ProduceCommand {
    /// A game clock per world, resuming from the last tick in the log.
    Clock {
        /// Worlds to drive (default: the configured `clock.worlds`).
        #[arg(long = "world")]
        worlds: Vec<String>,
        /// Stop after this many ticks per world.
        #[arg(long)]
        ticks: Option<u64>,
    },
    /// Weather per region from a seeded model driven by the clock topic.
    Weather,
}

/// Parses arguments, runs the command, and maps its outcome to an exit code.
pub fn main() -> ExitCode {
    crate::memory::tune_allocator();
    let cli = Cli::parse();
    init_tracing();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let settings = Settings::load(cli.config.as_deref()).context("loading configuration")?;
    let shutdown = worldline_ops::shutdown::on_signals();
    match cli.command {
        Command::Topics {
            action: TopicsAction::Create,
        } => roles::create_topics(&settings).await,
        Command::Topics {
            action: TopicsAction::Check,
        } => {
            worldline_ops::topics::verify_event_topics(&settings.kafka, &settings.topics).await?;
            println!("event topics ok: retained forever, not compacted");
            Ok(())
        }
        Command::Migrate => roles::migrate(&settings).await,
        Command::Produce {
            producer: ProduceCommand::Clock { worlds, ticks },
        } => roles::produce_clock(&settings, worlds, ticks, shutdown).await,
        Command::Produce {
            producer: ProduceCommand::Weather,
        } => roles::produce_weather(&settings, shutdown).await,
        Command::Simulate { events } => roles::simulate(&settings, events, shutdown).await,
        Command::Project { projectors } => roles::project(&settings, &projectors, shutdown).await,
        Command::DeadLetters {
            action: DeadLettersAction::Redrive { projector },
        } => roles::redrive(&settings, &projector).await,
        Command::Replay {
            projectors,
            all,
            abort,
        } => roles::replay(&settings, &projectors, all, abort, shutdown).await,
        Command::Verify { projector } => roles::verify(&settings, &projector, shutdown).await,
        Command::World {
            world,
            at_tick,
            at_time,
        } => roles::world_as_of(&settings, &world, at_tick, at_time.as_deref()).await,
        Command::Archive { action } => roles::archive(&settings, action, shutdown).await,
        Command::Events { action } => roles::events(&settings, action, shutdown).await,
        Command::Serve => roles::serve(&settings, shutdown).await,
        Command::Dev { world } => roles::dev(settings, &world, shutdown).await,
        Command::Probe { url, timeout_secs } => {
            probe(&url, Duration::from_secs(timeout_secs)).await
        }
    }
}

/// `worldline probe`.
async fn probe(url: &str, timeout: Duration) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .context("building the HTTP client")?;
    let response = client
        .get(url)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    let status = response.status();
    if status.is_success() {
        Ok(())
    } else {
        bail!("GET {url}: {status}")
    }
}

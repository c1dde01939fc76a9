//! Layered, typed configuration: built-in defaults, then an optional TOML file,
//! then `WORLDLINE__SECTION__FIELD` environment variables (double underscore
//! between levels, e.g. `WORLDLINE__KAFKA__BOOTSTRAP_SERVERS`).
//!
//! Every role reads the same [`Settings`]; each uses the sections it needs.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// The whole configuration of a worldline process.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// How to reach Kafka and which topics to use.
    pub kafka: KafkaSettings,
    /// How to reach PostgreSQL.
    pub database: DatabaseSettings,
    /// The query API's HTTP listener.
    pub http: HttpSettings,
    /// The health and metrics listener of roles without their own HTTP API.
    pub ops: OpsSettings,
    /// Event topic layout.
    pub topics: TopicSettings,
    /// The clock producer.
    pub clock: ClockSettings,
    /// The projector runtime.
    pub projector: ProjectorSettings,
    /// The weather producer.
    pub weather: WeatherSettings,
    /// The world simulator (story choices and model inferences).
    pub simulate: SimulateSettings,
    /// The HTTP ingest gateway.
    pub gateway: GatewaySettings,
    /// Bearer tokens accepted by the HTTP roles.
    pub auth: AuthSettings,
}

/// The weather producer: a seeded model driven by clock ticks.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WeatherSettings {
    /// Seed of the weather model; with the same clock history and seed the same
    /// weather events (and event ids) come out.
    pub seed: u64,
    /// Regions with their own weather, for every world.
    pub regions: Vec<String>,
    /// Consumer group of the weather producer (it reads the clock topic).
    pub group_id: String,
}

/// The world simulator, for demos and load.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SimulateSettings {
    /// Worlds to simulate.
    pub worlds: Vec<String>,
    /// Players per world.
    pub players_per_world: u32,
    /// NPCs per world.
    pub npcs_per_world: u32,
    /// Story choices per second, across all worlds.
    pub choices_per_second: f64,
    /// Model inferences per second, across all worlds.
    pub inferences_per_second: f64,
    /// Seed of the simulation's random choices.
    pub seed: u64,
}

/// The HTTP ingest gateway.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GatewaySettings {
    /// Largest accepted request body, in bytes; larger gets 413.
    pub max_body_bytes: usize,
    /// Largest number of events in one request.
    pub max_batch_events: usize,
    /// How long an append may wait for Kafka before the request gets 503.
    pub append_timeout_ms: u64,
}

/// Bearer tokens for the HTTP roles.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSettings {
    /// Static tokens. With none configured, the HTTP roles refuse every request
    /// that needs a scope (there is no "auth off" switch by accident).
    pub tokens: Vec<StaticToken>,
    /// Signed JWTs (HS256 or RS256), for production setups with an identity
    /// provider. Absent: only the static tokens are accepted.
    pub jwt: Option<JwtSettings>,
    /// Requests per second each principal (token name or JWT subject) may make
    /// to the query API, refilled continuously; over it, 429 with `Retry-After`.
    pub rate_limit_per_second: f64,
    /// How many requests a principal may make at once above the steady rate.
    pub rate_limit_burst: u32,
}

/// Accepted JSON Web Tokens. The token's `scope` claim (space-separated:
/// `read ingest admin`) grants scopes; an optional `worlds` claim (array of
/// world ids) limits the worlds; `sub` names the principal in logs and in the
/// rate limit. `iss`, `aud` and `exp` are required; `nbf` is checked when present.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JwtSettings {
    /// The only accepted `iss`.
    pub issuer: String,
    /// The `aud` a token must name.
    pub audience: String,
    /// Shared secret for HS256 tokens (at least 32 bytes). Absent: HS256 is refused.
    #[serde(default)]
    pub hs256_secret: Option<String>,
    /// PEM public key (`BEGIN PUBLIC KEY` or `BEGIN RSA PUBLIC KEY`) for RS256
    /// tokens. Absent: RS256 is refused. At least one of the two keys is needed.
    #[serde(default)]
    pub rs256_public_key_pem: Option<String>,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds.
    #[serde(default = "default_jwt_leeway_seconds")]
    pub leeway_seconds: u64,
}

fn default_jwt_leeway_seconds() -> u64 {
    30
}

impl Default for AuthSettings {
    fn default() -> Self {
        AuthSettings {
            tokens: Vec::new(),
            jwt: None,
            rate_limit_per_second: 200.0,
            rate_limit_burst: 400,
        }
    }
}

/// One static bearer token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StaticToken {
    /// A name for logs and metrics (the token itself is never logged).
    pub name: String,
    /// The secret presented as `Authorization: Bearer <token>`.
    pub token: String,
    /// Granted scopes: `read`, `ingest`, `admin`.
    pub scopes: Vec<String>,
    /// Worlds the token may touch; absent means every world.
    #[serde(default)]
    pub worlds: Option<Vec<String>>,
}

/// Kafka connection settings shared by producers, projectors and admin commands.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaSettings {
    /// Comma-separated `host:port` list of brokers to bootstrap from.
    pub bootstrap_servers: String,
    /// Extra librdkafka properties applied to every client, e.g.
    /// `security.protocol = "SSL"`, `ssl.ca.location`, `sasl.mechanisms`,
    /// `sasl.username`. This is how TLS and SASL are switched on: the built-in
    /// settings are about delivery guarantees, these are about the cluster.
    /// They also replace the roles' tuning defaults (the projector's fetch
    /// sizes and waits, the appender's `linger.ms` and `compression.type`),
    /// but never a setting a guarantee rests on (idempotence, `acks`, the
    /// partitioner, offset handling): the roles set those over them.
    /// Because dots nest in environment keys, `_` in a key stands for `.`:
    /// `WORLDLINE__KAFKA__PROPERTIES__SECURITY_PROTOCOL=SSL` sets `security.protocol`
    /// (no librdkafka property has an underscore in its name). Values may be
    /// written as numbers or booleans (`fetch.max.bytes = 1048576`); the
    /// environment reads `1048576` as a number, and librdkafka takes text.
    #[serde(deserialize_with = "scalar_values_as_text")]
    pub properties: BTreeMap<String, String>,
}

/// A map whose values are strings, numbers or booleans, kept as their text.
fn scalar_values_as_text<'de, D>(deserializer: D) -> Result<BTreeMap<String, String>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        Text(String),
        Whole(i64),
        Real(f64),
        Switch(bool),
    }
    let raw = BTreeMap::<String, Scalar>::deserialize(deserializer)?;
    Ok(raw
        .into_iter()
        .map(|(key, value)| {
            let text = match value {
                Scalar::Text(text) => text,
                Scalar::Whole(number) => number.to_string(),
                Scalar::Real(number) => number.to_string(),
                Scalar::Switch(switch) => switch.to_string(),
            };
            (key, text)
        })
        .collect())
}

/// PostgreSQL connection settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseSettings {
    /// URL of the role that owns the read models (migrations, projectors).
    pub url: String,
    /// URL of a role that can only read, used by the query API. Falls back to
    /// `url` when unset, which is fine locally and wrong in production.
    pub reader_url: Option<String>,
    /// Largest number of pooled connections per process.
    pub max_connections: u32,
    /// Connections the query API keeps open for its handlers' single
    /// statements (point lookups, pages), lent to one statement at a time,
    /// besides its pool of `max_connections` (transactions, `LISTEN`, event
    /// streams). A statement on one of them is one round trip; through the
    /// pool it would be two, as the pool checks every connection given back.
    pub reader_connections: u32,
}

/// The query API's HTTP listener.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSettings {
    /// Address the query API listens on.
    pub listen: SocketAddr,
    /// How long a query carrying `X-Consistency-Token` waits for the projector
    /// to pass the token's offsets before answering 503.
    pub read_your_writes_timeout_ms: u64,
    /// Longest time a query API request may take (waits included); then 503.
    pub request_timeout_ms: u64,
    /// Largest request body the query API accepts, in bytes; larger gets 413.
    pub max_body_bytes: usize,
    /// `/readyz` of the query API fails while any projector behind it has more
    /// than this many records of the log still to apply (its answers would be
    /// that stale); a load balancer then prefers a fresher replica.
    pub ready_max_lag_records: u64,
    /// How often the query API re-reads every projector's stored offsets and
    /// log ends without being notified, in milliseconds. Read-your-writes waits
    /// are woken by `LISTEN`/`NOTIFY`, not by this beat; it only keeps the lag
    /// header and the `/readyz` lag check fresh while the log grows ahead of
    /// the projectors (which sends no notification).
    pub progress_refresh_ms: u64,
}

/// The `/livez`, `/readyz` and `/metrics` listener of producer and projector roles.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OpsSettings {
    /// Address to listen on; port 0 picks a free port (logged at start).
    pub listen: SocketAddr,
}

/// Layout of the event topics, provisioned by `worldline topics create`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TopicSettings {
    /// Prepended to every topic name. Empty in production; tests use a random
    /// prefix so they never see each other's events.
    pub prefix: String,
    /// Partitions per event topic. Partitions bound projector parallelism and
    /// cannot be reduced later without breaking per-world order, so err high.
    /// Each one also costs the appender a produce request per `linger.ms`
    /// (librdkafka sends one partition per request, five requests in flight
    /// per broker with idempotence): on one two-core broker at 19 000 events/s
    /// across five topics, 8 partitions each gave an acknowledgement p50 of
    /// 13–17 ms and 85–93% machine CPU, 2 each 8–9 ms and 75–79%
    /// (`BENCH_PARTITIONS`, ops/bench/project.sh). So err high for the
    /// projector instances you may run, but not far beyond them.
    pub partitions: i32,
    /// Replicas per partition: 1 on a single local broker, 3 in production.
    pub replication_factor: i32,
    /// `min.insync.replicas` for event topics: 1 locally, 2 in production so an
    /// `acks=all` write survives the loss of one broker.
    pub min_insync_replicas: i32,
}

/// The clock producer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ClockSettings {
    /// Worlds whose clocks this process drives.
    pub worlds: Vec<String>,
    /// Real milliseconds between two ticks.
    pub tick_interval_ms: u64,
    /// Game seconds per real second.
    pub time_scale: u32,
}

/// The projector runtime.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ProjectorSettings {
    /// Consumer group id prefix. A `worldline project` process runs its projectors
    /// behind one consumer, in the group `<prefix><names joined by +>`
    /// (`<prefix>clock` for `--projector clock`); instances of the same set share it.
    pub group_prefix: String,
    /// Largest number of records applied in one Postgres transaction. It binds
    /// only while a projector is behind (catching up, replaying, after an
    /// outage): live, batches close on `batch_max_wait_ms` long before they
    /// fill (100-1000 records at 24 000 events/s on the benchmark). Larger
    /// batches pay fewer commits and statements per event, and latest-state
    /// rows coalesce more: on `ops/bench/project.sh`, three timed passes each,
    /// weather caught up at 128-134k events/s with 10 000 against 101-108k with
    /// 5000 (clock, story, inference and worlds 13-50% faster too), for about
    /// 10 MiB more resident memory. At a steady 24 000 events/s the freshness
    /// p99 was within the noise either way (six alternated runs each: 144-213
    /// ms, median 158, with 10 000; 95-303 ms, median 132, with 5000).
    pub batch_max_records: usize,
    /// Longest time a partly filled batch waits for more records, in milliseconds.
    /// Bounds end-to-end freshness when traffic is light.
    pub batch_max_wait_ms: u64,
    /// Kafka group session timeout in milliseconds: how long an instance that
    /// stopped answering keeps its partitions before the group moves them.
    pub session_timeout_ms: u64,
}

impl Default for WeatherSettings {
    fn default() -> Self {
        WeatherSettings {
            seed: 7,
            regions: ["north", "south", "east", "west", "coast"]
                .map(str::to_owned)
                .to_vec(),
            group_id: "worldline.weather".to_owned(),
        }
    }
}

impl Default for SimulateSettings {
    fn default() -> Self {
        SimulateSettings {
            worlds: vec!["demo".to_owned()],
            players_per_world: 50,
            npcs_per_world: 20,
            choices_per_second: 5.0,
            inferences_per_second: 2.0,
            seed: 11,
        }
    }
}

impl Default for GatewaySettings {
    fn default() -> Self {
        GatewaySettings {
            max_body_bytes: 1024 * 1024,
            max_batch_events: 1000,
            append_timeout_ms: 5000,
        }
    }
}

impl Default for KafkaSettings {
    fn default() -> Self {
        KafkaSettings {
            bootstrap_servers: "127.0.0.1:59092".to_owned(),
            properties: BTreeMap::new(),
        }
    }
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        DatabaseSettings {
            url: "postgres://worldline@127.0.0.1:55432/worldline".to_owned(),
            reader_url: None,
            max_connections: 10,
            reader_connections: 8,
        }
    }
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            read_your_writes_timeout_ms: 2000,
            request_timeout_ms: 10_000,
            max_body_bytes: 64 * 1024,
            ready_max_lag_records: 100_000,
            progress_refresh_ms: 1000,
        }
    }
}

impl Default for OpsSettings {
    fn default() -> Self {
        OpsSettings {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        }
    }
}

impl Default for TopicSettings {
    fn default() -> Self {
        TopicSettings {
            prefix: String::new(),
            partitions: 8,
            replication_factor: 1,
            min_insync_replicas: 1,
        }
    }
}

impl Default for ClockSettings {
    fn default() -> Self {
        ClockSettings {
            worlds: vec!["demo".to_owned()],
            tick_interval_ms: 1000,
            time_scale: 60,
        }
    }
}

impl Default for ProjectorSettings {
    fn default() -> Self {
        ProjectorSettings {
            group_prefix: "worldline.projector.".to_owned(),
            batch_max_records: 10_000,
            // 10 rather than 20: under a steady live load more, smaller
            // transactions kept up with more (ops/bench/project.sh, freshness
            // only, interleaved: maximum sustainable 18.6k and 19.3k ev/s
            // against 12.8k and 14.5k) and lowered p99 at half of it.
            batch_max_wait_ms: 10,
            session_timeout_ms: 10_000,
        }
    }
}

/// Configuration that could not be loaded: a bad file, a bad variable, a wrong type.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(#[from] Box<figment::Error>);

impl KafkaSettings {
    /// The extra librdkafka properties with their real (dotted) names.
    pub fn client_properties(&self) -> Vec<(String, String)> {
        self.properties
            .iter()
            .map(|(key, value)| (key.replace('_', "."), value.clone()))
            .collect()
    }
}

impl Settings {
    /// Loads defaults, then `file` if given (it must exist), then the environment.
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Settings::default()));
        if let Some(path) = file {
            figment = figment.merge(Toml::file_exact(path));
        }
        figment = figment.merge(Env::prefixed("WORLDLINE__").split("__"));
        figment.extract().map_err(|e| ConfigError(Box::new(e)))
    }

    /// The URL the query API should use: the read-only role when configured.
    pub fn reader_url(&self) -> &str {
        self.database
            .reader_url
            .as_deref()
            .unwrap_or(&self.database.url)
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment's Jail API fixes the closure's error type
mod tests {
    use super::*;

    #[test]
    fn file_overrides_defaults_and_environment_overrides_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "worldline.toml",
                r#"
                [kafka]
                bootstrap_servers = "from-file:9092"
                [topics]
                partitions = 3
                "#,
            )?;
            jail.set_env("WORLDLINE__KAFKA__BOOTSTRAP_SERVERS", "from-env:9092");
            jail.set_env("WORLDLINE__KAFKA__PROPERTIES__SECURITY_PROTOCOL", "SSL");
            let settings =
                Settings::load(Some(Path::new("worldline.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(settings.kafka.bootstrap_servers, "from-env:9092");
            assert_eq!(settings.topics.partitions, 3);
            assert_eq!(settings.topics.replication_factor, 1);
            assert_eq!(
                settings.kafka.client_properties(),
                vec![("security.protocol".to_owned(), "SSL".to_owned())]
            );
            Ok(())
        });
    }

    #[test]
    fn given_numeric_and_boolean_client_properties_then_they_reach_librdkafka_as_text() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "worldline.toml",
                r#"
                [kafka.properties]
                "fetch.wait.max.ms" = 50
                "check.crcs" = true
                "#,
            )?;
            jail.set_env("WORLDLINE__KAFKA__PROPERTIES__FETCH_MAX_BYTES", "1048576");
            let settings =
                Settings::load(Some(Path::new("worldline.toml"))).map_err(|e| e.to_string())?;
            let mut properties = settings.kafka.client_properties();
            properties.sort();
            assert_eq!(
                properties,
                vec![
                    ("check.crcs".to_owned(), "true".to_owned()),
                    ("fetch.max.bytes".to_owned(), "1048576".to_owned()),
                    ("fetch.wait.max.ms".to_owned(), "50".to_owned()),
                ]
            );
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_errors_not_silently_ignored() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("WORLDLINE__TOPICS__PARTITIONZ", "3");
            assert!(Settings::load(None).is_err());
            Ok(())
        });
        figment::Jail::expect_with(|jail| {
            jail.set_env("WORLDLINE__TOPICS__PARTITIONS", "many");
            let err = Settings::load(None).unwrap_err().to_string().to_lowercase();
            assert!(err.contains("partitions"), "{err}");
            Ok(())
        });
    }
}

//! The event topics: their definition (one place) and idempotent provisioning.
//!
//! Event topics are the source of truth, so they are retained forever and never
//! compacted: compaction keeps one record per world and would silently erase
//! history. Roles call [`verify_event_topics`] at start and refuse to run on a
//! topic that would lose events.

use std::time::Duration;

use rdkafka::admin::{
    AdminClient, AdminOptions, ConfigResourceResult, NewTopic, ResourceSpecifier, TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;
use worldline_schemas::Family;

use crate::config::{KafkaSettings, TopicSettings};
use crate::kafka::base_client_config;

/// One topic as it must exist in the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    /// Full topic name, prefix included.
    pub name: String,
    /// Number of partitions.
    pub partitions: i32,
    /// Replication factor.
    pub replication_factor: i32,
    /// Topic-level configs set at creation.
    pub configs: Vec<(&'static str, String)>,
}

/// The event topics for every family, as configured.
pub fn event_topic_specs(settings: &TopicSettings) -> Vec<TopicSpec> {
    Family::ALL
        .into_iter()
        .map(|family| TopicSpec {
            name: family.topic(&settings.prefix),
            partitions: settings.partitions,
            replication_factor: settings.replication_factor,
            configs: vec![
                // The log is the source of truth: never delete, never compact.
                ("retention.ms", "-1".to_owned()),
                ("retention.bytes", "-1".to_owned()),
                ("cleanup.policy", "delete".to_owned()),
                (
                    "min.insync.replicas",
                    settings.min_insync_replicas.to_string(),
                ),
                // Record timestamps are the producer's: replay and archive keep
                // the time an event happened, not when the broker saw it.
                ("message.timestamp.type", "CreateTime".to_owned()),
            ],
        })
        .collect()
}

/// The dead-letter topic, where events no projector can apply are kept with the reason.
pub fn dead_letter_topic_spec(settings: &TopicSettings) -> TopicSpec {
    TopicSpec {
        name: format!("{}worldline.dead-letters.v1", settings.prefix),
        partitions: settings.partitions,
        replication_factor: settings.replication_factor,
        configs: vec![
            ("retention.ms", "-1".to_owned()),
            ("cleanup.policy", "delete".to_owned()),
            (
                "min.insync.replicas",
                settings.min_insync_replicas.to_string(),
            ),
        ],
    }
}

/// What went wrong talking to the cluster about topics.
#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    #[error("Kafka admin request failed: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("could not create topic {topic}: {code}")]
    Create {
        topic: String,
        code: RDKafkaErrorCode,
    },
    #[error("event topic {topic} is missing; run `worldline topics create` first")]
    Missing { topic: String },
    #[error(
        "event topic {topic} has {key}={actual}, so {consequence}; event topics must keep \
         every event forever ({key}={expected}), so this refuses to run. Fix the topic with \
         `kafka-configs.sh --bootstrap-server <broker> --alter --entity-type topics \
         --entity-name {topic} --add-config {key}={expected}`"
    )]
    WouldLoseEvents {
        topic: String,
        key: &'static str,
        actual: String,
        expected: &'static str,
        /// What the broker would do to the log with this setting.
        consequence: &'static str,
    },
}

fn admin_client(kafka: &KafkaSettings) -> Result<AdminClient<DefaultClientContext>, TopicError> {
    Ok(base_client_config(kafka, "worldline-admin").create()?)
}

fn admin_options() -> AdminOptions {
    AdminOptions::new()
        .request_timeout(Some(Duration::from_secs(30)))
        .operation_timeout(Some(Duration::from_secs(30)))
}

/// Creates every missing topic in `specs`; existing topics are left alone.
/// Returns the names that were created.
pub async fn ensure_topics(
    kafka: &KafkaSettings,
    specs: &[TopicSpec],
) -> Result<Vec<String>, TopicError> {
    let admin = admin_client(kafka)?;
    let new_topics: Vec<NewTopic<'_>> = specs
        .iter()
        .map(|spec| {
            spec.configs.iter().fold(
                NewTopic::new(
                    &spec.name,
                    spec.partitions,
                    TopicReplication::Fixed(spec.replication_factor),
                ),
                |topic, (key, value)| topic.set(key, value),
            )
        })
        .collect();
    let mut created = Vec::new();
    for result in admin.create_topics(&new_topics, &admin_options()).await? {
        match result {
            Ok(name) => created.push(name),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(TopicError::Create { topic, code }),
        }
    }
    if !created.is_empty() {
        wait_for_leaders(kafka, &created).await?;
    }
    Ok(created)
}

/// A freshly created topic answers "not leader" until the controller has
/// elected leaders for its partitions; wait for that so the caller's first
/// produce or watermark query does not fail.
async fn wait_for_leaders(kafka: &KafkaSettings, topics: &[String]) -> Result<(), TopicError> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let kafka = kafka.clone();
    let topics = topics.to_vec();
    let probe = move || -> Result<(), TopicError> {
        let consumer: BaseConsumer = base_client_config(&kafka, "worldline-admin").create()?;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        for topic in &topics {
            loop {
                let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(5))?;
                let ready = metadata.topics().iter().all(|t| {
                    t.error().is_none()
                        && !t.partitions().is_empty()
                        && t.partitions()
                            .iter()
                            .all(|p| p.error().is_none() && p.leader() >= 0)
                });
                if ready || std::time::Instant::now() > deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    };
    tokio::task::spawn_blocking(probe)
        .await
        .map_err(|_| TopicError::Kafka(rdkafka::error::KafkaError::Canceled))?
}

/// Checks that every event topic exists and keeps history forever: unlimited
/// retention in time and size, and no compaction.
pub async fn verify_event_topics(
    kafka: &KafkaSettings,
    topics: &TopicSettings,
) -> Result<(), TopicError> {
    let admin = admin_client(kafka)?;
    let names: Vec<String> = event_topic_specs(topics)
        .into_iter()
        .map(|s| s.name)
        .collect();
    let resources: Vec<ResourceSpecifier<'_>> =
        names.iter().map(|n| ResourceSpecifier::Topic(n)).collect();
    let results = admin.describe_configs(&resources, &admin_options()).await?;
    for (name, result) in names.iter().zip(results) {
        let resource: ConfigResourceResult = result;
        let resource = match resource {
            Ok(resource) => resource,
            Err(RDKafkaErrorCode::UnknownTopicOrPartition) => {
                return Err(TopicError::Missing {
                    topic: name.clone(),
                });
            }
            Err(code) => {
                return Err(TopicError::Kafka(rdkafka::error::KafkaError::AdminOp(code)));
            }
        };
        let value_of = |key: &str| {
            resource
                .get(key)
                .and_then(|entry| entry.value.clone())
                .unwrap_or_default()
        };
        let required = [
            (
                "retention.ms",
                "-1",
                "the broker deletes events once they are older than that",
            ),
            (
                "retention.bytes",
                "-1",
                "the broker deletes the oldest events once a partition is larger than that",
            ),
            (
                "cleanup.policy",
                "delete",
                "compaction keeps only the latest event of each world and erases the rest",
            ),
        ];
        for (key, expected, consequence) in required {
            let actual = value_of(key);
            if actual != expected {
                return Err(TopicError::WouldLoseEvents {
                    topic: name.clone(),
                    key,
                    actual,
                    expected,
                    consequence,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_gets_a_forever_retained_uncompacted_topic() {
        let settings = TopicSettings {
            prefix: "t.".to_owned(),
            ..TopicSettings::default()
        };
        let specs = event_topic_specs(&settings);
        assert_eq!(specs.len(), Family::ALL.len());
        for spec in specs {
            assert!(spec.name.starts_with("t.worldline."), "{}", spec.name);
            assert!(spec.configs.contains(&("retention.ms", "-1".to_owned())));
            assert!(
                spec.configs
                    .contains(&("cleanup.policy", "delete".to_owned()))
            );
        }
    }
}

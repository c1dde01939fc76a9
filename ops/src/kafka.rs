//! The librdkafka settings every worldline client shares.

use rdkafka::ClientConfig;

use crate::config::KafkaSettings;

/// A client config with the cluster address, a client id, and the operator's extra
/// properties (TLS, SASL) applied last so they win. Role-specific settings
/// (idempotence, offsets) are added by the role on top.
pub fn base_client_config(kafka: &KafkaSettings, client_id: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &kafka.bootstrap_servers)
        // Names the process in broker logs and quotas.
        .set("client.id", client_id)
        // librdkafka logs through the `log`/`tracing` bridge; keep its own noise down.
        .set("log_level", "4");
    for (key, value) in kafka.client_properties() {
        config.set(key, value);
    }
    config
}

/// Sets each of `defaults` that `config` (the operator's `kafka.properties`
/// included) does not set already: tuning an operator may override, unlike the
/// settings a role's guarantees rest on, which it sets unconditionally.
pub fn set_defaults(config: &mut ClientConfig, defaults: &[(&str, &str)]) {
    for (key, value) in defaults {
        if config.get(key).is_none() {
            config.set(*key, *value);
        }
    }
}

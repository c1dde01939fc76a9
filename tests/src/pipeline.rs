//! The write side and the read side of a test's slice of the stack: events
//! appended to its topics, and the projectors that turn them into read models,
//! waited on until they have applied every record.

use std::time::Duration;

use worldline_producers::{Appender, AppenderOptions};
use worldline_projectors::{Projector, registry};
use worldline_schemas::pb::Envelope;

use crate::{Running, TestEnv, eventually};

/// How long a projector may take to reach the end of its topics before a
/// test gives up (a guard against hanging, not a performance assertion).
pub const CATCH_UP: Duration = Duration::from_secs(60);

impl TestEnv {
    /// An appender for this test's topics.
    pub fn appender(&self) -> Appender {
        self.appender_with(AppenderOptions::default())
    }

    /// An appender for this test's topics, with `options` otherwise.
    pub fn appender_with(&self, options: AppenderOptions) -> Appender {
        Appender::new(
            &self.settings.kafka,
            AppenderOptions {
                topic_prefix: self.settings.topics.prefix.clone(),
                ..options
            },
        )
        .expect("appender")
    }

    /// Appends `events` through an appender of its own.
    pub async fn append(&self, events: &[Envelope]) {
        append(&self.appender(), events).await;
    }

    /// Every projector of the registry, running in the background.
    pub fn start_all_projectors(&self) -> Vec<Running> {
        registry::all()
            .into_iter()
            .map(|projector| self.start_projector(projector))
            .collect()
    }

    /// Waits until `projector`'s stored offsets reach the end of its topics.
    pub async fn wait_caught_up(&self, projector: &dyn Projector) {
        eventually(
            CATCH_UP,
            &format!("{} to catch up", projector.name()),
            || async move {
                self.caught_up(projector.name(), projector)
                    .await
                    .then_some(())
            },
        )
        .await;
    }

    /// Waits until every projector of the registry has caught up.
    pub async fn wait_all_caught_up(&self) {
        for projector in registry::all() {
            self.wait_caught_up(projector.as_ref()).await;
        }
    }
}

/// Appends `events` and fails the test unless every one was acknowledged.
pub async fn append(appender: &Appender, events: &[Envelope]) {
    for result in appender.append_batch(events).await {
        result.expect("append");
    }
}

/// Stops each projector and waits until it has.
pub async fn stop_all(projectors: Vec<Running>) {
    for running in projectors {
        running.stop().await;
    }
}

/// A test's environment with an appender and the projectors it runs.
#[derive(Debug)]
pub struct Pipeline {
    pub env: TestEnv,
    pub appender: Appender,
    pub projectors: Vec<Running>,
}

impl Pipeline {
    /// An appender on `env`; no projector running yet.
    pub fn new(env: TestEnv) -> Pipeline {
        let appender = env.appender();
        Pipeline {
            env,
            appender,
            projectors: Vec::new(),
        }
    }

    /// Every projector running on `env`, nothing appended yet.
    pub fn running(env: TestEnv) -> Pipeline {
        let mut pipeline = Pipeline::new(env);
        pipeline.start_projectors();
        pipeline
    }

    /// `history` appended first, then every projector started and caught up
    /// with it.
    pub async fn over(env: TestEnv, history: &[Envelope]) -> Pipeline {
        let mut pipeline = Pipeline::new(env);
        pipeline.append(history).await;
        pipeline.start_projectors();
        pipeline.env.wait_all_caught_up().await;
        pipeline
    }

    /// Starts every projector of the registry.
    pub fn start_projectors(&mut self) {
        self.projectors = self.env.start_all_projectors();
    }

    /// Appends `events` without waiting for the projectors.
    pub async fn append(&self, events: &[Envelope]) {
        append(&self.appender, events).await;
    }

    /// Appends `events` and waits until every projector has applied them.
    pub async fn apply(&self, events: &[Envelope]) {
        self.append(events).await;
        self.env.wait_all_caught_up().await;
    }

    /// Stops the projectors `keep` does not name; the others go on running.
    pub async fn stop_projectors_except(&mut self, keep: impl Fn(&str) -> bool) {
        let (kept, stopped) = std::mem::take(&mut self.projectors)
            .into_iter()
            .partition(|running| keep(running.name()));
        self.projectors = kept;
        stop_all(stopped).await;
    }

    /// Stops every projector; the environment stays.
    pub async fn stop_projectors(&mut self) {
        stop_all(std::mem::take(&mut self.projectors)).await;
    }

    /// Stops every projector, then drops the test's database and topics.
    pub async fn stop(mut self) {
        self.stop_projectors().await;
        self.env.cleanup().await;
    }
}

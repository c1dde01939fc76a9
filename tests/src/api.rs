//! The HTTP side of a test: a router (mostly the query API as `worldline
//! serve` builds it) on a free loopback port, the tokens it accepts, the
//! read-only database role it may run on, and a client for it.

use std::net::SocketAddr;

use axum::Router;
use reqwest::Url;
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use worldline_ops::config::StaticToken;
use worldline_ops::{Health, Settings};

/// The role the stack scripts create for the query API.
pub const READER_ROLE: &str = "worldline_reader";

/// A static token named `name` with `secret`, `scopes`, and `worlds` (every
/// world when `None`).
pub fn token(name: &str, secret: &str, scopes: &[&str], worlds: Option<&[&str]>) -> StaticToken {
    StaticToken {
        name: name.to_owned(),
        token: secret.to_owned(),
        scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        worlds: worlds.map(|ws| ws.iter().map(|w| (*w).to_owned()).collect()),
    }
}

/// A token that may read every world.
pub fn read_token(name: &str, secret: &str) -> StaticToken {
    token(name, secret, &["read"], None)
}

/// The reader's URL for a test's database: the stack's reader URL when the
/// environment has one (its user and password), else the owner's URL with the
/// reader's name (the stack scripts give both roles the same password).
pub fn reader_url(owner_url: &str) -> String {
    let mut url = Url::parse(owner_url).expect("owner URL");
    let configured = std::env::var("WORLDLINE__DATABASE__READER_URL")
        .ok()
        .and_then(|u| Url::parse(&u).ok());
    let (user, password) = match &configured {
        Some(reader) if reader.username() == READER_ROLE => (
            reader.username().to_owned(),
            reader.password().map(str::to_owned),
        ),
        _ => (READER_ROLE.to_owned(), url.password().map(str::to_owned)),
    };
    url.set_username(&user).expect("reader user");
    url.set_password(password.as_deref())
        .expect("reader password");
    url.into()
}

/// The `content-type` of `response`, empty when it has none.
pub fn content_type(response: &reqwest::Response) -> String {
    response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().expect("a textual content-type").to_owned())
        .unwrap_or_default()
}

/// The projectors a `/v1/projectors` answer lists, by name, in its order.
pub fn listed_projectors(body: &Value) -> Vec<&str> {
    body["projectors"]
        .as_array()
        .expect("a list of projectors")
        .iter()
        .map(|p| p["projector"].as_str().expect("a projector name"))
        .collect()
}

/// Every projector of the registry by name, in the order `/v1/projectors`
/// lists them.
pub fn registered_projectors() -> Vec<&'static str> {
    let mut names: Vec<&str> = worldline_projectors::registry::all()
        .iter()
        .map(|p| p.name())
        .collect();
    names.sort_unstable();
    names
}

/// A router served on a free loopback port until `shutdown` fires.
#[derive(Debug)]
pub struct Server {
    pub addr: SocketAddr,
    /// `http://<addr>`, without a trailing slash.
    pub base: String,
    pub http: reqwest::Client,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<std::io::Result<()>>,
}

impl Server {
    /// Serves `router`; `shutdown` ends the server (and whatever else the
    /// router was given it for, such as open event streams).
    pub async fn start(router: Router, shutdown: CancellationToken) -> Server {
        let (addr, task) = worldline_ops::health::serve(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            router,
            shutdown.clone(),
        )
        .await
        .expect("serve on a loopback port");
        Server {
            addr,
            base: format!("http://{addr}"),
            http: reqwest::Client::new(),
            shutdown,
            task,
        }
    }

    /// The query API as `worldline serve` builds it from `settings`: every
    /// `/v1` route behind the guards, open streams ended on shutdown.
    pub async fn query_api(settings: &Settings) -> Server {
        let shutdown = CancellationToken::new();
        let app =
            worldline_query_api::build_with_shutdown(settings, Health::default(), shutdown.clone())
                .await
                .expect("build the query API");
        Server::start(app, shutdown).await
    }

    /// The URL of `path` (which starts with `/`) on this server.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A URL from path segments (each percent-encoded as needed) and query pairs.
    pub fn url_of(&self, segments: &[&str], query: &[(&str, &str)]) -> Url {
        let mut url = Url::parse(&self.base).expect("base URL");
        url.path_segments_mut()
            .expect("a base URL has a path")
            .extend(segments);
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        url
    }

    /// GETs `path`, with `token` as the bearer token when there is one.
    pub async fn get(&self, path: &str, token: Option<&str>) -> reqwest::Response {
        let mut request = self.http.get(self.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.expect("request")
    }

    /// Asks the server to shut down, without waiting for it.
    pub fn stop(&self) {
        self.shutdown.cancel();
    }

    /// Shuts the server down and waits until it has finished: a server that
    /// does not (an open stream holding it up) fails the test.
    pub async fn join(self) {
        self.shutdown.cancel();
        tokio::time::timeout(std::time::Duration::from_secs(30), self.task)
            .await
            .expect("the server finishes after shutdown")
            .expect("server task")
            .expect("server ran without error");
    }
}

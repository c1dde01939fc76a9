//! The web page at `/`, opened in headless Chromium (Debian `chromium`) against
//! the API as `worldline serve` builds it (bearer auth on every `/v1` route),
//! over read models filled by the real pipeline: without a token the page says
//! 401; with `?token=` it shows the world, its clock and weather, story and
//! inference statistics and every projector's position, lag and dead letters
//! (from `/v1/projectors`, as the API reads them from PostgreSQL), and updates
//! live when new events are projected.
//!
//! Chromium is driven over the DevTools protocol (a minimal WebSocket client
//! below) because only a live page can show a live update; `--dump-dom` dumps
//! once, at a moment that depends on virtual time.
//!
//! Without `/usr/bin/chromium` the test is skipped with a message, unless `CI`
//! is set, where a missing browser is a failure.

#![allow(clippy::unwrap_used)] // a failed step should fail the test loudly

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use worldline_schemas::pb::{
    Envelope, InferenceOutcome, InferencePurpose, Season, WeatherCondition,
};
use worldline_schemas::{Family, WorldId};
use worldline_tests::api::{Server, listed_projectors, read_token, registered_projectors};
use worldline_tests::fixture::{self, c, i};
use worldline_tests::pipeline::Pipeline;
use worldline_tests::{TestEnv, eventually};

const CHROMIUM: &str = "/usr/bin/chromium";

/// The read token the page is opened with.
const TOKEN: &str = "page-read-token";

/// Flags that keep headless Chromium quiet, local and reproducible.
const CHROMIUM_FLAGS: [&str; 9] = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
];

/// Whether the browser is here; without it, skip locally and fail in CI.
fn chromium_present() -> bool {
    if Path::new(CHROMIUM).exists() {
        return true;
    }
    let in_ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false");
    assert!(
        !in_ci,
        "{CHROMIUM} is missing and CI is set: install it with `apt-get install -y chromium`"
    );
    eprintln!(
        "SKIPPED web_page: {CHROMIUM} is missing (install with `apt-get install -y chromium`)"
    );
    false
}

fn created(world: &WorldId, name: &str) -> Envelope {
    fixture::world_created(world, name, 7, &["north", "coast"])
}

fn tick(world: &WorldId, tick: u64) -> Envelope {
    fixture::clock_ticked(world, tick, 0, Season::Summer)
}

fn weather(world: &WorldId, tick: u64, region: &str, condition: WeatherCondition) -> Envelope {
    let previous = WeatherCondition::Unspecified;
    fixture::weather_changed(world, tick, region, condition, previous, 215, 42)
}

/// The pipeline and the API, running.
struct Served {
    pipeline: Pipeline,
    server: Server,
}

impl Served {
    async fn start(initial: &[Envelope]) -> Served {
        let mut env = TestEnv::new(1).await;
        env.settings.auth.tokens.push(read_token("page", TOKEN));
        let pipeline = Pipeline::running(env);
        // As `worldline serve` builds it: every `/v1` route needs a token, and no
        // projector runs inside the API.
        let server = Server::query_api(&pipeline.env.settings).await;
        pipeline.apply(initial).await;
        Served { pipeline, server }
    }

    /// A record no build can decode, on the weather topic: the projectors
    /// reading weather dead-letter it.
    async fn poison(&self) {
        self.pipeline
            .env
            .send_raw(Family::Weather, "emberfall", &[0xde, 0xad, 0xbe, 0xef])
            .await;
        self.append(&[]).await;
    }

    /// A `/v1` answer, with the page's token.
    async fn api(&self, path: &str) -> Value {
        let response = self.server.get(path, Some(TOKEN)).await;
        assert!(
            response.status().is_success(),
            "{path}: {}",
            response.status()
        );
        response.json().await.unwrap()
    }

    async fn append(&self, events: &[Envelope]) {
        self.pipeline.apply(events).await;
    }

    async fn stop(self) {
        self.server.stop();
        self.pipeline.stop().await;
    }
}

// ---------------------------------------------------------------------------
// A minimal DevTools client: one WebSocket to one page target.
// ---------------------------------------------------------------------------

struct Browser {
    child: Child,
    _profile: TempDir,
    port: u16,
}

/// A directory removed on drop.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Browser {
    async fn launch() -> Browser {
        let profile = std::env::temp_dir().join(format!("wl-chromium-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&profile).unwrap();
        let mut child = Command::new(CHROMIUM)
            .args(CHROMIUM_FLAGS)
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("--remote-debugging-port=0")
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let port = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(url) = line.strip_prefix("DevTools listening on ws://127.0.0.1:") {
                    return url.split('/').next().unwrap().parse::<u16>().unwrap();
                }
            }
            panic!("chromium exited before listening");
        })
        .await
        .expect("chromium to start");
        // Keep draining stderr so the browser never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Browser {
            child,
            _profile: TempDir(profile),
            port,
        }
    }

    /// The DevTools connection of the first page target.
    async fn page(&self) -> Page {
        let targets: Value = reqwest::get(format!("http://127.0.0.1:{}/json/list", self.port))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let url = targets
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["type"] == "page")
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .unwrap()
            .to_owned();
        Page::connect(&url).await
    }

    async fn close(mut self) {
        let _ = self.child.kill().await;
    }
}

/// One page target's DevTools session over a hand-rolled WebSocket (text
/// frames only, which is all the protocol uses).
struct Page {
    socket: TcpStream,
    next_id: u64,
}

impl Page {
    async fn connect(url: &str) -> Page {
        let rest = url.strip_prefix("ws://").unwrap();
        let (host, path) = rest.split_once('/').unwrap();
        let mut socket = TcpStream::connect(host).await.unwrap();
        let handshake = format!(
            "GET /{path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        socket.write_all(handshake.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            head.push(socket.read_u8().await.unwrap());
        }
        let head = String::from_utf8_lossy(&head);
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        Page { socket, next_id: 1 }
    }

    async fn send_frame(&mut self, payload: &[u8]) {
        // Clients must mask; the key's value does not matter to the server.
        let mask = [0x5a_u8, 0xc3, 0x11, 0x7e];
        let mut frame = vec![0x81];
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n if n <= 0xffff => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.socket.write_all(&frame).await.unwrap();
    }

    /// The next complete text message.
    async fn read_message(&mut self) -> String {
        let mut message = Vec::new();
        loop {
            let first = self.socket.read_u8().await.unwrap();
            let second = self.socket.read_u8().await.unwrap();
            let len = match second & 0x7f {
                126 => u64::from(self.socket.read_u16().await.unwrap()),
                127 => self.socket.read_u64().await.unwrap(),
                n => u64::from(n),
            };
            let mut payload = vec![0; usize::try_from(len).unwrap()];
            self.socket.read_exact(&mut payload).await.unwrap();
            match first & 0x0f {
                0x0..=0x2 => message.extend_from_slice(&payload),
                0x8 => panic!("DevTools closed the connection"),
                _ => continue, // ping/pong
            }
            if first & 0x80 != 0 {
                return String::from_utf8(message).unwrap();
            }
        }
    }

    /// Sends a command and returns its `result`, skipping events.
    async fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let command = json!({"id": id, "method": method, "params": params}).to_string();
        self.send_frame(command.as_bytes()).await;
        loop {
            let reply: Value = serde_json::from_str(&self.read_message().await).unwrap();
            if reply["id"] == id {
                assert!(reply["error"].is_null(), "{method}: {reply}");
                return reply["result"].clone();
            }
        }
    }

    /// Evaluates `expression` in the page and returns its value.
    async fn eval(&mut self, expression: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true}),
            )
            .await;
        result["result"]["value"].clone()
    }

    /// The page's text once `expression` evaluates to `expected`.
    async fn wait_for(&mut self, what: &str, expression: &str, expected: &Value) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let value = self.eval(expression).await;
            if &value == expected {
                return self
                    .eval("document.body.innerText")
                    .await
                    .as_str()
                    .unwrap()
                    .to_owned();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: {expression} is {value}, wanted {expected}; page: {}",
                self.eval("document.body.innerText").await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The projector lag panel as `[[projector, applied, behind, dead letters]]`.
const LAG_ROWS: &str = "JSON.stringify([...document.querySelectorAll('#lag tr[data-projector]')]\
    .map((r) => [r.dataset.projector, r.querySelector('.position').textContent,\
    r.querySelector('.lag').textContent, r.querySelector('.dead').textContent]))";

/// What the lag panel must show for a `/v1/projectors` answer.
fn lag_rows(status: &Value) -> Value {
    let rows: Vec<Value> = status["projectors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            json!([
                p["projector"],
                p["position"].to_string(),
                p["lag_records"].to_string(),
                p["dead_letters"]["pending"].to_string(),
            ])
        })
        .collect();
    json!(Value::Array(rows).to_string())
}

/// Waits until every projector has applied its whole log and an instance has
/// observed its log ends, then returns `/v1/projectors`.
async fn settled_projectors(served: &Served) -> Value {
    eventually(
        Duration::from_secs(30),
        "every projector to report its log ends and no lag",
        || async {
            let status = served.api("/v1/projectors").await;
            status["projectors"]
                .as_array()?
                .iter()
                .all(|p| p["log_ends_observed_at"].is_string() && p["lag_records"] == 0)
                .then_some(status)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_a_world_its_stats_and_projector_lag_and_updates_live() {
    if !chromium_present() {
        return;
    }
    use InferenceOutcome::Timeout;
    use InferencePurpose::{Narration, NpcDialogue};
    use WeatherCondition::{Clear, Rain};
    let ember = WorldId::parse("emberfall").unwrap();
    let frost = WorldId::parse("frostholm").unwrap();
    let mut initial = vec![created(&ember, "Emberfall"), created(&frost, "Frostholm")];
    initial.extend((1..=12).map(|t| tick(&ember, t)));
    initial.push(tick(&frost, 1));
    initial.push(weather(&ember, 3, "north", Clear));
    initial.push(weather(&ember, 9, "coast", Rain));
    for spec in [
        c(2, "ayla", "lost-caravan", "start", "help", "camp"),
        c(3, "bren", "lost-caravan", "start", "ignore", ""),
        c(5, "ayla", "lost-caravan", "camp", "rest", "ambush"),
    ] {
        initial.push(fixture::choice(&ember, &spec));
    }
    for (n, spec) in [
        i(
            0,
            "npc-chat",
            NpcDialogue,
            "innkeeper",
            40,
            InferenceOutcome::Ok,
        ),
        i(5, "npc-chat", NpcDialogue, "smith", 900, Timeout),
        i(10, "narrator", Narration, "", 1200, InferenceOutcome::Ok),
    ]
    .iter()
    .enumerate()
    {
        initial.push(fixture::inference(&ember, n as u64 + 1, spec));
    }
    let served = Served::start(&initial).await;
    served.poison().await;

    let browser = Browser::launch().await;
    let mut page = browser.page().await;
    page.call("Runtime.enable", json!({})).await;

    // Without a token every `/v1` request is refused, and the page says so.
    let url = format!("{}/?world=emberfall", served.server.base);
    page.call("Page.navigate", json!({"url": url})).await;
    let refused = "document.getElementById('error').textContent.startsWith('401')";
    let text = page.wait_for("a 401", refused, &json!(true)).await;
    assert!(!text.contains("Emberfall (emberfall)"), "{text}");

    // With `?token=`, sent as a bearer token on every request.
    let url = format!("{}/?world=emberfall&token={TOKEN}", served.server.base);
    page.call("Page.navigate", json!({"url": url})).await;

    // Given the page open on a world: its name, the other world, the clock
    // and both regions' weather.
    let clock = "document.getElementById('clock-tick').textContent";
    let text = page.wait_for("the clock", clock, &json!("12")).await;
    let text = if text.contains("coast") {
        text
    } else {
        let regions = "document.querySelectorAll('#weather tr[data-region]').length";
        page.wait_for("both regions", regions, &json!(2)).await
    };
    assert!(text.contains("Emberfall (emberfall)"), "{text}");
    assert!(text.contains("Frostholm"), "{text}");
    assert!(text.contains("north") && text.contains("clear"), "{text}");
    assert!(text.contains("coast") && text.contains("rain"), "{text}");
    assert!(text.contains("summer"), "{text}");
    assert_eq!(
        page.eval("document.getElementById('error').hidden").await,
        json!(true),
        "no error with the token"
    );
    assert_eq!(
        page.eval("location.search.includes('token')").await,
        json!(false),
        "the token is taken out of the address bar"
    );
    let live = "document.getElementById('live').textContent";
    page.wait_for("the stream to be open", live, &json!("live"))
        .await;

    // Story: the world's choice count and its latest choices, newest first.
    let story_count = "document.getElementById('story-count').textContent";
    page.wait_for("the choice count", story_count, &json!("3"))
        .await;
    let choices = "JSON.stringify([...document.querySelectorAll('#choices tr')]\
        .map((r) => [...r.cells].map((c) => c.textContent)))";
    let expected_choices = json!(
        json!([
            ["5", "ayla", "lost-caravan", "camp → rest"],
            ["3", "bren", "lost-caravan", "start → ignore"],
            ["2", "ayla", "lost-caravan", "start → help"],
        ])
        .to_string()
    );
    page.wait_for("the choices", choices, &expected_choices)
        .await;

    // Inference: per model and purpose, the counts and latency percentiles
    // the stats endpoint computes.
    let stats = served
        .api("/v1/worlds/emberfall/inference/stats?limit=500")
        .await;
    let expected_stats: Vec<Value> = stats["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            json!([
                s["model_id"],
                s["purpose"],
                s["inferences"].to_string(),
                s["failures"].to_string(),
                s["latency"]["p50_ms"].to_string(),
                s["latency"]["p95_ms"].to_string(),
                s["latency"]["p99_ms"].to_string(),
            ])
        })
        .collect();
    assert_eq!(
        expected_stats,
        [
            json!(["narrator", "narration", "1", "0", "1500", "1500", "1500"]),
            json!(["npc-chat", "npc_dialogue", "2", "1", "50", "1000", "1000"]),
        ],
        "{stats}"
    );
    let inference_rows = "JSON.stringify([...document.querySelectorAll('#inference tr[data-model]')]\
        .map((r) => [...r.cells].slice(0, 7).map((c) => c.textContent)))";
    page.wait_for(
        "the inference stats",
        inference_rows,
        &json!(Value::Array(expected_stats).to_string()),
    )
    .await;

    // Projector lag: every projector's position, lag and dead letters, as
    // `/v1/projectors` reads them from PostgreSQL (this API runs no projector).
    let status = settled_projectors(&served).await;
    assert_eq!(listed_projectors(&status), registered_projectors());
    let expected_lag = lag_rows(&status);
    page.wait_for("the projector lag", LAG_ROWS, &expected_lag)
        .await;
    let rows: Vec<Vec<String>> = serde_json::from_str(expected_lag.as_str().unwrap()).unwrap();
    let row = |name: &str| rows.iter().find(|r| r[0] == name).unwrap().clone();
    // 2 worlds created, 13 ticks, 2 weather changes, 3 choices, 3 inferences
    // and the poison record: 24 records applied by the worlds projector.
    assert_eq!(row("worlds"), ["worlds", "24", "0", "1"]);
    assert_eq!(row("clock"), ["clock", "13", "0", "0"]);
    assert_eq!(row("weather"), ["weather", "3", "0", "1"]);

    // When new events are projected, the open page shows them without a reload.
    served
        .append(&[
            tick(&ember, 13),
            fixture::choice(&ember, &c(13, "cato", "smugglers", "dock", "bribe", "hold")),
        ])
        .await;
    let text = page.wait_for("the live tick", clock, &json!("13")).await;
    assert!(text.contains("13"), "{text}");
    page.wait_for("the live choice count", story_count, &json!("4"))
        .await;
    let newest = "document.querySelector('#choices tr').textContent";
    page.wait_for(
        "the live choice",
        newest,
        &json!("13catosmugglersdock → bribe"),
    )
    .await;
    let status = settled_projectors(&served).await;
    let expected_lag = lag_rows(&status);
    page.wait_for("the projector lag to move", LAG_ROWS, &expected_lag)
        .await;
    assert!(
        expected_lag
            .as_str()
            .unwrap()
            .contains(r#"["clock","14","0","0"]"#),
        "{expected_lag}"
    );
    let navigations = "performance.getEntriesByType('navigation').length";
    assert_eq!(page.eval(navigations).await, json!(1), "no reload happened");

    browser.close().await;
    screenshot(&served.server.base).await;
    served.stop().await;
}

/// A picture of the page for people to look at (`/tmp/worldline-page.png`).
async fn screenshot(base: &str) {
    let profile = std::env::temp_dir().join(format!("wl-chromium-{}", uuid::Uuid::new_v4()));
    let _cleanup = TempDir(profile.clone());
    let status = Command::new(CHROMIUM)
        .args(CHROMIUM_FLAGS)
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("--virtual-time-budget=5000")
        .arg("--screenshot=/tmp/worldline-page.png")
        .arg(format!("{base}/?world=emberfall&token={TOKEN}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .status()
        .await
        .unwrap();
    assert!(status.success());
}

//! The web page at `/`, opened in headless Chromium (Debian `chromium`) against
//! the API over read models filled by the real pipeline: the page shows the
//! world, its clock and weather, and updates live when a new tick is projected.
//!
//! Chromium is driven over the DevTools protocol (a minimal WebSocket client
//! below) because only a live page can show a live update; `--dump-dom` dumps
//! once, at a moment that depends on virtual time.
//!
//! Without `/usr/bin/chromium` the test is skipped with a message, unless `CI`
//! is set, where a missing browser is a failure.

#![allow(clippy::unwrap_used)] // a failed step should fail the test loudly

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use worldline_ops::Health;
use worldline_producers::{Appender, AppenderOptions};
use worldline_query_api::AppState;
use worldline_schemas::WorldId;
use worldline_schemas::envelope::new_envelope;
use worldline_schemas::pb::envelope::Body;
use worldline_schemas::pb::{
    ClockTicked, Envelope, Season, WeatherChanged, WeatherCondition, WorldCreated,
};
use worldline_tests::{Running, TestEnv, eventually};

const CHROMIUM: &str = "/usr/bin/chromium";

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
    new_envelope(
        world,
        0,
        "admin",
        Body::WorldCreated(WorldCreated {
            display_name: name.to_owned(),
            seed: 7,
            time_scale: 60,
            tick_interval_ms: 1000,
            regions: vec!["north".to_owned(), "coast".to_owned()],
        }),
    )
}

fn tick(world: &WorldId, tick: u64) -> Envelope {
    new_envelope(
        world,
        tick,
        "clock",
        Body::ClockTicked(ClockTicked {
            game_time_s: tick * 60,
            day: 0,
            season: Season::Summer as i32,
            time_scale: 60,
        }),
    )
}

fn weather(world: &WorldId, tick: u64, region: &str, condition: WeatherCondition) -> Envelope {
    new_envelope(
        world,
        tick,
        "weather",
        Body::WeatherChanged(WeatherChanged {
            region: region.to_owned(),
            condition: condition as i32,
            temperature_dc: 215,
            wind_dmps: 42,
            precipitation_dmmph: 0,
            previous_condition: WeatherCondition::Unspecified as i32,
            ..WeatherChanged::default()
        }),
    )
}

/// The pipeline and the API, running.
struct Served {
    env: TestEnv,
    appender: Appender,
    projectors: Vec<Running>,
    shutdown: CancellationToken,
    base: String,
}

impl Served {
    async fn start(initial: &[Envelope]) -> Served {
        let env = TestEnv::new(1).await;
        let appender = Appender::new(
            &env.settings.kafka,
            AppenderOptions {
                topic_prefix: env.settings.topics.prefix.clone(),
                ..AppenderOptions::default()
            },
        )
        .unwrap();
        let projectors = worldline_projectors::registry::all()
            .iter()
            .map(|p| env.start_projector(p.clone()))
            .collect();
        let shutdown = CancellationToken::new();
        let app = worldline_query_api::app_with_shutdown(
            AppState::new(env.pool.clone()),
            Health::default(),
            &|_, routes| routes,
            shutdown.clone(),
        );
        let (addr, _server) = worldline_ops::health::serve(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            app,
            shutdown.clone(),
        )
        .await
        .unwrap();
        let served = Served {
            env,
            appender,
            projectors,
            shutdown,
            base: format!("http://{addr}"),
        };
        served.append(initial).await;
        served
    }

    async fn append(&self, events: &[Envelope]) {
        for result in self.appender.append_batch(events).await {
            result.unwrap();
        }
        for projector in worldline_projectors::registry::all() {
            let env = &self.env;
            let projector = &projector;
            eventually(
                Duration::from_secs(60),
                &format!("{} to catch up", projector.name()),
                || async move {
                    env.caught_up(projector.name(), projector.as_ref())
                        .await
                        .then_some(())
                },
            )
            .await;
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        for projector in self.projectors {
            projector.stop().await;
        }
        self.env.cleanup().await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_a_world_and_updates_its_clock_live() {
    if !chromium_present() {
        return;
    }
    use WeatherCondition::{Clear, Rain};
    let ember = WorldId::parse("emberfall").unwrap();
    let frost = WorldId::parse("frostholm").unwrap();
    let mut initial = vec![created(&ember, "Emberfall"), created(&frost, "Frostholm")];
    initial.extend((1..=12).map(|t| tick(&ember, t)));
    initial.push(tick(&frost, 1));
    initial.push(weather(&ember, 3, "north", Clear));
    initial.push(weather(&ember, 9, "coast", Rain));
    let served = Served::start(&initial).await;

    let browser = Browser::launch().await;
    let mut page = browser.page().await;
    page.call("Runtime.enable", json!({})).await;
    let url = format!("{}/?world=emberfall", served.base);
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
    let live = "document.getElementById('live').textContent";
    page.wait_for("the stream to be open", live, &json!("live"))
        .await;

    // When a new tick is projected, the open page shows it without a reload.
    served.append(&[tick(&ember, 13)]).await;
    let text = page.wait_for("the live tick", clock, &json!("13")).await;
    assert!(text.contains("13"), "{text}");
    let navigations = "performance.getEntriesByType('navigation').length";
    assert_eq!(page.eval(navigations).await, json!(1), "no reload happened");

    browser.close().await;
    screenshot(&served.base).await;
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
        .arg(format!("{base}/?world=emberfall"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .status()
        .await
        .unwrap();
    assert!(status.success());
}

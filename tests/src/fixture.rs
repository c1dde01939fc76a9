//! The query API's fixture: three worlds (emberfall, frostholm, quiet) with
//! clock, weather, story and inference events, some redelivered. The endpoint
//! tests check every answer against these specs, and the OpenAPI conformance
//! run (`ops/schemathesis.toml`) draws its ids from them.

#![allow(clippy::unwrap_used)] // fixed, valid ids: a failure is a bug in the fixture

use worldline_schemas::WorldId;
use worldline_schemas::envelope::new_envelope;
use worldline_schemas::pb::envelope::Body;
use worldline_schemas::pb::{
    ClockTicked, Envelope, InferenceOutcome, InferencePurpose, InferenceRecorded, Season,
    StoryChoiceMade, WeatherChanged, WeatherCondition, WorldCreated,
};

/// A minute boundary in the past: 2026-09-21T14:13:00Z.
pub const BASE_MS: i64 = 1_789_999_980_000;

/// Values that only the second world has: none may ever show up in an answer
/// about the first world.
pub const OTHER_WORLD_MARKERS: [&str; 5] =
    ["tundra", "yeti", "frost-oracle", "frost-saga", "frost-npc"];

/// Every latency bucket bound of the inference read model, in ms.
pub const BOUNDS: [u32; 20] = [
    10, 25, 50, 75, 100, 150, 200, 300, 400, 500, 750, 1000, 1500, 2000, 3000, 5000, 7500, 10000,
    20000, 20000,
];

#[derive(Debug)]
pub struct ChoiceSpec {
    pub tick: u64,
    pub player: &'static str,
    pub story: &'static str,
    pub node: &'static str,
    pub choice: &'static str,
    pub next: &'static str,
}

#[derive(Debug)]
pub struct InferenceSpec {
    pub offset_s: i64,
    pub model: &'static str,
    pub purpose: InferencePurpose,
    pub npc: &'static str,
    pub latency_ms: u32,
    pub outcome: InferenceOutcome,
}

pub const CHOICES: [ChoiceSpec; 12] = [
    c(2, "ayla", "lost-caravan", "start", "help", "camp"),
    c(3, "bren", "lost-caravan", "start", "ignore", ""),
    c(3, "cato", "lost-caravan", "start", "help", "camp"),
    c(5, "ayla", "lost-caravan", "camp", "rest", "ambush"),
    c(5, "cato", "lost-caravan", "camp", "scout", "ridge"),
    c(7, "ayla", "smugglers", "dock", "bribe", "hold"),
    c(8, "bren", "smugglers", "dock", "fight", "jail"),
    c(9, "ayla", "lost-caravan", "ambush", "flee", "road"),
    c(11, "cato", "smugglers", "dock", "bribe", "hold"),
    c(12, "ayla", "smugglers", "hold", "search", "vault"),
    c(12, "bren", "lost-caravan", "start", "help", "camp"),
    c(15, "cato", "lost-caravan", "ridge", "signal", "camp"),
];

pub const fn c(
    tick: u64,
    player: &'static str,
    story: &'static str,
    node: &'static str,
    choice: &'static str,
    next: &'static str,
) -> ChoiceSpec {
    ChoiceSpec {
        tick,
        player,
        story,
        node,
        choice,
        next,
    }
}

pub const INFERENCES: [InferenceSpec; 10] = [
    i(
        0,
        "npc-chat",
        InferencePurpose::NpcDialogue,
        "innkeeper",
        40,
        InferenceOutcome::Ok,
    ),
    i(
        5,
        "npc-chat",
        InferencePurpose::NpcDialogue,
        "smith",
        180,
        InferenceOutcome::Ok,
    ),
    i(
        10,
        "npc-chat",
        InferencePurpose::NpcDialogue,
        "innkeeper",
        900,
        InferenceOutcome::Timeout,
    ),
    i(
        15,
        "narrator",
        InferencePurpose::Narration,
        "",
        1200,
        InferenceOutcome::Ok,
    ),
    i(
        20,
        "npc-chat",
        InferencePurpose::Moderation,
        "smith",
        30,
        InferenceOutcome::Ok,
    ),
    i(
        25,
        "narrator",
        InferencePurpose::Narration,
        "",
        2500,
        InferenceOutcome::Error,
    ),
    i(
        60,
        "npc-chat",
        InferencePurpose::NpcDialogue,
        "innkeeper",
        75,
        InferenceOutcome::Ok,
    ),
    i(
        65,
        "narrator",
        InferencePurpose::Narration,
        "",
        800,
        InferenceOutcome::Ok,
    ),
    i(
        70,
        "npc-chat",
        InferencePurpose::NpcDialogue,
        "smith",
        25000,
        InferenceOutcome::Ok,
    ),
    i(
        75,
        "npc-chat",
        InferencePurpose::Moderation,
        "",
        12,
        InferenceOutcome::Filtered,
    ),
];

pub const fn i(
    offset_s: i64,
    model: &'static str,
    purpose: InferencePurpose,
    npc: &'static str,
    latency_ms: u32,
    outcome: InferenceOutcome,
) -> InferenceSpec {
    InferenceSpec {
        offset_s,
        model,
        purpose,
        npc,
        latency_ms,
        outcome,
    }
}

pub fn purpose_name(purpose: InferencePurpose) -> &'static str {
    match purpose {
        InferencePurpose::NpcDialogue => "npc_dialogue",
        InferencePurpose::Narration => "narration",
        InferencePurpose::QuestGeneration => "quest_generation",
        InferencePurpose::Moderation => "moderation",
        InferencePurpose::Unspecified => "unspecified",
    }
}

pub fn created(world: &WorldId, name: &str, regions: &[&str]) -> Envelope {
    world_created(world, name, 42, regions)
}

pub fn tick(world: &WorldId, tick: u64) -> Envelope {
    clock_ticked(world, tick, 0, Season::Spring)
}

pub fn weather(
    world: &WorldId,
    tick: u64,
    region: &str,
    condition: WeatherCondition,
    previous: WeatherCondition,
) -> Envelope {
    let temperature_dc = 100 + i32::try_from(tick).unwrap();
    weather_changed(world, tick, region, condition, previous, temperature_dc, 40)
}

/// `WorldCreated` by the admin: a minute of game time a second.
pub fn world_created(world: &WorldId, name: &str, seed: u64, regions: &[&str]) -> Envelope {
    new_envelope(
        world,
        0,
        "admin",
        Body::WorldCreated(WorldCreated {
            display_name: name.to_owned(),
            seed,
            time_scale: 60,
            tick_interval_ms: 1000,
            regions: regions.iter().map(|r| (*r).to_owned()).collect(),
        }),
    )
}

/// `ClockTicked` from the clock: a game minute a tick.
pub fn clock_ticked(world: &WorldId, tick: u64, day: u32, season: Season) -> Envelope {
    new_envelope(
        world,
        tick,
        "clock",
        Body::ClockTicked(ClockTicked {
            game_time_s: tick * 60,
            day,
            season: season as i32,
            time_scale: 60,
        }),
    )
}

/// `WeatherChanged` from the weather producer, without precipitation.
pub fn weather_changed(
    world: &WorldId,
    tick: u64,
    region: &str,
    condition: WeatherCondition,
    previous: WeatherCondition,
    temperature_dc: i32,
    wind_dmps: u32,
) -> Envelope {
    new_envelope(
        world,
        tick,
        "weather",
        Body::WeatherChanged(WeatherChanged {
            region: region.to_owned(),
            condition: condition as i32,
            temperature_dc,
            wind_dmps,
            precipitation_dmmph: 0,
            previous_condition: previous as i32,
            ..WeatherChanged::default()
        }),
    )
}

pub fn choice(world: &WorldId, spec: &ChoiceSpec) -> Envelope {
    new_envelope(
        world,
        spec.tick,
        "game-server",
        Body::StoryChoiceMade(StoryChoiceMade {
            player_id: spec.player.to_owned(),
            story_id: spec.story.to_owned(),
            node_id: spec.node.to_owned(),
            choice_id: spec.choice.to_owned(),
            next_node_id: spec.next.to_owned(),
            context: [("party".to_owned(), "3".to_owned())].into(),
        }),
    )
}

pub fn inference(world: &WorldId, tick: u64, spec: &InferenceSpec) -> Envelope {
    let mut envelope = new_envelope(
        world,
        tick,
        "npc-runtime",
        Body::InferenceRecorded(InferenceRecorded {
            model_id: spec.model.to_owned(),
            model_version: "2026-10".to_owned(),
            purpose: spec.purpose as i32,
            prompt_tokens: 300,
            completion_tokens: 80,
            latency_ms: spec.latency_ms,
            cost_micro_usd: 950,
            outcome: spec.outcome as i32,
            npc_id: spec.npc.to_owned(),
            input_hash: "ab12".to_owned(),
        }),
    );
    envelope.occurred_at_ms = BASE_MS + spec.offset_s * 1000;
    envelope
}

/// The events of the three worlds, with some redelivered (same event id).
pub fn events() -> Vec<Envelope> {
    use WeatherCondition::{Clear, Fog, Rain, Snow, Unspecified};
    let ember = WorldId::parse("emberfall").unwrap();
    let frost = WorldId::parse("frostholm").unwrap();
    let quiet = WorldId::parse("quiet").unwrap();
    let mut all = vec![
        created(&ember, "Emberfall", &["north", "coast", "east"]),
        created(&frost, "Frostholm", &["tundra"]),
        created(&quiet, "Quiet", &[]),
    ];
    all.extend((1..=30).map(|t| tick(&ember, t)));
    all.extend((1..=4).map(|t| tick(&frost, t)));
    all.extend([
        weather(&ember, 1, "north", Clear, Unspecified),
        weather(&ember, 1, "coast", Rain, Unspecified),
        weather(&ember, 5, "east", Fog, Unspecified),
        weather(&ember, 10, "north", Snow, Clear),
        weather(&ember, 20, "north", Clear, Snow),
        weather(&frost, 1, "north", Snow, Unspecified),
        weather(&frost, 2, "tundra", Snow, Unspecified),
    ]);
    all.extend(CHOICES.iter().map(|spec| choice(&ember, spec)));
    all.push(choice(
        &frost,
        &c(2, "ayla", "frost-saga", "gate", "yeti", "tundra"),
    ));
    all.push(choice(
        &frost,
        &c(3, "yeti", "lost-caravan", "start", "help", "camp"),
    ));
    all.extend(
        INFERENCES
            .iter()
            .enumerate()
            .map(|(n, spec)| inference(&ember, n as u64, spec)),
    );
    all.push(inference(
        &frost,
        1,
        &i(
            1,
            "frost-oracle",
            InferencePurpose::NpcDialogue,
            "frost-npc",
            50,
            InferenceOutcome::Ok,
        ),
    ));
    // Producer retries: the same events again, later in the log.
    let redelivered: Vec<Envelope> = [33, 40, 45, 55, 60]
        .iter()
        .map(|n| all[*n].clone())
        .collect();
    all.extend(redelivered);
    all
}

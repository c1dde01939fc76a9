//! Old bytes must keep decoding: every checked-in `fixtures/v1/*.bin` is decoded
//! and validated with today's code and compared with the value it was written
//! from. A schema change that renumbers a field, changes its type or tightens
//! validation so that events already in the log stop reading fails here.

#![allow(clippy::unwrap_used)] // a failed step should fail the test loudly

#[path = "fixtures/expected.rs"]
mod expected;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use worldline_schemas::json::envelope_to_json;
use worldline_schemas::{Family, decode_envelope, envelope::EnvelopeExt};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/v1")
}

/// Stems of the files in the fixture directory with the given extension.
fn stems_with_extension(extension: &str) -> BTreeSet<String> {
    std::fs::read_dir(fixture_dir())
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == extension))
        .map(|path| path.file_stem().unwrap().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn given_the_checked_in_fixtures_when_decoded_today_then_each_equals_its_expected_event() {
    let expected = expected::fixtures();
    let on_disk = stems_with_extension("bin");
    assert!(!on_disk.is_empty(), "no fixtures in {:?}", fixture_dir());

    for stem in &on_disk {
        let fixture = expected
            .iter()
            .find(|f| f.name == stem.as_str())
            .unwrap_or_else(|| {
                panic!("{stem}.bin has no expected value in tests/fixtures/expected.rs")
            });
        let bytes = std::fs::read(fixture_dir().join(format!("{stem}.bin"))).unwrap();

        let decoded = decode_envelope(&bytes)
            .unwrap_or_else(|e| panic!("{stem}.bin no longer decodes with today's schema: {e}"));

        assert_eq!(
            decoded, fixture.envelope,
            "{stem}.bin decodes to a different event than it was written from"
        );
    }
}

#[test]
fn given_the_expected_events_then_every_event_type_has_a_checked_in_fixture() {
    let on_disk = stems_with_extension("bin");
    let expected: BTreeSet<String> = expected::fixtures()
        .iter()
        .map(|f| f.name.to_owned())
        .collect();

    let missing: Vec<&String> = expected.difference(&on_disk).collect();

    assert!(
        missing.is_empty(),
        "no fixture for {missing:?}: run `cargo run -p worldline-schemas --example write_fixtures` \
         and commit the new files"
    );
}

#[test]
fn given_the_fixtures_then_they_cover_every_event_type_of_every_family() {
    let expected = expected::fixtures();
    let mut types = BTreeSet::new();
    let mut families = BTreeSet::new();

    for fixture in &expected {
        let body = fixture.envelope.body.as_ref().unwrap();
        let event_type = worldline_schemas::family::event_type(body);
        // The file stem is the snake_case of the message name.
        assert_eq!(
            snake_case(event_type.trim_start_matches("worldline.v1.")),
            fixture.name
        );
        types.insert(event_type);
        families.insert(Family::of(body));
    }

    assert_eq!(families, Family::ALL.into_iter().collect());
    // One per variant of Envelope.body: the seven event types of worldline.v1.
    assert_eq!(types.len(), 7, "{types:?}");
}

#[test]
fn given_the_fixtures_when_rendered_then_the_json_beside_each_is_current() {
    for stem in stems_with_extension("bin") {
        let bytes = std::fs::read(fixture_dir().join(format!("{stem}.bin"))).unwrap();
        let decoded = decode_envelope(&bytes).unwrap();
        let text = std::fs::read_to_string(fixture_dir().join(format!("{stem}.json")))
            .unwrap_or_else(|e| panic!("{stem}.json: {e}"));

        let on_disk: serde_json::Value = serde_json::from_str(&text).unwrap();

        assert_eq!(
            on_disk,
            envelope_to_json(&decoded).unwrap(),
            "{stem}.json is stale: run `cargo run -p worldline-schemas --example write_fixtures` \
             (it refreshes the .json views and never rewrites a .bin)"
        );
        assert_eq!(decoded.event_uuid().to_string(), on_disk["eventId"]);
    }
}

fn snake_case(camel: &str) -> String {
    let mut out = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

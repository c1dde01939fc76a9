//! Writes the encoded event fixtures, `schemas/fixtures/v1/<event_type>.bin`, and a
//! JSON rendering of each beside it.
//!
//! ```text
//! cargo run -p worldline-schemas --example write_fixtures              # add missing fixtures
//! cargo run -p worldline-schemas --example write_fixtures -- --check   # change nothing, report
//! ```
//!
//! A fixture that exists is never rewritten: its bytes are what an older release
//! wrote, and the point of keeping them is that today's code must still read
//! them. If an existing `.bin` no longer decodes to the expected value the
//! command refuses and exits non-zero (see `schemas/fixtures/README.md` for what
//! to do instead). The `.json` files are only a view of the `.bin` files and are
//! refreshed freely.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use worldline_schemas::envelope::EnvelopeExt;
use worldline_schemas::json::envelope_to_json;
use worldline_schemas::pb::Envelope;

#[path = "../tests/fixtures/expected.rs"]
mod expected;

/// What the generator did, or would do, with one fixture.
#[derive(Debug, PartialEq, Eq)]
enum Plan {
    /// No `.bin` yet: write it.
    Write,
    /// The `.bin` decodes to the expected value: leave it.
    Keep,
    /// The `.bin` decodes to something else, or not at all: refuse.
    Conflict(String),
}

/// Decides what to do with a fixture given the bytes already on disk, if any.
fn plan(existing: Option<&[u8]>, expected: &Envelope) -> Plan {
    let Some(bytes) = existing else {
        return Plan::Write;
    };
    match worldline_schemas::decode_envelope(bytes) {
        Ok(decoded) if &decoded == expected => Plan::Keep,
        Ok(decoded) => Plan::Conflict(format!(
            "decodes to a different event:\n  on disk:  {decoded:?}\n  expected: {expected:?}"
        )),
        Err(e) => Plan::Conflict(format!("no longer decodes: {e}")),
    }
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/v1")
}

fn write_json(path: &Path, envelope: &Envelope) -> Result<(), String> {
    let rendered = envelope_to_json(envelope).map_err(|e| e.to_string())?;
    let mut text = serde_json::to_string_pretty(&rendered).map_err(|e| e.to_string())?;
    text.push('\n');
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

fn run(check_only: bool) -> Result<usize, String> {
    let dir = fixture_dir();
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut conflicts = 0;
    for fixture in expected::fixtures() {
        let bin = dir.join(format!("{}.bin", fixture.name));
        let existing = std::fs::read(&bin).ok();
        match plan(existing.as_deref(), &fixture.envelope) {
            Plan::Write if check_only => println!("missing  {}", bin.display()),
            Plan::Write => {
                std::fs::write(&bin, fixture.envelope.to_bytes())
                    .map_err(|e| format!("{}: {e}", bin.display()))?;
                println!("wrote    {}", bin.display());
            }
            Plan::Keep => println!("kept     {}", bin.display()),
            Plan::Conflict(reason) => {
                conflicts += 1;
                eprintln!("REFUSED  {}: {reason}", bin.display());
                continue;
            }
        }
        if !check_only {
            write_json(&bin.with_extension("json"), &fixture.envelope)?;
        }
    }
    Ok(conflicts)
}

fn main() -> ExitCode {
    let check_only = std::env::args().skip(1).any(|arg| arg == "--check");
    match run(check_only) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(conflicts) => {
            eprintln!(
                "{conflicts} fixture(s) no longer match: old bytes must keep decoding. \
                 Make the schema change compatible instead; see schemas/fixtures/README.md."
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_no_file_when_planned_then_written() {
        let fixture = &expected::fixtures()[0];
        assert_eq!(plan(None, &fixture.envelope), Plan::Write);
    }

    #[test]
    fn given_a_file_with_the_expected_event_when_planned_then_kept() {
        let fixture = &expected::fixtures()[0];
        let bytes = fixture.envelope.to_bytes();
        assert_eq!(plan(Some(&bytes), &fixture.envelope), Plan::Keep);
    }

    #[test]
    fn given_a_file_with_another_event_or_garbage_when_planned_then_refused() {
        let fixtures = expected::fixtures();
        let other = fixtures[1].envelope.to_bytes();
        assert!(matches!(
            plan(Some(&other), &fixtures[0].envelope),
            Plan::Conflict(_)
        ));
        assert!(matches!(
            plan(Some(&[0xff, 0x01]), &fixtures[0].envelope),
            Plan::Conflict(_)
        ));
    }
}

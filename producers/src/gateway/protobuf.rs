//! Protobuf request bodies and the content types that select a decoder.
//!
//! `application/x-protobuf` (or `application/protobuf`) carries one
//! `worldline.v1.Envelope` by default. A batch is a `worldline.v1.EnvelopeBatch`
//! announced with the `proto` parameter:
//! `Content-Type: application/x-protobuf; proto=worldline.v1.EnvelopeBatch`.
//! The parameter is needed because protobuf bytes do not say which message
//! they are, and an Envelope's first field has the same wire type as a batch's.

use prost::Message;
use worldline_schemas::pb::{Envelope, EnvelopeBatch};

use super::json::check_batch_size;
use super::problem::{ProblemKind, Rejection, Violation};
use super::settle::Draft;

/// Full name of the single-event message.
pub const ENVELOPE: &str = "worldline.v1.Envelope";
/// Full name of the batch message.
pub const ENVELOPE_BATCH: &str = "worldline.v1.EnvelopeBatch";

/// How to decode a request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// The JSON event shape.
    Json,
    /// One `worldline.v1.Envelope`.
    Envelope,
    /// A `worldline.v1.EnvelopeBatch`.
    EnvelopeBatch,
}

/// Picks the decoder from the `Content-Type` header.
pub fn body_kind(content_type: Option<&str>) -> Result<BodyKind, Violation> {
    let unsupported = |what: String| {
        Violation::request(
            ProblemKind::UnsupportedMediaType,
            format!(
                "{what}; send application/json, or application/x-protobuf with an optional \
                 proto={ENVELOPE} (the default) or proto={ENVELOPE_BATCH}"
            ),
        )
    };
    let Some(content_type) = content_type else {
        return Err(unsupported("the request has no Content-Type".to_owned()));
    };
    let mut parts = content_type.split(';');
    let essence = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
    let parameters: Vec<(String, String)> = parts
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| {
            (
                k.trim().to_ascii_lowercase(),
                v.trim().trim_matches('"').to_owned(),
            )
        })
        .collect();
    match essence.as_str() {
        "application/json" => Ok(BodyKind::Json),
        "application/x-protobuf" | "application/protobuf" => {
            match parameters.iter().find(|(k, _)| k == "proto") {
                None => Ok(BodyKind::Envelope),
                Some((_, proto)) if proto == ENVELOPE => Ok(BodyKind::Envelope),
                Some((_, proto)) if proto == ENVELOPE_BATCH => Ok(BodyKind::EnvelopeBatch),
                Some((_, proto)) => Err(unsupported(format!("proto={proto} is not accepted"))),
            }
        }
        _ => Err(unsupported(format!(
            "Content-Type {content_type:?} is not accepted"
        ))),
    }
}

/// Decodes a protobuf body into drafts (not yet validated).
pub fn parse_protobuf_body(
    body: &[u8],
    kind: BodyKind,
    max_events: usize,
) -> Result<Vec<Draft>, Rejection> {
    let malformed = |message: &str, error: prost::DecodeError| {
        Violation::request(
            ProblemKind::MalformedBody,
            format!("the body is not a {message}: {error}"),
        )
    };
    match kind {
        BodyKind::EnvelopeBatch => {
            let batch = EnvelopeBatch::decode(body).map_err(|e| malformed(ENVELOPE_BATCH, e))?;
            check_batch_size(batch.events.len(), max_events)?;
            Ok(batch
                .events
                .into_iter()
                .enumerate()
                .map(|(index, envelope)| Draft {
                    envelope,
                    index,
                    pointer: format!("/events/{index}"),
                })
                .collect())
        }
        BodyKind::Envelope | BodyKind::Json => {
            if body.is_empty() {
                return Err(Violation::request(
                    ProblemKind::MalformedBody,
                    format!("the body is empty; expected a {ENVELOPE}"),
                )
                .into());
            }
            let envelope = Envelope::decode(body).map_err(|e| malformed(ENVELOPE, e))?;
            Ok(vec![Draft {
                envelope,
                index: 0,
                pointer: String::new(),
            }])
        }
    }
}

#[cfg(test)]
mod tests {
    use worldline_schemas::envelope::new_envelope;
    use worldline_schemas::pb::WorldResumed;
    use worldline_schemas::pb::envelope::Body;
    use worldline_schemas::{EnvelopeExt, WorldId};

    use super::*;

    fn resumed(tick: u64) -> Envelope {
        new_envelope(
            &WorldId::parse("emberfall").unwrap(),
            tick,
            "test",
            Body::WorldResumed(WorldResumed {}),
        )
    }

    #[test]
    fn given_content_types_then_the_decoder_is_chosen_or_refused() {
        for (header, expected) in [
            ("application/json", BodyKind::Json),
            ("Application/JSON; charset=utf-8", BodyKind::Json),
            ("application/x-protobuf", BodyKind::Envelope),
            (
                "application/protobuf; proto=worldline.v1.Envelope",
                BodyKind::Envelope,
            ),
            (
                "application/x-protobuf; proto=\"worldline.v1.EnvelopeBatch\"",
                BodyKind::EnvelopeBatch,
            ),
        ] {
            assert_eq!(body_kind(Some(header)), Ok(expected), "{header}");
        }
        for refused in [
            None,
            Some("text/plain"),
            Some("application/x-www-form-urlencoded"),
            Some("application/x-protobuf; proto=worldline.v1.ClockTicked"),
        ] {
            let err = body_kind(refused).unwrap_err();
            assert_eq!(err.kind, ProblemKind::UnsupportedMediaType, "{refused:?}");
        }
    }

    #[test]
    fn given_a_batch_then_every_envelope_becomes_a_draft_in_order() {
        let batch = EnvelopeBatch {
            events: vec![resumed(1), resumed(2)],
        };
        let drafts =
            parse_protobuf_body(&batch.encode_to_vec(), BodyKind::EnvelopeBatch, 10).unwrap();
        assert_eq!(drafts.len(), 2);
        assert_eq!(drafts[1].envelope.world_tick, 2);
        assert_eq!(drafts[1].pointer, "/events/1");
    }

    #[test]
    fn given_a_single_envelope_then_it_decodes_unchanged() {
        let original = resumed(5);
        let drafts = parse_protobuf_body(&original.to_bytes(), BodyKind::Envelope, 10).unwrap();
        assert_eq!(drafts[0].envelope, original);
        assert_eq!(drafts[0].pointer, "");
    }

    #[test]
    fn given_bad_bytes_or_sizes_then_the_request_is_refused() {
        let status = |body: &[u8], kind, max| {
            parse_protobuf_body(body, kind, max)
                .unwrap_err()
                .status()
                .as_u16()
        };
        assert_eq!(status(&[0xff, 0xff, 0xff], BodyKind::Envelope, 10), 400);
        assert_eq!(status(&[], BodyKind::Envelope, 10), 400);
        assert_eq!(status(&[], BodyKind::EnvelopeBatch, 10), 422);
        let two = EnvelopeBatch {
            events: vec![resumed(1), resumed(2)],
        };
        assert_eq!(
            status(&two.encode_to_vec(), BodyKind::EnvelopeBatch, 1),
            413
        );
    }
}

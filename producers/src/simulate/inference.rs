//! Model inferences as NPCs and the narrator make them: which model, how many
//! tokens, how long, what it cost and how it ended.

use rand::Rng;
use sha2::{Digest, Sha256};
use worldline_schemas::pb::{InferenceOutcome, InferencePurpose, InferenceRecorded};

use super::sampling::{Zipf, log_normal, weighted};

/// Why inferences are made, and how often: NPCs talk far more than anything else.
const PURPOSES: [(InferencePurpose, f64); 4] = [
    (InferencePurpose::NpcDialogue, 0.62),
    (InferencePurpose::Narration, 0.14),
    (InferencePurpose::QuestGeneration, 0.14),
    (InferencePurpose::Moderation, 0.10),
];

/// How calls end: mostly well.
const OUTCOMES: [(InferenceOutcome, f64); 4] = [
    (InferenceOutcome::Ok, 0.955),
    (InferenceOutcome::Error, 0.015),
    (InferenceOutcome::Timeout, 0.02),
    (InferenceOutcome::Filtered, 0.01),
];

/// Longest a call may take before the game gives up on it, in milliseconds.
const TIMEOUT_MS: u32 = 30_000;

/// Distinct prompt templates per purpose; a Zipf over them makes popular
/// prompts repeat, as they do in a live game.
const PROMPT_TEMPLATES: u32 = 400;

/// One model as the game uses it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelProfile {
    pub model_id: &'static str,
    pub model_version: &'static str,
    /// Median prompt tokens and the log-normal shape around it.
    pub prompt_median: f64,
    pub prompt_sigma: f64,
    /// Median completion tokens and the shape around it.
    pub completion_median: f64,
    pub completion_sigma: f64,
    /// Time to the first token, median, in milliseconds.
    pub first_token_ms: f64,
    /// Generation time per completion token, in milliseconds.
    pub per_token_ms: f64,
    /// Price per 1,000 prompt tokens and per 1,000 completion tokens, micro-USD.
    pub prompt_price: u64,
    pub completion_price: u64,
}

const NPC_CHAT: ModelProfile = ModelProfile {
    model_id: "npc-chat",
    model_version: "2026-10-01",
    prompt_median: 700.0,
    prompt_sigma: 0.45,
    completion_median: 90.0,
    completion_sigma: 0.6,
    first_token_ms: 280.0,
    per_token_ms: 14.0,
    prompt_price: 150,
    completion_price: 600,
};

const NPC_CHAT_SMALL: ModelProfile = ModelProfile {
    model_id: "npc-chat-small",
    model_version: "2026-08-15",
    prompt_median: 500.0,
    prompt_sigma: 0.4,
    completion_median: 60.0,
    completion_sigma: 0.5,
    first_token_ms: 90.0,
    per_token_ms: 5.0,
    prompt_price: 40,
    completion_price: 160,
};

const NARRATOR: ModelProfile = ModelProfile {
    model_id: "narrator",
    model_version: "2026-09-20",
    prompt_median: 1_200.0,
    prompt_sigma: 0.4,
    completion_median: 250.0,
    completion_sigma: 0.5,
    first_token_ms: 350.0,
    per_token_ms: 16.0,
    prompt_price: 300,
    completion_price: 1_200,
};

const QUEST_WEAVER: ModelProfile = ModelProfile {
    model_id: "quest-weaver",
    model_version: "2026-07-02",
    prompt_median: 1_800.0,
    prompt_sigma: 0.35,
    completion_median: 500.0,
    completion_sigma: 0.45,
    first_token_ms: 500.0,
    per_token_ms: 20.0,
    prompt_price: 1_000,
    completion_price: 4_000,
};

const GUARD: ModelProfile = ModelProfile {
    model_id: "guard",
    model_version: "2026-05-11",
    prompt_median: 150.0,
    prompt_sigma: 0.5,
    completion_median: 3.0,
    completion_sigma: 0.3,
    first_token_ms: 40.0,
    per_token_ms: 4.0,
    prompt_price: 10,
    completion_price: 10,
};

/// The model a purpose is served by; NPC dialogue goes to a small model for
/// a third of the calls (cheap chatter).
fn model_for(rng: &mut impl Rng, purpose: InferencePurpose) -> ModelProfile {
    match purpose {
        InferencePurpose::NpcDialogue if rng.random_bool(0.3) => NPC_CHAT_SMALL,
        InferencePurpose::NpcDialogue | InferencePurpose::Unspecified => NPC_CHAT,
        InferencePurpose::Narration => NARRATOR,
        InferencePurpose::QuestGeneration => QUEST_WEAVER,
        InferencePurpose::Moderation => GUARD,
    }
}

/// Draws inferences for one simulation.
#[derive(Debug, Clone)]
pub struct InferenceSampler {
    npcs: Zipf,
    prompts: Zipf,
}

impl InferenceSampler {
    /// A sampler for worlds with `npcs` NPCs each.
    pub fn new(npcs: u32) -> InferenceSampler {
        InferenceSampler {
            npcs: Zipf::new(npcs, 1.0),
            prompts: Zipf::new(PROMPT_TEMPLATES, 1.2),
        }
    }

    /// One inference made in a world.
    pub fn sample(&self, rng: &mut impl Rng) -> InferenceRecorded {
        let purpose = weighted(rng, &PURPOSES);
        let model = model_for(rng, purpose);
        let npc_id = match purpose {
            InferencePurpose::NpcDialogue | InferencePurpose::QuestGeneration => {
                format!("npc-{:03}", self.npcs.sample(rng) + 1)
            }
            // The narrator and the moderation guard speak for no NPC.
            _ => String::new(),
        };
        let prompt = format!(
            "{}|{}|{}|template-{}",
            model.model_id,
            purpose.as_str_name(),
            npc_id,
            self.prompts.sample(rng)
        );
        let input_hash = hex_sha256(prompt.as_bytes());
        let prompt_tokens = tokens(log_normal(rng, model.prompt_median, model.prompt_sigma));
        let completion = tokens(log_normal(
            rng,
            model.completion_median,
            model.completion_sigma,
        ));
        let first_token_ms = log_normal(rng, model.first_token_ms, 0.3);
        let outcome = weighted(rng, &OUTCOMES);
        let (completion_tokens, latency_ms, billed_prompt) = match outcome {
            // Failed before generating: fast, and not billed.
            InferenceOutcome::Error => (0, millis(first_token_ms), 0),
            // The game stopped waiting; the prompt was still processed.
            InferenceOutcome::Timeout => (0, TIMEOUT_MS, prompt_tokens),
            _ => (
                completion,
                millis(first_token_ms + f64::from(completion) * model.per_token_ms).min(TIMEOUT_MS),
                prompt_tokens,
            ),
        };
        let cost_micro_usd = (u64::from(billed_prompt) * model.prompt_price
            + u64::from(completion_tokens) * model.completion_price)
            / 1_000;
        InferenceRecorded {
            model_id: model.model_id.to_owned(),
            model_version: model.model_version.to_owned(),
            purpose: purpose as i32,
            prompt_tokens,
            completion_tokens,
            latency_ms,
            cost_micro_usd,
            outcome: outcome as i32,
            npc_id,
            input_hash,
        }
    }
}

fn tokens(value: f64) -> u32 {
    value.round().clamp(1.0, 32_000.0) as u32
}

fn millis(value: f64) -> u32 {
    value.round().clamp(1.0, f64::from(u32::MAX)) as u32
}

fn hex_sha256(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    fn sample(n: usize) -> Vec<InferenceRecorded> {
        let mut rng = StdRng::seed_from_u64(9);
        let sampler = InferenceSampler::new(20);
        (0..n).map(|_| sampler.sample(&mut rng)).collect()
    }

    #[test]
    fn given_many_inferences_then_npc_dialogue_is_the_most_common_purpose_and_most_calls_succeed() {
        let inferences = sample(20_000);
        let mut purposes: HashMap<i32, usize> = HashMap::new();
        for i in &inferences {
            *purposes.entry(i.purpose).or_default() += 1;
        }
        let dialogue = purposes[&(InferencePurpose::NpcDialogue as i32)];
        assert!(purposes.values().all(|count| *count <= dialogue));
        assert_eq!(purposes.len(), 4, "every purpose occurs");
        let ok = inferences
            .iter()
            .filter(|i| i.outcome == InferenceOutcome::Ok as i32)
            .count() as f64
            / inferences.len() as f64;
        assert!((0.93..0.98).contains(&ok), "ok share {ok}");
        for outcome in [
            InferenceOutcome::Error,
            InferenceOutcome::Timeout,
            InferenceOutcome::Filtered,
        ] {
            assert!(inferences.iter().any(|i| i.outcome == outcome as i32));
        }
    }

    #[test]
    fn given_an_inference_then_its_fields_are_consistent() {
        for i in sample(5_000) {
            assert_eq!(i.input_hash.len(), 64);
            assert!(i.input_hash.chars().all(|c| c.is_ascii_hexdigit()));
            let narration = i.purpose == InferencePurpose::Narration as i32;
            let dialogue = i.purpose == InferencePurpose::NpcDialogue as i32;
            if narration {
                assert!(i.npc_id.is_empty());
            }
            if dialogue {
                assert!(i.npc_id.starts_with("npc-"));
            }
            if i.outcome == InferenceOutcome::Error as i32 {
                assert_eq!((i.completion_tokens, i.cost_micro_usd), (0, 0));
            }
            if i.outcome == InferenceOutcome::Timeout as i32 {
                assert_eq!(i.latency_ms, TIMEOUT_MS);
            }
            assert!(i.prompt_tokens >= 1 && i.latency_ms >= 1 && i.latency_ms <= TIMEOUT_MS);
        }
    }

    #[test]
    fn given_more_tokens_on_the_same_model_then_the_call_costs_more() {
        let inferences: Vec<InferenceRecorded> = sample(20_000)
            .into_iter()
            .filter(|i| i.model_id == "npc-chat" && i.outcome == InferenceOutcome::Ok as i32)
            .collect();
        let (small, large): (Vec<_>, Vec<_>) = inferences
            .iter()
            .partition(|i| i.prompt_tokens + i.completion_tokens < 700);
        let mean_cost = |v: &[&InferenceRecorded]| {
            v.iter().map(|i| i.cost_micro_usd as f64).sum::<f64>() / v.len() as f64
        };
        assert!(mean_cost(&large) > mean_cost(&small));
    }

    #[test]
    fn given_popular_prompts_then_some_input_hashes_repeat() {
        let inferences = sample(5_000);
        let mut hashes: HashMap<&str, usize> = HashMap::new();
        for i in &inferences {
            *hashes.entry(&i.input_hash).or_default() += 1;
        }
        assert!(hashes.values().any(|count| *count > 10));
        assert!(hashes.len() > 100);
    }
}

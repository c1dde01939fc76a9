-- The worlds read model: every world, its latest tick and its event counts.
-- Unqualified names: the runtime sets search_path to the target schema.
CREATE TABLE worlds (
    world_id          text        PRIMARY KEY,
    display_name      text,
    seed              bigint,
    regions           jsonb       NOT NULL DEFAULT '[]',
    status            text        NOT NULL DEFAULT 'unknown',
    created_at        timestamptz,
    latest_tick       bigint      NOT NULL DEFAULT 0,
    world_events      bigint      NOT NULL DEFAULT 0,
    clock_events      bigint      NOT NULL DEFAULT 0,
    weather_events    bigint      NOT NULL DEFAULT 0,
    story_events      bigint      NOT NULL DEFAULT 0,
    inference_events  bigint      NOT NULL DEFAULT 0,
    -- Every record applied, duplicates by event id included. Deliberately not
    -- idempotent: it must equal the number of valid records in the log for the
    -- world, which is how tests prove no record was applied twice or skipped.
    records_applied   bigint      NOT NULL DEFAULT 0,
    last_event_at     timestamptz,
    status_offset     bigint      NOT NULL DEFAULT -1
);

-- Event ids already counted, so a redelivered event is not counted twice.
CREATE TABLE seen_events (
    event_id uuid PRIMARY KEY
);

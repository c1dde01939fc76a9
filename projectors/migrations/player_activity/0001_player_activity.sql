-- Player activity per world: how much each player plays, when they were first and
-- last seen, for retention dashboards and moderation.
CREATE TABLE player_activity (
    world_id     text        NOT NULL,
    player_id    text        NOT NULL,
    choices      bigint      NOT NULL,
    stories      text[]      NOT NULL,
    first_tick   bigint      NOT NULL,
    last_tick    bigint      NOT NULL,
    first_seen   timestamptz NOT NULL,
    last_seen    timestamptz NOT NULL,
    PRIMARY KEY (world_id, player_id)
);
CREATE INDEX player_activity_recent ON player_activity (world_id, last_seen DESC);

-- Choices already counted, so a redelivered event counts once.
CREATE TABLE counted_choices (
    event_id uuid PRIMARY KEY
);

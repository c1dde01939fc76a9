-- The story read model: the choices log, each player's progress per story,
-- and how often each choice was taken at each node.
CREATE TABLE choices (
    event_id      uuid        PRIMARY KEY,
    world_id      text        NOT NULL,
    tick          bigint      NOT NULL,
    occurred_at   timestamptz NOT NULL,
    player_id     text        NOT NULL,
    story_id      text        NOT NULL,
    node_id       text        NOT NULL,
    choice_id     text        NOT NULL,
    next_node_id  text        NOT NULL,
    context       jsonb       NOT NULL DEFAULT '{}',
    -- Log position: the order of a world's choices (one partition per world).
    log_partition integer     NOT NULL,
    log_offset    bigint      NOT NULL
);
CREATE INDEX choices_by_world_tick ON choices (world_id, tick, event_id);
CREATE INDEX choices_by_player ON choices (world_id, player_id, tick);

CREATE TABLE player_progress (
    world_id        text        NOT NULL,
    player_id       text        NOT NULL,
    story_id        text        NOT NULL,
    current_node_id text        NOT NULL,
    last_choice_id  text        NOT NULL,
    choices_made    bigint      NOT NULL,
    tick            bigint      NOT NULL,
    log_offset      bigint      NOT NULL,
    updated_at      timestamptz NOT NULL,
    PRIMARY KEY (world_id, player_id, story_id)
);

CREATE TABLE node_tallies (
    world_id  text   NOT NULL,
    story_id  text   NOT NULL,
    node_id   text   NOT NULL,
    choice_id text   NOT NULL,
    times     bigint NOT NULL,
    PRIMARY KEY (world_id, story_id, node_id, choice_id)
);

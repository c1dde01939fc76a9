-- The clock read model: where each world's clock stands now.
-- No now() columns anywhere in read models: a rebuild from the log must produce
-- the same rows, byte for byte.
-- Unqualified names on purpose: the runtime sets search_path to the projector's
-- schema, so the same migrations build the live schema and a shadow rebuild.
CREATE TABLE world_clock (
    world_id     text        PRIMARY KEY,
    tick         bigint      NOT NULL,
    game_time_s  bigint      NOT NULL,
    day          integer     NOT NULL,
    season       text        NOT NULL,
    time_scale   integer     NOT NULL,
    event_id     uuid        NOT NULL,
    occurred_at  timestamptz NOT NULL
);

-- The weather read model: each region's current weather and its history.
CREATE TABLE current_weather (
    world_id            text        NOT NULL,
    region              text        NOT NULL,
    condition           text        NOT NULL,
    temperature_dc      integer     NOT NULL,
    wind_dmps           integer     NOT NULL,
    precipitation_dmmph integer     NOT NULL,
    since_tick          bigint      NOT NULL,
    -- Log position of the change; breaks ties between changes at the same tick
    -- (one partition per world, so offsets order a world's events).
    log_offset          bigint      NOT NULL,
    event_id            uuid        NOT NULL,
    occurred_at         timestamptz NOT NULL,
    PRIMARY KEY (world_id, region)
);

-- One row per weather period: valid from its tick (inclusive) until the next
-- change's tick (exclusive); valid_to_tick is NULL for the period still running.
CREATE TABLE weather_history (
    event_id            uuid        PRIMARY KEY,
    world_id            text        NOT NULL,
    region              text        NOT NULL,
    valid_from_tick     bigint      NOT NULL,
    valid_to_tick       bigint,
    condition           text        NOT NULL,
    previous_condition  text        NOT NULL,
    temperature_dc      integer     NOT NULL,
    wind_dmps           integer     NOT NULL,
    precipitation_dmmph integer     NOT NULL,
    occurred_at         timestamptz NOT NULL,
    log_offset          bigint      NOT NULL
);

-- "Weather as of tick N" is one index probe: the last period starting at or before N.
CREATE INDEX weather_history_as_of
    ON weather_history (world_id, region, valid_from_tick DESC, log_offset DESC);

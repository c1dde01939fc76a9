-- Weather history becomes append-only: one row per change, never rewritten.
--
-- A stored valid_to_tick had to be set after the fact by an UPDATE of the
-- region's open period in every batch (and a re-link of later periods when a
-- change arrived out of tick order), which wrote every history row twice: a
-- second tuple version plus entries in both indexes. A period's end is only
-- the start of the region's next change in (valid_from_tick, log_offset)
-- order, so it is derived when read instead.
ALTER TABLE weather_history RENAME TO weather_changes;
ALTER TABLE weather_changes DROP COLUMN valid_to_tick;
ALTER TABLE weather_changes RENAME CONSTRAINT weather_history_pkey TO weather_changes_pkey;
-- Every probe walks this one: "the last change at or before N" and "the next
-- change after this one" are both one descent of it.
ALTER INDEX weather_history_as_of RENAME TO weather_changes_as_of;

-- Rows are appended only after checking which event ids the table holds
-- (read_models/fresh.rs) and the key serves nothing else, so a bulk rebuild
-- may drop it while appending and build it once at the end.
COMMENT ON TABLE weather_changes IS 'worldline event log: one row per event id';

-- The periods in the shape the table had (valid from its tick, inclusive, until
-- the next change's tick, exclusive; NULL for the period still running), for
-- people and tools reading SQL. A filter on world_id and region reaches the
-- table, but each read still runs the window over the region's whole history:
-- the query API probes weather_changes for the next change instead.
CREATE VIEW weather_history AS
SELECT event_id,
       world_id,
       region,
       valid_from_tick,
       lead(valid_from_tick) OVER (
           PARTITION BY world_id, region ORDER BY valid_from_tick, log_offset
       ) AS valid_to_tick,
       condition,
       previous_condition,
       temperature_dc,
       wind_dmps,
       precipitation_dmmph,
       occurred_at,
       log_offset
  FROM weather_changes;

-- Marks seen_events as an event log: one row per event id, appended only after checking
-- which ids it holds (read_models/fresh.rs), its key used for nothing else. A bulk
-- rebuild drops that key while appending and builds it once at the end.
COMMENT ON TABLE seen_events IS 'worldline event log: one row per event id';

-- The inference log filtered by model over a time window, in keyset order.
CREATE INDEX inferences_by_world_model_time ON inferences (world_id, model_id, occurred_at, event_id);

-- Keyset pagination of the choices log by story and by player walks these in order.
CREATE INDEX choices_by_story ON choices (world_id, story_id, tick, event_id);
CREATE INDEX choices_by_player_keyset ON choices (world_id, player_id, tick, event_id);
DROP INDEX choices_by_player;

-- The inference read model: the log of model inferences, and per world, model
-- and purpose, one-minute buckets of counts, tokens, cost and a latency histogram
-- from which p50/p95/p99 are read.
CREATE TABLE inferences (
    event_id          uuid        PRIMARY KEY,
    world_id          text        NOT NULL,
    tick              bigint      NOT NULL,
    occurred_at       timestamptz NOT NULL,
    model_id          text        NOT NULL,
    model_version     text        NOT NULL,
    purpose           text        NOT NULL,
    prompt_tokens     integer     NOT NULL,
    completion_tokens integer     NOT NULL,
    latency_ms        integer     NOT NULL,
    cost_micro_usd    bigint      NOT NULL,
    outcome           text        NOT NULL,
    npc_id            text        NOT NULL,
    input_hash        text        NOT NULL
);
CREATE INDEX inferences_by_world_time ON inferences (world_id, occurred_at, event_id);

CREATE TABLE model_stats (
    world_id          text        NOT NULL,
    model_id          text        NOT NULL,
    purpose           text        NOT NULL,
    bucket_start      timestamptz NOT NULL,
    inferences        bigint      NOT NULL,
    failures          bigint      NOT NULL,
    prompt_tokens     bigint      NOT NULL,
    completion_tokens bigint      NOT NULL,
    cost_micro_usd    bigint      NOT NULL,
    latency_sum_ms    bigint      NOT NULL,
    latency_max_ms    integer     NOT NULL,
    -- Counts per latency bucket; bucket i holds latencies up to the i-th bound of
    -- 10,25,50,75,100,150,200,300,400,500,750,1000,1500,2000,3000,5000,7500,10000,20000 ms,
    -- bucket 20 everything slower (the same bounds as LATENCY_BOUNDS_MS in inference.rs).
    latency_histogram bigint[]    NOT NULL,
    PRIMARY KEY (world_id, model_id, purpose, bucket_start)
);

-- The q-quantile of a latency histogram: the upper bound of the bucket where the
-- cumulative count first reaches q of the total (20000 for the open bucket).
-- Exact to the bucket, which is what dashboards need. No table references, so it
-- works whatever the caller's search_path.
CREATE FUNCTION histogram_quantile(histogram bigint[], q double precision)
RETURNS integer LANGUAGE sql IMMUTABLE AS $$
    SELECT COALESCE(
        (SELECT (ARRAY[10,25,50,75,100,150,200,300,400,500,750,1000,1500,2000,3000,
                       5000,7500,10000,20000,20000])[c.i]
           FROM (SELECT i, sum(histogram[i]) OVER (ORDER BY i) AS cumulative
                   FROM generate_subscripts(histogram, 1) AS i) c
          WHERE c.cumulative > 0
            AND c.cumulative >= q * (SELECT sum(x) FROM unnest(histogram) AS x)
          ORDER BY c.i
          LIMIT 1),
        0)
$$;

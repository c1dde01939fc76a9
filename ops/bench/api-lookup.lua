-- wrk script of ops/bench/api.sh: point lookups over random known worlds.
--
--   wrk ... -s ops/bench/api-lookup.lua <base-url> -- <worlds-file> <token> <path>
--
-- <worlds-file> holds one world id per line; <path> is a route template with
-- `{world}`, e.g. /v1/worlds/{world}/clock. Every request carries
-- `Authorization: Bearer <token>`. The requests are formatted once per thread,
-- so the Lua side costs one table lookup per request.
--
-- `done` prints one `key value` line per figure (latencies in microseconds)
-- for the calling script to parse.

local threads = 0

function setup(thread)
    threads = threads + 1
    thread:set("thread_number", threads)
end

local prepared = {}

function init(args)
    local worlds_file, token, template = args[1], args[2], args[3]
    assert(worlds_file and token and template, "usage: -- <worlds-file> <token> <path>")
    local headers = { ["Authorization"] = "Bearer " .. token }
    for world in io.lines(worlds_file) do
        if world ~= "" then
            -- A function replacement: world ids may hold characters gsub treats specially.
            local path = template:gsub("{world}", function() return world end)
            prepared[#prepared + 1] = wrk.format("GET", path, headers)
        end
    end
    assert(#prepared > 0, "no worlds in " .. worlds_file)
    math.randomseed(os.time() * 1000 + (thread_number or 0))
end

function request()
    return prepared[math.random(#prepared)]
end

function done(summary, latency, _requests)
    local seconds = summary.duration / 1e6
    local errors = summary.errors
    io.write(string.format("requests %d\n", summary.requests))
    io.write(string.format("seconds %.3f\n", seconds))
    io.write(string.format("rate %.1f\n", summary.requests / seconds))
    io.write(string.format("mean_us %.1f\n", latency.mean))
    io.write(string.format("p50_us %d\n", latency:percentile(50)))
    io.write(string.format("p90_us %d\n", latency:percentile(90)))
    io.write(string.format("p99_us %d\n", latency:percentile(99)))
    io.write(string.format("max_us %d\n", latency.max))
    io.write(string.format("non_2xx %d\n", errors.status))
    io.write(string.format("socket_errors %d\n", errors.connect + errors.read + errors.write + errors.timeout))
end

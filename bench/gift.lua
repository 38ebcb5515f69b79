-- wrk script: POST unique canonical gifts over keep-alive connections.
-- Each thread numbers its gifts; ids are unique per run (a run prefix).
local counter = 0
local prefix = os.getenv("GIFT_RUN") or tostring(os.time())
local nthreads = 0
local threads = {}

-- runs in the main Lua state; `tid` becomes a global of each thread's state
function setup(thread)
    nthreads = nthreads + 1
    thread:set("tid", nthreads)
    table.insert(threads, thread)
end

function init(args)
    wrk.method = "POST"
    wrk.headers["Content-Type"] = "application/json"
end

function request()
    counter = counter + 1
    local body = string.format(
        '{"event":"gift","platform":"tiktok","userId":"user_%d","userName":"Bench",' ..
        '"giftName":"Motor","diamond":10,"quantity":1,"timestamp":1700000000000,' ..
        '"eventId":"b%s-%d-%d"}', counter % 5000, prefix, tid, counter)
    return wrk.format(nil, nil, nil, body)
end

function response(status, headers, body)
    if status == 202 then
        accepted = (accepted or 0) + 1
        if string.find(body, '"duplicate":true', 1, true) then
            duplicates = (duplicates or 0) + 1
        end
    else
        others = (others or 0) + 1
    end
end

function done(summary, latency, requests)
    local a, d, o = 0, 0, 0
    for _, t in ipairs(threads) do
        a = a + (t:get("accepted") or 0)
        d = d + (t:get("duplicates") or 0)
        o = o + (t:get("others") or 0)
    end
    io.write(string.format(
        "GIFT accepted=%d duplicates=%d other=%d p50_us=%d p99_us=%d\n",
        a, d, o, latency:percentile(50), latency:percentile(99)))
end

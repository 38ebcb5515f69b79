// Unit tests of the event -> webhook module against a local fake server:
// signatures, the same body on every retry, 503 + Retry-After, timeouts,
// dropped connections, final 4xx, a full queue.   node --test test/
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { Forwarder, sign, toBody, backoffMs, eventIdOf } from '../lib/webhook.mjs';

const SECRET = 'test-secret-0123456789abcdef';

// A server answering each request with the next entry of `script`:
// a status, 'hang' (never answer) or 'drop' (close the socket).
async function fakeServer(script) {
    const seen = [];
    const sockets = new Set();
    const server = http.createServer((req, res) => {
        const chunks = [];
        req.on('data', (c) => chunks.push(c));
        req.on('end', () => {
            const body = Buffer.concat(chunks).toString('utf8');
            seen.push({ body, sig: req.headers['x-gift-signature'],
                        type: req.headers['content-type'], at: Date.now(),
                        socket: req.socket.remotePort });
            const step = script.length ? script.shift() : 202;
            if (step === 'hang') return;
            if (step === 'drop') { req.socket.destroy(); return; }
            const headers = { 'Content-Type': 'application/json' };
            if (step === 503) headers['Retry-After'] = '0';
            res.writeHead(step, headers);
            res.end(step === 202 ? '{"id":"x","seq":1,"duplicate":false}'
                : `{"error":"e${step}"}`);
        });
    });
    server.on('connection', (s) => { sockets.add(s); s.on('close', () => sockets.delete(s)); });
    await new Promise((r) => server.listen(0, '127.0.0.1', r));
    const url = `http://127.0.0.1:${server.address().port}/gift`;
    const close = () => { for (const s of sockets) s.destroy(); return new Promise((r) => server.close(r)); };
    return { url, seen, close };
}

function verify(body, header) {
    const m = /^t=(\d+),v1=([0-9a-f]{64})$/.exec(header || '');
    if (!m) return false;
    const mac = crypto.createHmac('sha256', SECRET).update(`${m[1]}.${body}`).digest('hex');
    return mac === m[2] && Math.abs(Date.now() / 1000 - Number(m[1])) < 300;
}

const quiet = () => {};

test('sign() is HMAC-SHA256 over "<t>.<body>"', () => {
    const s = sign('k'.repeat(16), '{"a":1}', 1700000000123);
    const mac = crypto.createHmac('sha256', 'k'.repeat(16)).update('1700000000.{"a":1}').digest('hex');
    assert.equal(s, `t=1700000000,v1=${mac}`);
});

test('toBody keeps the event as is and writes BigInt ids as strings', () => {
    assert.equal(toBody({ msgId: 7435990123456789012n, a: [1] }),
        '{"msgId":"7435990123456789012","a":[1]}');
    assert.equal(toBody('{"raw":true}'), '{"raw":true}');
    assert.equal(eventIdOf('{"common":{"msgId":"77"}}'), 'tt:77');
    assert.equal(eventIdOf('{"msgId":"78"}'), 'tt:78');
    assert.equal(eventIdOf('{"eventId":"e1","msgId":"78"}'), 'e1');
});

test('back-off grows exponentially, with jitter, up to the cap', () => {
    const o = { baseMs: 100, maxMs: 1000 };
    assert.equal(backoffMs(0, o, () => 0), 25);
    assert.equal(backoffMs(0, o, () => 1), 100);
    assert.equal(backoffMs(2, o, () => 1), 400);
    assert.equal(backoffMs(10, o, () => 1), 1000);
    assert.ok(backoffMs(3, o, () => 0.5) >= 200 && backoffMs(3, o, () => 0.5) <= 800);
});

test('503, a timeout and a dropped connection are retried with the same body', async () => {
    const srv = await fakeServer([503, 'hang', 'drop', 503, 202]);
    const fw = new Forwarder({ url: srv.url, secret: SECRET, timeoutMs: 300,
        backoffBaseMs: 10, backoffMaxMs: 50, logger: quiet });
    const event = { common: { msgId: '7435990123456789012' }, repeatCount: 3 };
    fw.enqueue(event);
    assert.equal(await fw.drain(10000), true);
    fw.close();
    await srv.close();
    assert.equal(srv.seen.length, 5);
    const bodies = new Set(srv.seen.map((s) => s.body));
    assert.deepEqual([...bodies], [JSON.stringify(event)], 'one body for every attempt');
    for (const s of srv.seen) {
        assert.ok(verify(s.body, s.sig), `valid signature ${s.sig}`);
        assert.equal(s.type, 'application/json');
    }
    assert.deepEqual(fw.stats, { queued: 1, accepted: 1, duplicates: 0, rejected: 0,
        dropped: 0, retries: 4 });
});

test('a 4xx other than 408/429 is final, logged with the body, and spilled', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'gift-fw-'));
    const spill = path.join(dir, 'overflow.jsonl');
    const srv = await fakeServer([422, 202]);
    const logs = [];
    const fw = new Forwarder({ url: srv.url, secret: SECRET, overflowFile: spill,
        logger: (l, m) => logs.push(`${l} ${m}`) });
    fw.enqueue({ msgId: '1', giftName: 'Rose' });
    fw.enqueue({ msgId: '2', giftName: 'Rose' });
    assert.equal(await fw.drain(5000), true);
    fw.close();
    await srv.close();
    assert.equal(fw.stats.rejected, 1);
    assert.equal(fw.stats.accepted, 1);
    assert.ok(logs.some((l) => /^error event tt:1 rejected: 422 .*"giftName":"Rose"/.test(l)), logs.join('\n'));
    assert.equal(fs.readFileSync(spill, 'utf8'), '{"msgId":"1","giftName":"Rose"}\n');
    fs.rmSync(dir, { recursive: true });
});

test('keep-alive: sequential posts share one connection', async () => {
    const srv = await fakeServer([]);
    const fw = new Forwarder({ url: srv.url, secret: SECRET, logger: quiet });
    for (let i = 0; i < 5; i++) fw.enqueue({ eventId: `k${i}` });
    assert.equal(await fw.drain(5000), true);
    fw.close();
    await srv.close();
    assert.equal(srv.seen.length, 5);
    assert.equal(new Set(srv.seen.map((s) => s.socket)).size, 1);
    assert.deepEqual(srv.seen.map((s) => JSON.parse(s.body).eventId), ['k0', 'k1', 'k2', 'k3', 'k4']);
});

test('a full queue refuses loudly, never silently', async () => {
    const srv = await fakeServer(['hang']);
    const logs = [];
    const fw = new Forwarder({ url: srv.url, secret: SECRET, queueMax: 2, timeoutMs: 200,
        backoffBaseMs: 10, logger: (l, m) => logs.push(`${l} ${m}`) });
    const r = [1, 2, 3, 4].map((i) => fw.enqueue({ eventId: `q${i}` }));
    // the first is in flight, two wait, the fourth does not fit
    assert.deepEqual(r, [true, true, true, false]);
    assert.ok(logs.some((l) => /^error NOT forwarded \(queue full .*"eventId":"q4"/.test(l)), logs.join('\n'));
    assert.equal(await fw.drain(5000), true);
    fw.close();
    await srv.close();
    assert.equal(fw.stats.accepted, 3);
    assert.equal(fw.stats.dropped, 1);
});

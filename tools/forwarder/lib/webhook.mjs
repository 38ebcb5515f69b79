// The event -> webhook half of the forwarder: sign, post, retry, never drop
// silently.  Node built-ins only (no TikTok library), so it runs and is
// tested where tiktok-live-connector is not installed.
//
//   const fw = new Forwarder({ url, secret });
//   fw.enqueue(event);          // any JSON-able object; posted as is
//   await fw.drain(10000);      // wait until the queue is empty
//
// Each event is posted with the same body on every attempt (so the gift
// pipeline deduplicates a retry by its event id) and a fresh signature
// (X-Gift-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>).
// 503, 429, other 5xx, timeouts and network errors are retried forever with
// exponential back-off and full jitter (at least Retry-After).  A 4xx other
// than 408/429 is final: the event is logged with its body, counted as
// rejected, and written to the overflow file when one is configured.

import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import https from 'node:https';

export function sign(secret, body, now = Date.now()) {
    const t = Math.floor(now / 1000);
    const mac = crypto.createHmac('sha256', secret).update(`${t}.${body}`)
        .digest('hex');
    return `t=${t},v1=${mac}`;
}

// JSON as TikTok-Live-Connector's objects need it: 64-bit ids that arrive as
// BigInt become decimal strings (JSON.stringify would throw on them).
export function toBody(event) {
    if (typeof event === 'string') return event;
    if (Buffer.isBuffer(event)) return event.toString('utf8');
    return JSON.stringify(event, (k, v) =>
        typeof v === 'bigint' ? v.toString() : v);
}

// The id the pipeline will derive (for logs only; the server decides).
export function eventIdOf(body) {
    try {
        const e = JSON.parse(body);
        const msgId = e.eventId ?? e.msgId ?? e.common?.msgId ?? e.event?.msgId;
        if (e.eventId) return String(e.eventId);
        if (msgId && msgId !== '0') return `tt:${msgId}`;
    } catch { /* not JSON: the server will say so */ }
    return '(content hash)';
}

const RETRY_STATUSES = new Set([408, 425, 429, 500, 502, 503, 504]);

export function backoffMs(attempt, { baseMs, maxMs }, random = Math.random) {
    // full jitter: uniform in [0, min(max, base * 2^attempt)], at least 1/4
    // of it so that a burst of retries does not hammer the server at once
    const cap = Math.min(maxMs, baseMs * 2 ** Math.min(attempt, 30));
    return Math.round(cap / 4 + random() * cap * 3 / 4);
}

function parseRetryAfter(v) {
    if (!v) return 0;
    const s = Number(v);
    if (Number.isFinite(s) && s >= 0) return s * 1000;
    const d = Date.parse(v);
    return Number.isFinite(d) ? Math.max(0, d - Date.now()) : 0;
}

export function defaultLogger(level, msg) {
    process.stderr.write(`${new Date().toISOString()} ${level} gift-forwarder: ${msg}\n`);
}

export class Forwarder {
    constructor(opts) {
        this.url = new URL(opts.url);
        this.secret = opts.secret || '';
        this.timeoutMs = opts.timeoutMs ?? 5000;
        this.queueMax = opts.queueMax ?? 10000;
        this.concurrency = opts.concurrency ?? 1;
        this.backoff = { baseMs: opts.backoffBaseMs ?? 250,
                         maxMs: opts.backoffMaxMs ?? 30000 };
        this.overflowFile = opts.overflowFile || '';
        this.log = opts.logger ?? defaultLogger;
        this.verbose = opts.verbose ?? false;
        const mod = this.url.protocol === 'https:' ? https : http;
        this.transport = mod;
        this.agent = new mod.Agent({ keepAlive: true,
            maxSockets: this.concurrency, keepAliveMsecs: 30000 });
        this.queue = [];            // bodies waiting
        this.active = 0;            // posts in flight (with their retries)
        this.closed = false;
        this.waiters = [];
        this.timers = new Set();
        this.stats = { queued: 0, accepted: 0, duplicates: 0, rejected: 0,
                       dropped: 0, retries: 0 };
        if (!this.secret) {
            this.log('warning', 'GIFT_SECRET is not set: webhooks go unsigned');
        }
    }

    // Queue one event; false when it could not be queued (and was logged,
    // with its body, and written to the overflow file if there is one).
    enqueue(event) {
        const body = toBody(event);
        if (this.closed) {
            this.spill(body, 'forwarder is stopping');
            return false;
        }
        if (this.queue.length >= this.queueMax) {
            this.spill(body, `queue full (${this.queueMax} events waiting)`);
            return false;
        }
        this.queue.push(body);
        this.stats.queued++;
        this.pump();
        return true;
    }

    spill(body, why) {
        this.stats.dropped++;
        this.log('error', `NOT forwarded (${why}): event ${eventIdOf(body)}: ${body}`);
        this.writeOverflow(body);
    }

    writeOverflow(body) {
        if (!this.overflowFile) return;
        try {
            fs.appendFileSync(this.overflowFile, body.replace(/\n/g, ' ') + '\n');
        } catch (e) {
            this.log('error', `overflow file ${this.overflowFile}: ${e.message}`);
        }
    }

    pending() { return this.queue.length + this.active; }

    pump() {
        while (this.active < this.concurrency && this.queue.length > 0) {
            const body = this.queue.shift();
            this.active++;
            this.deliver(body).finally(() => {
                this.active--;
                this.pump();
                if (this.pending() === 0) {
                    for (const w of this.waiters.splice(0)) w();
                }
            });
        }
    }

    // Resolves true when everything queued has been delivered (or rejected
    // for good), false after timeoutMs with events still pending.
    drain(timeoutMs = Infinity) {
        if (this.pending() === 0) return Promise.resolve(true);
        return new Promise((resolve) => {
            let t = null;
            const done = () => { if (t) clearTimeout(t); resolve(true); };
            this.waiters.push(done);
            if (Number.isFinite(timeoutMs)) {
                t = setTimeout(() => {
                    this.waiters = this.waiters.filter((w) => w !== done);
                    resolve(false);
                }, timeoutMs);
            }
        });
    }

    // Stop: no new events; what is still queued is logged and spilled.
    close() {
        this.closed = true;
        for (const body of this.queue.splice(0)) {
            this.spill(body, 'forwarder stopped before posting it');
        }
        for (const t of this.timers) clearTimeout(t);
        this.timers.clear();
        this.agent.destroy();
    }

    sleep(ms) {
        return new Promise((resolve) => {
            const t = setTimeout(() => { this.timers.delete(t); resolve(); }, ms);
            this.timers.add(t);
        });
    }

    async deliver(body) {
        const id = eventIdOf(body);
        for (let attempt = 0; ; attempt++) {
            if (this.closed) {
                this.spill(body, 'forwarder stopped while retrying it');
                return;
            }
            const r = await this.post(body);
            if (r.status === 202 || (r.status >= 200 && r.status < 300)) {
                let dup = false;
                try { dup = JSON.parse(r.body).duplicate === true; } catch { /* */ }
                this.stats.accepted++;
                if (dup) this.stats.duplicates++;
                if (this.verbose || attempt > 0) {
                    this.log('info', `event ${id}: ${r.status}${dup ? ' (duplicate)' : ''}` +
                        (attempt > 0 ? ` after ${attempt} retries` : ''));
                }
                return;
            }
            const retryable = r.status === 0 || RETRY_STATUSES.has(r.status);
            if (!retryable) {
                this.stats.rejected++;
                this.log('error', `event ${id} rejected: ${r.status} ` +
                    `${(r.body || '').trim()}; body: ${body}`);
                this.writeOverflow(body);
                return;
            }
            const wait = Math.max(backoffMs(attempt, this.backoff),
                                  parseRetryAfter(r.retryAfter));
            this.stats.retries++;
            this.log('warning', `event ${id}: ${r.status ? r.status + ' ' +
                (r.body || '').trim() : r.error}; retry ${attempt + 1} in ${wait} ms`);
            await this.sleep(wait);
        }
    }

    // One attempt: { status, body, retryAfter } or { status: 0, error }.
    post(body) {
        return new Promise((resolve) => {
            const headers = {
                'Content-Type': 'application/json',
                'Content-Length': Buffer.byteLength(body),
                'User-Agent': 'gift-forwarder/0.1',
            };
            if (this.secret) headers['X-Gift-Signature'] = sign(this.secret, body);
            let settled = false;
            const finish = (r) => { if (!settled) { settled = true; resolve(r); } };
            const req = this.transport.request(this.url, {
                method: 'POST', agent: this.agent, headers,
            }, (res) => {
                const chunks = [];
                res.on('data', (c) => chunks.push(c));
                res.on('end', () => finish({ status: res.statusCode,
                    body: Buffer.concat(chunks).toString('utf8'),
                    retryAfter: res.headers['retry-after'] }));
                res.on('error', (e) => finish({ status: 0, error: e.message }));
            });
            // no answer (headers and body) within timeoutMs: a timeout
            req.setTimeout(this.timeoutMs, () => {
                req.destroy(new Error(`timeout after ${this.timeoutMs} ms`));
            });
            req.on('error', (e) => finish({ status: 0, error: e.message || e.code }));
            req.end(body);
        });
    }
}

// Configuration from the environment (see README.md).
export function optionsFromEnv(env = process.env) {
    const num = (k, d) => {
        if (env[k] === undefined || env[k] === '') return d;
        const n = Number(env[k]);
        if (!Number.isFinite(n) || n < 0) throw new Error(`${k}: not a number: ${env[k]}`);
        return n;
    };
    if (!env.GIFT_URL) throw new Error('GIFT_URL is not set (e.g. http://127.0.0.1:8080/gift)');
    return {
        url: env.GIFT_URL,
        secret: env.GIFT_SECRET || '',
        timeoutMs: num('GIFT_TIMEOUT_MS', 5000),
        queueMax: num('GIFT_QUEUE_MAX', 10000),
        concurrency: Math.max(1, num('GIFT_CONCURRENCY', 1)),
        backoffBaseMs: num('GIFT_BACKOFF_MS', 250),
        backoffMaxMs: num('GIFT_BACKOFF_MAX_MS', 30000),
        overflowFile: env.GIFT_OVERFLOW_FILE || '',
        verbose: env.GIFT_VERBOSE === '1',
    };
}

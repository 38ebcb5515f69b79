#!/usr/bin/env node
// gift-forwarder: TikTok LIVE gifts (TikTok-Live-Connector 2.x) -> the gift
// pipeline's signed webhook, with retries.  See README.md.
//
//   GIFT_URL=http://127.0.0.1:8080/gift GIFT_SECRET=... TIKTOK_USERNAME=someone \
//       node index.mjs                      follow a live stream
//   node index.mjs --replay FILE...         post recorded events and exit
//                                           (a JSON object per file, or JSON lines)
//   node index.mjs --check                  load the TikTok library and exit
//
// Every gift event is posted as the library emits it (the webhook accepts
// TikTok-Live-Connector's event shapes and takes the event id from msgId),
// so a retry is deduplicated by the pipeline.

import fs from 'node:fs';
import { Forwarder, optionsFromEnv, defaultLogger as log } from './lib/webhook.mjs';

const DRAIN_MS = Number(process.env.GIFT_DRAIN_MS ?? 10000);

function summary(fw) {
    const s = fw.stats;
    return `forwarded ${s.accepted} (duplicates ${s.duplicates}), rejected ` +
        `${s.rejected}, not forwarded ${s.dropped}, retries ${s.retries}`;
}

// Read recorded events: a file holding one JSON object, or JSON lines.  The
// text is posted as it is (re-encoding would round 64-bit ids written as
// JSON numbers); it is only parsed to check it.
export function readEvents(file) {
    const text = fs.readFileSync(file, 'utf8');
    try {
        JSON.parse(text);
        return [text.trim()];
    } catch {
        return text.split('\n').filter((l) => l.trim() !== '').map((l, i) => {
            try { JSON.parse(l); } catch (e) {
                throw new Error(`${file}:${i + 1}: ${e.message}`);
            }
            return l.trim();
        });
    }
}

async function replay(files) {
    const fw = new Forwarder(optionsFromEnv());
    let n = 0;
    for (const f of files) {
        for (const ev of readEvents(f)) {
            fw.enqueue(ev);
            n++;
        }
    }
    log('info', `replaying ${n} events from ${files.length} files`);
    const stop = () => { fw.close(); };
    process.once('SIGINT', stop);
    process.once('SIGTERM', stop);
    const limit = Number(process.env.GIFT_REPLAY_TIMEOUT_MS ?? 0);
    const ok = await fw.drain(limit > 0 ? limit : Infinity);
    if (!ok) fw.close();
    else fw.agent.destroy();
    log('info', summary(fw));
    return ok && fw.stats.rejected === 0 && fw.stats.dropped === 0 ? 0 : 1;
}

// Lazily: only live mode needs the TikTok library.
async function loadLibrary() {
    try {
        return await import('tiktok-live-connector');
    } catch (e) {
        throw new Error(`cannot load tiktok-live-connector (run 'npm ci' in ` +
            `tools/forwarder): ${e.message}`);
    }
}

async function check() {
    const lib = await loadLibrary();
    const ok = typeof lib.TikTokLiveConnection === 'function'
        && lib.WebcastEvent?.GIFT === 'gift'
        && lib.ControlEvent?.DISCONNECTED !== undefined;
    console.log(`tiktok-live-connector ${lib.VERSION ?? '?'}: ` +
        (ok ? 'TikTokLiveConnection, WebcastEvent.GIFT, ControlEvent present'
            : 'API not as expected'));
    return ok ? 0 : 1;
}

async function live() {
    const user = process.env.TIKTOK_USERNAME;
    if (!user) throw new Error('TIKTOK_USERNAME is not set');
    const fw = new Forwarder(optionsFromEnv());
    const lib = await loadLibrary();
    const { TikTokLiveConnection, WebcastEvent, ControlEvent } = lib;
    const options = {
        // names and diamond counts for every gift, from the room's gift list
        enableExtendedGiftInfo: true,
        // do not replay the batch of recent messages that comes with the
        // connection: those gifts may have been forwarded before a restart
        processInitialData: false,
    };
    if (process.env.TIKTOK_SIGN_API_KEY) options.signApiKey = process.env.TIKTOK_SIGN_API_KEY;
    const conn = new TikTokLiveConnection(user, options);

    let stopping = false;
    let attempt = 0;
    const reconnect = async () => {
        while (!stopping) {
            try {
                const state = await conn.connect();
                attempt = 0;
                log('info', `connected to @${user}'s LIVE (room ${state?.roomId ?? '?'})`);
                return;
            } catch (e) {
                const wait = Math.min(60000, 2000 * 2 ** Math.min(attempt++, 5));
                log('warning', `cannot connect to @${user}: ${e.message}; again in ${wait} ms`);
                await new Promise((r) => setTimeout(r, wait));
            }
        }
    };

    conn.on(WebcastEvent.GIFT, (data) => { fw.enqueue(data); });
    conn.on(ControlEvent.DISCONNECTED, () => {
        if (stopping) return;
        log('warning', 'disconnected from TikTok; reconnecting');
        setTimeout(reconnect, 1000);
    });
    conn.on(WebcastEvent.STREAM_END, () => {
        log('info', 'the LIVE ended; waiting for the next one');
    });
    conn.on(ControlEvent.ERROR, (e) => {
        log('warning', `TikTok connection: ${e?.info ?? e?.message ?? e}`);
    });

    const stop = async (sig) => {
        if (stopping) return;
        stopping = true;
        log('info', `${sig}: stopping; posting what is queued (up to ${DRAIN_MS} ms)`);
        await Promise.resolve().then(() => conn.disconnect()).catch(() => {});
        const drained = await fw.drain(DRAIN_MS);
        fw.close();
        log('info', summary(fw));
        process.exit(drained ? 0 : 1);
    };
    process.on('SIGINT', () => stop('SIGINT'));
    process.on('SIGTERM', () => stop('SIGTERM'));
    setInterval(() => {
        if (fw.pending() > 0 || fw.stats.retries > 0) log('info', `${summary(fw)}; pending ${fw.pending()}`);
    }, 60000).unref();

    await reconnect();
}

async function main(argv) {
    if (argv[0] === '--replay') return replay(argv.slice(1));
    if (argv[0] === '--check') return check();
    if (argv[0] === '-h' || argv[0] === '--help') {
        console.log('usage: node index.mjs [--replay FILE... | --check]  (configuration: see README.md)');
        return 0;
    }
    await live();
    return null;        // runs until a signal
}

main(process.argv.slice(2)).then((code) => {
    if (code !== null) process.exitCode = code;
}, (e) => {
    log('error', e.message);
    process.exitCode = 2;
});

// A headless Chromium for the Perl tests (t/40-overlay.t), driven over
// stdin/stdout: one JSON command per line in, one JSON answer per line out.
// The Perl side starts the servers, publishes acknowledgements and makes
// the assertions; this script only opens pages, reads what they show and
// takes screenshots.
//
//   node t/browser/driver.mjs --user-data-dir DIR [--timeout-s 90]
//
// Commands: {"id":1,"cmd":"goto","url":"...","width":1920,"height":1080}
//           {"id":2,"cmd":"view"}               what the overlay shows
//           {"id":3,"cmd":"eval","expr":"..."}  a JS expression's JSON value
//           {"id":4,"cmd":"screenshot","path":"...","transparent":true}
//           {"id":5,"cmd":"block","url":"**/gift/events*"}  requests
//                 to such URLs fail (a network error) until "unblock"
//           {"id":6,"cmd":"unblock","url":"**/gift/events*"}
//           {"id":7,"cmd":"close"}
// Answers:  {"id":1,"ok":true,"value":...} or {"id":1,"ok":false,"error":"..."}
//
// Uses Debian's /usr/bin/chromium (never a downloaded browser).  The
// browser is closed when stdin ends, on SIGTERM/SIGINT, on "close", and by
// a watchdog after --timeout-s, so a test that dies leaves no browser.

import { chromium } from 'playwright-core';
import { createInterface } from 'node:readline';

const argv = process.argv.slice(2);
const opt = (name, dflt) => {
    const i = argv.indexOf(name);
    return i >= 0 && i + 1 < argv.length ? argv[i + 1] : dflt;
};
const userDataDir = opt('--user-data-dir');
const timeoutS = Number(opt('--timeout-s', '90'));
const executablePath = process.env.GIFT_CHROMIUM || '/usr/bin/chromium';

if (!userDataDir) {
    console.error('driver: --user-data-dir DIR is required');
    process.exit(2);
}

const send = (o) => process.stdout.write(JSON.stringify(o) + '\n');

let context = null;
let page = null;
let closing = null;
const problems = [];      // uncaught page errors, CSP violations

async function shutdown(code) {
    if (!closing) {
        closing = (async () => {
            try {
                if (context) {
                    await context.close();
                }
            } catch (e) {
                console.error('driver: close: ' + e.message);
            }
        })();
    }
    await closing;
    process.exit(code);
}

process.on('SIGTERM', () => shutdown(1));
process.on('SIGINT', () => shutdown(1));
setTimeout(() => {
    console.error(`driver: watchdog: ${timeoutS}s elapsed, closing the browser`);
    shutdown(3);
}, timeoutS * 1000).unref();

// What the overlay shows, read from its DOM as a viewer would see it.
function readView() {
    const q = (sel, root = document) => root.querySelector(sel);
    const txt = (sel, root) => {
        const e = q(sel, root);
        return e ? e.textContent : null;
    };
    const conn = q('#conn');
    const notice = q('#notice');
    const feed = [...document.querySelectorAll('#feed > li')].map((li) => ({
        seq: li.dataset.seq ?? null,
        status: li.classList.contains('dead') ? 'dead_letter' : 'ok',
        who: txt('.who', li),
        gift: txt('.gift', li),
        qty: txt('.qty', li),
        rounds: txt('.rounds', li),
        device: txt('.device', li),
        statusText: txt('.status', li),
        latency: txt('.latency', li),
        when: txt('.when', li),
        text: li.innerText,
    }));
    const totals = [...document.querySelectorAll('#totals-body tr')].map(
        (tr) => ({
            device: tr.cells[0].textContent,
            rounds: tr.cells[1].textContent,
            gifts: tr.cells[2].textContent,
            failed: tr.cells[3].textContent,
        }));
    const box = (sel) => {
        const e = q(sel);
        if (!e) {
            return null;
        }
        const r = e.getBoundingClientRect();
        const cs = getComputedStyle(e);
        return {
            x: r.x, y: r.y, w: r.width, h: r.height,
            visible: r.width > 0 && r.height > 0 && cs.display !== 'none'
                && cs.visibility !== 'hidden',
        };
    };
    const firstWho = q('#feed > li .who');
    const bodyCs = getComputedStyle(document.body);
    return {
        state: conn.dataset.state,
        connText: conn.innerText.replace(/\s+/g, ' ').trim(),
        lastId: txt('#conn-id'),
        notice: notice.hidden ? null : notice.textContent,
        feed,
        totals,
        // elements inside the feed that the page's template does not make
        foreign: document.querySelectorAll(
            '#feed *:not(li):not(div):not(span):not(bdi):not(time)').length,
        pwned: window.__pwned ?? null,
        layout: {
            innerWidth, innerHeight,
            scrollWidth: document.documentElement.scrollWidth,
            bodyBackground: bodyCs.backgroundColor,
            htmlBackground: getComputedStyle(document.documentElement)
                .backgroundColor,
            whoFontPx: firstWho
                ? parseFloat(getComputedStyle(firstWho).fontSize) : null,
            whoTextShadow: firstWho
                ? getComputedStyle(firstWho).textShadow : null,
            feedPanel: box('.feed-panel'),
            totalsPanel: box('.totals-panel'),
            firstEntry: box('#feed > li'),
            conn: box('#conn'),
        },
    };
}

async function launch() {
    context = await chromium.launchPersistentContext(userDataDir, {
        executablePath,
        headless: true,
        args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic',
            '--no-first-run', '--disable-background-networking',
            '--disable-component-update', '--disable-sync',
            // e.g. a name that resolves to 127.0.0.1 (DNS rebinding, t/41)
            ...(process.env.GIFT_CHROMIUM_HOST_RULES
                ? ['--host-resolver-rules=' + process.env.GIFT_CHROMIUM_HOST_RULES]
                : [])],
        viewport: { width: 1920, height: 1080 },
        reducedMotion: 'reduce',     // screenshots without half-faded entries
        timeout: 30000,
    });
}

async function newPage(c) {
    if (page) {
        await page.close();
    }
    page = await context.newPage();
    page.setDefaultTimeout(15000);
    await page.setViewportSize({ width: c.width ?? 1920, height: c.height ?? 1080 });
    page.on('pageerror', (e) => problems.push('pageerror: ' + e.message));
    page.on('console', (m) => {
        if (/Content Security Policy|Refused to/i.test(m.text())) {
            problems.push('console: ' + m.text());
        }
    });
    const res = await page.goto(c.url, { waitUntil: 'load' });
    return { status: res ? res.status() : null };
}

const handlers = {
    goto: newPage,
    view: async () => ({ ...(await page.evaluate(readView)), problems }),
    eval: async (c) => page.evaluate(c.expr),
    screenshot: async (c) => {
        await page.screenshot({ path: c.path, omitBackground: !!c.transparent,
            fullPage: !!c.fullPage });
        return { path: c.path };
    },
    block: async (c) => {
        await context.route(c.url, (route) => route.abort());
        return true;
    },
    unblock: async (c) => {
        await context.unroute(c.url);
        return true;
    },
    close: async () => {
        await context.close();
        context = null;
        return true;
    },
};

try {
    await launch();
} catch (e) {
    send({ id: 0, ok: false, error: 'launch: ' + e.message });
    process.exit(1);
}
const browser = context.browser();
send({ id: 0, ok: true, value: { ready: true,
    version: browser ? browser.version() : null } });

const rl = createInterface({ input: process.stdin });
let queue = Promise.resolve();
rl.on('line', (line) => {
    queue = queue.then(async () => {
        let c;
        try {
            c = JSON.parse(line);
        } catch (e) {
            send({ id: null, ok: false, error: 'bad JSON: ' + e.message });
            return;
        }
        const h = handlers[c.cmd];
        if (!h) {
            send({ id: c.id, ok: false, error: 'unknown command ' + c.cmd });
            return;
        }
        try {
            const value = await h(c);
            send({ id: c.id, ok: true, value: value ?? null });
            if (c.cmd === 'close') {
                process.exit(0);
            }
        } catch (e) {
            send({ id: c.id, ok: false, error: e.message });
        }
    });
});
rl.on('close', () => queue.then(() => shutdown(0)));

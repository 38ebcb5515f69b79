// A WebSocket client built on the npm `ws` library, driven by t/33-ws-lib.t:
// one JSON command per line on stdin, one JSON result per line on stdout.
//   {"cmd":"open","url":"ws://...","origin":"..."}  -> {"open":true} | {"error":...,"status":N}
//   {"cmd":"send","data":{...}}                     -> {"sent":true}
//   {"cmd":"take","n":N,"timeout":ms}               -> {"messages":[...]}
//   {"cmd":"ping"}                                   -> {"pong":true,"ms":..}
//   {"cmd":"close","code":1000}                      -> {"closed":code}
import WebSocket from 'ws';
import readline from 'node:readline';

let ws = null;
const inbox = [];
let waiter = null;
let pongWaiter = null;
let closeWaiter = null;
let pings = 0;

const out = (o) => process.stdout.write(JSON.stringify(o) + '\n');

function deliver() {
  if (waiter && (inbox.length >= waiter.n)) {
    const w = waiter;
    waiter = null;
    clearTimeout(w.timer);
    w.resolve(inbox.splice(0, w.n));
  }
}

const commands = {
  open: (c) => new Promise((resolve) => {
    ws = new WebSocket(c.url, { origin: c.origin });
    ws.on('open', () => resolve({ open: true }));
    ws.on('unexpected-response', (req, res) => resolve({ error: 'refused', status: res.statusCode }));
    ws.on('error', (e) => resolve({ error: String(e.message || e) }));
    ws.on('message', (data, isBinary) => {
      inbox.push(isBinary ? { binary: true } : JSON.parse(data.toString()));
      deliver();
    });
    ws.on('ping', () => { pings++; });
    ws.on('pong', () => { if (pongWaiter) { pongWaiter(); pongWaiter = null; } });
    ws.on('close', (code) => { if (closeWaiter) { closeWaiter(code); closeWaiter = null; } });
  }),
  send: (c) => { ws.send(JSON.stringify(c.data)); return { sent: true }; },
  take: (c) => new Promise((resolve) => {
    waiter = { n: c.n, resolve: (m) => resolve({ messages: m, pings }) };
    waiter.timer = setTimeout(() => {
      const w = waiter;
      waiter = null;
      if (w) resolve({ messages: inbox.splice(0), pings });
    }, c.timeout ?? 5000);
    deliver();
  }),
  ping: () => new Promise((resolve) => {
    const t = process.hrtime.bigint();
    pongWaiter = () => resolve({ pong: true, ms: Number(process.hrtime.bigint() - t) / 1e6 });
    ws.ping('hello');
    setTimeout(() => { if (pongWaiter) { pongWaiter = null; resolve({ pong: false }); } }, 3000);
  }),
  close: (c) => new Promise((resolve) => {
    closeWaiter = (code) => resolve({ closed: code });
    ws.close(c.code ?? 1000, 'bye');
    setTimeout(() => { if (closeWaiter) { closeWaiter = null; resolve({ closed: null }); } }, 3000);
  }),
};

const rl = readline.createInterface({ input: process.stdin });
let chain = Promise.resolve();
rl.on('line', (line) => {
  chain = chain.then(async () => {
    const c = JSON.parse(line);
    try {
      out(await commands[c.cmd](c));
    } catch (e) {
      out({ error: String(e) });
    }
  });
});
rl.on('close', () => { chain.then(() => { if (ws) ws.terminate(); process.exit(0); }); });
setTimeout(() => process.exit(2), 60000).unref();

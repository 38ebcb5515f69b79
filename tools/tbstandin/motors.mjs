#!/usr/bin/env node
// gift-motors: motors as ThingsBoard MQTT devices, one session each (own
// access token), following the firmware contract of docs/thingsboard.md:
//
//   - subscribe to v1/devices/me/rpc/request/+ (QoS 1);
//   - on {"method":"rotate","params":{"events":[{"id","rounds"}...]}}: skip
//     each event whose id is in a bounded window of executed ids, queue the
//     rounds of the others, and answer {"ok":true} on acceptance (also when
//     every event was skipped); another method: {"ok":false,...};
//   - turn the queued rounds one command after another at --speed rounds/s;
//   - on {"method":"stop"} (the emergency stop): answer {"ok":true} at once.
//
// It counts per motor what it did and writes it as JSON on SIGUSR1 and at
// exit (--out), like tbsim:
//   {"snapshot":S,"pid":P,"devices":{"motor_01":{"rpcs","events",
//    "duplicates","rounds","turned","commands","queued","errors","ignored",
//    "connects","max_cmd_rounds","stops"}},"totals":{...}}
// rounds: accepted for turning; turned: turned so far; duplicates: events
// skipped because their id was in the window (repeats); max_cmd_rounds: the
// largest command's rounds (duplicates included, as tbsim counts it);
// stops: "stop" commands.
//
// With --control FILE, SIGUSR2 reads FILE, one command a line:
//   offline D1,D2   disconnect these motors (ThingsBoard: NO_ACTIVE_CONNECTION)
//   online D1,D2    connect them again and answer
//   silent D1,D2    stay connected, receive, never answer (TIMEOUT)
//   latency A[-B]   answer after A..B ms
//   slow D1,D2=MS   these motors answer after MS ms (-1: the global latency)
//   error-rate P    answer {"ok":false,"error":"jammed"} with probability P
//   speed R         turn R rounds a second (0: at once)
// and logs "control: <line>" for each.

import fs from 'node:fs';
import { parseArgs } from 'node:util';
import mqtt from 'mqtt';

const usage = `usage: gift-motors [options]
  --host ADDR          ThingsBoard (stand-in) host (127.0.0.1)
  --port N             its MQTT port (1883)
  --motors N|LIST      motor_01..motor_NN, or a,b,c; access token = name
  --devices FILE       JSON {"devices":[{"name","token","profile"}]}: the
                       devices whose profile is not gift-dispatcher
  --window N           executed event ids remembered per motor (4096)
  --speed R            rounds turned per second, 0 = at once (0)
  --latency-ms A[-B]   answer latency (0)
  --error-rate P       answer ok:false with probability P (0)
  --silent LIST        these motors never answer
  --offline LIST       these motors do not connect
  --seed N             random seed (1)
  --out FILE           totals as JSON on SIGUSR1 and at exit
  --control FILE       commands read on SIGUSR2
  --verbose`;

let opts;
try {
  opts = parseArgs({
    options: {
      host: { type: 'string', default: '127.0.0.1' },
      port: { type: 'string', default: '1883' },
      motors: { type: 'string' },
      devices: { type: 'string' },
      window: { type: 'string', default: '4096' },
      speed: { type: 'string', default: '0' },
      'latency-ms': { type: 'string', default: '0' },
      'error-rate': { type: 'string', default: '0' },
      silent: { type: 'string', default: '' },
      offline: { type: 'string', default: '' },
      seed: { type: 'string', default: '1' },
      out: { type: 'string' },
      control: { type: 'string' },
      verbose: { type: 'boolean', default: false },
      help: { type: 'boolean', default: false },
    },
  }).values;
} catch (e) {
  console.error(`${e.message}\n${usage}`);
  process.exit(2);
}
if (opts.help) { console.log(usage); process.exit(0); }

const log = (...a) => console.log(new Date().toISOString(), ...a);
let seed = Number(opts.seed) >>> 0 || 1;
const rand = () => { seed = (seed * 1664525 + 1013904223) >>> 0; return seed / 4294967296; };
const parseRange = (s) => { const [a, b = a] = String(s).split('-').map(Number); return [a, b]; };
let [latMin, latMax] = parseRange(opts['latency-ms']);
let errorRate = Number(opts['error-rate']);
let speed = Number(opts.speed);
const windowSize = Number(opts.window);

const list = (s) => s.split(',').map((x) => x.trim()).filter(Boolean);
let motors = [];
if (opts.devices) {
  motors = JSON.parse(fs.readFileSync(opts.devices, 'utf8')).devices
    .filter((d) => d.profile !== 'gift-dispatcher').map((d) => ({ name: d.name, token: d.token }));
}
if (opts.motors) {
  const names = /^\d+$/.test(opts.motors)
    ? Array.from({ length: Number(opts.motors) }, (_, i) => `motor_${String(i + 1).padStart(2, '0')}`)
    : list(opts.motors);
  for (const n of names) if (!motors.some((m) => m.name === n)) motors.push({ name: n, token: n });
}
if (!motors.length) { console.error(`gift-motors: no motors\n${usage}`); process.exit(2); }

const silent = new Set(list(opts.silent));
const offline = new Set(list(opts.offline));
const url = `mqtt://${opts.host}:${opts.port}`;

class Motor {
  constructor({ name, token }) {
    this.name = name;
    this.token = token;
    this.window = new Set();           // insertion order: oldest first
    this.queue = [];                   // rounds of accepted commands
    this.turning = false;
    this.c = { rpcs: 0, events: 0, duplicates: 0, rounds: 0, turned: 0, commands: 0, queued: 0, errors: 0, ignored: 0, connects: 0, max_cmd_rounds: 0, stops: 0 };
    this.slowMs = -1;
    this.client = null;
    this.ready = false;
  }

  connect() {
    if (this.client) return;
    const cl = mqtt.connect(url, {
      username: this.token, clientId: this.name, clean: true, protocolVersion: 4,
      reconnectPeriod: 250, connectTimeout: 5000, keepalive: 30,
    });
    this.client = cl;
    cl.on('connect', () => {
      this.c.connects++;
      cl.subscribe('v1/devices/me/rpc/request/+', { qos: 1 }, (err) => {
        if (err) { log(`${this.name}: subscribe: ${err.message}`); return; }
        if (!this.ready) log(`${this.name}: connected`);
        this.ready = true;
        ready();
      });
    });
    cl.on('message', (topic, payload) => this.onRequest(topic, payload));
    cl.on('error', (e) => { if (opts.verbose) log(`${this.name}: ${e.message}`); });
    cl.on('close', () => { if (opts.verbose) log(`${this.name}: connection closed`); });
  }

  disconnect() {
    if (!this.client) return;
    this.client.end(true);
    this.client = null;
    this.ready = false;
  }

  onRequest(topic, payload) {
    const m = /^v1\/devices\/me\/rpc\/request\/(\d+)$/.exec(topic);
    if (!m) return;
    this.c.rpcs++;
    if (silent.has(this.name)) { this.c.ignored++; return; }
    let req;
    try { req = JSON.parse(payload.toString('utf8')); } catch { req = null; }
    let answer;
    if (req && req.method === 'stop') {
      answer = { ok: true };
      this.c.stops++;
    } else if (!req || req.method !== 'rotate') {
      answer = { ok: false, error: 'unknown method' };
      this.c.errors++;
    } else if (errorRate > 0 && rand() < errorRate) {
      answer = { ok: false, error: 'jammed' };
      this.c.errors++;
    } else {
      let todo = 0;
      const evs = Array.isArray(req.params?.events) ? req.params.events : [];
      for (const ev of evs) {
        if (typeof ev?.id !== 'string' || !Number.isInteger(ev.rounds) || ev.rounds < 0) continue;
        if (this.window.has(ev.id)) {
          // named, so that a test that finds repeats can say which gifts
          this.c.duplicates++;
          log(`${this.name}: event ${ev.id} repeated (executed already; rpc ${m[1]})`);
          continue;
        }
        this.window.add(ev.id);
        if (this.window.size > windowSize) this.window.delete(this.window.values().next().value);
        this.c.events++;
        todo += ev.rounds;
      }
      if (!evs.length && Number.isInteger(req.params?.rounds)) todo = req.params.rounds;
      const asked = Number.isInteger(req.params?.rounds) && req.params.rounds > 0 ? req.params.rounds : todo;
      if (asked > this.c.max_cmd_rounds) this.c.max_cmd_rounds = asked;
      this.c.rounds += todo;
      if (todo > 0) this.enqueue(todo);
      answer = { ok: true };
    }
    const send = () => {
      if (this.client) this.client.publish(`v1/devices/me/rpc/response/${m[1]}`, JSON.stringify(answer), { qos: 1 });
    };
    const lat = this.slowMs >= 0 ? this.slowMs : latMin + rand() * (latMax - latMin);
    if (lat > 0) setTimeout(send, lat); else send();
  }

  // Commands turn one after another at the motor's speed.
  enqueue(rounds) {
    this.queue.push(rounds);
    this.c.queued += rounds;
    if (!this.turning) this.turnNext();
  }

  turnNext() {
    const r = this.queue.shift();
    if (r === undefined) { this.turning = false; return; }
    this.turning = true;
    const done = () => {
      this.c.queued -= r;
      this.c.turned += r;
      this.c.commands++;
      this.turnNext();
    };
    if (speed > 0) setTimeout(done, (r / speed) * 1000); else done();
  }
}

const all = motors.map((m) => new Motor(m));
const byName = new Map(all.map((m) => [m.name, m]));
let announced = false;
function ready() {
  if (announced) return;
  if (all.every((m) => offline.has(m.name) || m.ready)) {
    announced = true;
    log(`gift-motors: serving ${all.length} motors on ${url} (window ${windowSize}, speed ${speed || 'instant'})`);
  }
}
for (const m of all) if (!offline.has(m.name)) m.connect();
if (all.every((m) => offline.has(m.name))) ready();

let snapshot = 0;
function writeOut() {
  if (!opts.out) return;
  const devices = {};
  const totals = {};
  for (const m of all) {
    devices[m.name] = { ...m.c, connected: m.ready };
    for (const [k, v] of Object.entries(m.c)) totals[k] = (totals[k] || 0) + v;
  }
  const tmp = `${opts.out}.tmp`;
  fs.writeFileSync(tmp, JSON.stringify({ snapshot: ++snapshot, pid: process.pid, devices, totals }) + '\n');
  fs.renameSync(tmp, opts.out);
}

function control() {
  if (!opts.control) return;
  let text = '';
  try { text = fs.readFileSync(opts.control, 'utf8'); } catch (e) { log(`control: ${e.message}`); return; }
  for (const line of text.split('\n').map((l) => l.trim()).filter(Boolean)) {
    const [cmd, arg = ''] = line.split(/\s+/, 2);
    const names = list(arg.replace(/=.*/, '')).filter((n) => byName.has(n));
    switch (cmd) {
      case 'offline': for (const n of names) { offline.add(n); byName.get(n).disconnect(); } break;
      case 'online': for (const n of names) { offline.delete(n); silent.delete(n); byName.get(n).connect(); } break;
      case 'silent': for (const n of names) silent.add(n); break;
      case 'slow': for (const n of names) byName.get(n).slowMs = Number(arg.replace(/.*=/, '')); break;
      case 'latency': [latMin, latMax] = parseRange(arg); break;
      case 'error-rate': errorRate = Number(arg); break;
      case 'speed': speed = Number(arg); break;
      default: log(`control: unknown command ${line}`); continue;
    }
    log(`control: ${line}`);
  }
}

process.on('SIGUSR1', writeOut);
process.on('SIGUSR2', control);
let stopping = false;
function stop() {
  if (stopping) return;
  stopping = true;
  writeOut();
  for (const m of all) m.disconnect();
  setTimeout(() => process.exit(0), 100);
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);

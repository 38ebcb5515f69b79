#!/usr/bin/env node
// gift-tbstandin: a ThingsBoard stand-in for tests, benchmarks and `make run`.
//
// It is the MQTT endpoint, as ThingsBoard's MQTT transport is, built on the
// aedes broker: devices (motors and dispatchers) connect with their access
// tokens as user names and use ThingsBoard's device API topics
// (v1/devices/me/...), which the broker maps to per-session topics.  A
// client-side RPC of a device whose profile is "gift-dispatcher" runs through
// the rule chain file itself (packaging/thingsboard/gift-rule-chain.json):
// its nodes are interpreted as ThingsBoard runs them (script, filter, change
// originator, rpc call request with its timeout and pending requests, rpc
// call reply to the asking session).  See docs/thingsboard.md, "The
// stand-in", for what is modelled and how.
//
//   gift-tbstandin --port 11883 --motors 8 --dispatchers 4 [options]
//
// Signals: SIGUSR1 writes the counters (--out); SIGTERM/SIGINT stop.

import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { Aedes } from 'aedes';
import { RuleChain } from './lib/chain.mjs';
import { RateLimit } from './lib/ratelimit.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const usage = `usage: gift-tbstandin [options]
  --host ADDR            listen address (127.0.0.1)
  --port N               MQTT port (1883)
  --devices FILE         JSON: {"devices":[{"name","token","profile",
                         "rateLimit"}...]} (profile gift-dispatcher: its
                         client-side RPCs run through the rule chain)
  --motors N|LIST        motor devices motor_01..motor_NN (or a,b,c); token = name
  --dispatchers N|LIST   dispatcher devices gift-dispatcher-1..N (profile
                         gift-dispatcher); token = name
  --chain FILE           the rule chain (packaging/thingsboard/gift-rule-chain.json)
  --rpc-timeout-ms N     override the RPC node's timeoutInSeconds (tests)
  --queue-delay-ms A[-B] delay of each queue hop (transport -> rule engine ->
                         device and back), default 1
  --rate-limit SPEC      per-device transport message limit, ThingsBoard's
                         format "N:S[,N:S]" (N messages per S seconds);
                         a device over it is disconnected (default: none)
  --max-payload N        larger PUBLISH payloads close the connection (65536)
  --out FILE             counters as JSON on SIGUSR1 and at exit
  --verbose              log every RPC`;

let opts;
try {
  opts = parseArgs({
    options: {
      host: { type: 'string', default: '127.0.0.1' },
      port: { type: 'string', default: '1883' },
      devices: { type: 'string' },
      motors: { type: 'string' },
      dispatchers: { type: 'string' },
      chain: { type: 'string', default: path.join(here, '../../packaging/thingsboard/gift-rule-chain.json') },
      'rpc-timeout-ms': { type: 'string' },
      'queue-delay-ms': { type: 'string', default: '1' },
      'rate-limit': { type: 'string' },
      'max-payload': { type: 'string', default: '65536' },
      out: { type: 'string' },
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
const NAME_RE = /^[A-Za-z0-9_-]{1,64}$/;

function nameList(spec, fmt) {
  if (spec === undefined) return [];
  if (/^\d+$/.test(spec)) return Array.from({ length: Number(spec) }, (_, i) => fmt(i + 1));
  return spec.split(',').filter(Boolean);
}

// ------------------------------------------------------------ devices
const devices = new Map();      // name -> device
const byToken = new Map();      // access token -> device
function addDevice({ name, token, profile, rateLimit }) {
  if (!NAME_RE.test(name) || name === 'me') throw new Error(`bad device name "${name}"`);
  if (!token) throw new Error(`device ${name}: no token`);
  if (byToken.has(token)) throw new Error(`token of ${name} used twice`);
  const d = {
    name, token, profile: profile || 'default',
    session: null,              // the connected client (one per device)
    rpcSubscribed: false,       // subscribed to v1/devices/me/rpc/request/+
    rpcSeq: 0,                  // server-side RPC ids, per device
    pending: new Map(),         // server-side RPC id -> request
    limit: rateLimit ? new RateLimit(rateLimit) : null,
    limitSpec: rateLimit || null,
    counts: { connects: 0, kicked: 0, rateLimited: 0, closedPayload: 0, rpcsIn: 0, rpcsToDevice: 0, replies: 0, repliesDropped: 0, errors: {} },
  };
  devices.set(name, d);
  byToken.set(token, d);
}
try {
  if (opts.devices) {
    const j = JSON.parse(fs.readFileSync(opts.devices, 'utf8'));
    for (const d of j.devices) addDevice(d);
  }
  for (const n of nameList(opts.motors, (i) => `motor_${String(i).padStart(2, '0')}`)) {
    if (!devices.has(n)) addDevice({ name: n, token: n, profile: 'default' });
  }
  for (const n of nameList(opts.dispatchers, (i) => `gift-dispatcher-${i}`)) {
    if (!devices.has(n)) addDevice({ name: n, token: n, profile: 'gift-dispatcher' });
  }
} catch (e) {
  console.error(`gift-tbstandin: ${e.message}`);
  process.exit(2);
}
const rateSpec = opts['rate-limit'];
if (rateSpec) {
  try {
    for (const d of devices.values()) {
      if (!d.limit) { d.limit = new RateLimit(rateSpec); d.limitSpec = rateSpec; }
    }
  } catch (e) {
    console.error(`gift-tbstandin: --rate-limit: ${e.message}`);
    process.exit(2);
  }
}
const maxPayload = Number(opts['max-payload']);
const [qdMin, qdMax = qdMin] = opts['queue-delay-ms'].split('-').map(Number);
const queueDelay = () => qdMin + Math.random() * (qdMax - qdMin);
const hop = (fn) => setTimeout(fn, queueDelay());

// ------------------------------------------------------------ broker
let sessionSeq = 0;
const sessions = new Map();     // session id -> client (alive sessions only)
const sessionOwner = new Map(); // session id -> device (every session)
const counters = { sessions: 0, observers: 0, refused: 0, kicked: 0, rateLimited: 0, tooLarge: 0, badJson: 0, rpcs: 0, replies: 0, repliesDropped: 0, errors: {} };

const broker = await Aedes.createBroker({
  maxClientsIdLength: 256,
  concurrency: 1000,
  drainTimeout: 10000,
  // A connection id of our own: ThingsBoard pairs sessions with access
  // tokens, not client ids, so two devices with one client id may coexist.
  preConnect(client, packet, cb) {
    client.tbSid = `s${++sessionSeq}`;
    packet.clientId = `${packet.clientId || 'anon'}#${client.tbSid}`;
    packet.clean = true;
    cb(null, true);
  },
  authenticate(client, username, password, cb) {
    if (username === undefined || username === null || username === '') {
      client.tbObserver = true;           // the read-only tap
      counters.observers++;
      return cb(null, true);
    }
    const d = byToken.get(String(username));
    if (!d) {
      counters.refused++;
      const e = new Error('unknown access token');
      e.returnCode = 5;                   // not authorized, as ThingsBoard
      return cb(e, false);
    }
    // One session per device: the new connection closes the old one.
    if (d.session) {
      const old = d.session;
      log(`device ${d.name}: a new session closes session ${old.tbSid}`);
      d.counts.kicked++;
      counters.kicked++;
      endSession(old);
      old.close();
    }
    client.tbDevice = d;
    d.session = client;
    d.rpcSubscribed = false;
    d.counts.connects++;
    sessions.set(client.tbSid, client);
    sessionOwner.set(client.tbSid, d);
    counters.sessions++;
    cb(null, true);
  },
  authorizeSubscribe(client, sub, cb) {
    if (client.tbObserver) {
      // read-only tap on the RPCs that motors receive
      const ok = /^v1\/devices\/(\+|[A-Za-z0-9_-]+)\/rpc\/request\/(\+|#|\d+)$/.test(sub.topic);
      return cb(null, ok ? { topic: sub.topic, qos: Math.min(sub.qos, 1) } : null);
    }
    const m = /^v1\/devices\/me\/(.+)$/.exec(sub.topic);
    if (!m) return cb(null, null);        // SUBACK failure
    cb(null, { topic: `$tb/${client.tbSid}/${m[1]}`, qos: Math.min(sub.qos, 1) });
  },
  authorizePublish(client, packet, cb) {
    if (!client) return cb(null);
    if (client.tbObserver) return cb(new Error('the tap is read-only'));
    const d = client.tbDevice;
    if (packet.qos > 1) return cb(new Error('QoS 2 is not supported'));
    if (packet.payload.length > maxPayload) {
      counters.tooLarge++;
      d.counts.closedPayload++;
      log(`device ${d.name}: ${packet.payload.length}-byte payload over ${maxPayload}: connection closed`);
      return cb(new Error('payload too large'));
    }
    if (d.limit && !d.limit.take()) {
      counters.rateLimited++;
      d.counts.rateLimited++;
      log(`device ${d.name}: over the transport rate limit ${d.limitSpec}: disconnected`);
      return cb(new Error('rate limited'));
    }
    let body;
    try { body = JSON.parse(packet.payload.toString('utf8')); } catch {
      counters.badJson++;
      log(`device ${d.name}: invalid JSON on ${packet.topic}: connection closed`);
      return cb(new Error('invalid JSON'));
    }
    const m = /^v1\/devices\/me\/rpc\/(request|response)\/(\d+)$/.exec(packet.topic);
    if (m && m[1] === 'request') onClientRpc(client, Number(m[2]), body);
    else if (m) onDeviceReply(d, Number(m[2]), packet.payload.toString('utf8'), client);
    cb(null);                             // nobody subscribes to it: dropped
  },
  authorizeForward(client, packet) {
    if (client.tbObserver) {
      return /^v1\/devices\/[A-Za-z0-9_-]+\/rpc\/request\//.test(packet.topic)
        && !packet.topic.startsWith('v1/devices/me/') ? packet : null;
    }
    const pre = `$tb/${client.tbSid}/`;
    if (!packet.topic.startsWith(pre)) return null;
    packet.topic = `v1/devices/me/${packet.topic.slice(pre.length)}`;
    return packet;
  },
});

function endSession(client) {
  const d = client.tbDevice;
  if (!d || !sessions.has(client.tbSid)) return;
  sessions.delete(client.tbSid);
  if (d.session === client) {
    d.session = null;
    d.rpcSubscribed = false;
  }
}
broker.on('clientDisconnect', endSession);
// after the SUBACK: pending server-side RPCs go to the new subscriber
broker.on('subscribe', (subs, client) => {
  if (client?.tbDevice && subs.some((s) => s.topic === 'v1/devices/me/rpc/request/+' && s.qos !== 128)) onRpcSubscribe(client);
});
broker.on('clientError', (client, err) => {
  if (opts.verbose) log(`client ${client?.id}: ${err.message}`);
  endSession(client);
});
broker.on('connectionError', (client, err) => {
  if (opts.verbose) log(`connection ${client?.id}: ${err.message}`);
});
// A QoS 1 server-side RPC acknowledged by the device: delivered.
broker.on('ack', (packet, client) => {
  const d = client?.tbDevice;
  const m = packet && /\/rpc\/request\/(\d+)$/.exec(packet.topic || '');
  if (d && m) {
    const r = d.pending.get(Number(m[1]));
    if (r) r.delivered = true;
  }
});

function publishTo(client, rest, payload) {
  broker.publish({ cmd: 'publish', topic: `$tb/${client.tbSid}/${rest}`, payload: Buffer.from(payload), qos: 1, retain: false, dup: false }, () => {});
}

// ------------------------------------------------------------ the rule chain
let chain;
try {
  chain = new RuleChain(JSON.parse(fs.readFileSync(opts.chain, 'utf8')), {
    findDevice: (name) => devices.get(name) || null,
    sendRpcToDevice,
    sendRpcReply,
    rpcTimeoutMs: opts['rpc-timeout-ms'] ? Number(opts['rpc-timeout-ms']) : undefined,
    hop,
    log: opts.verbose ? log : () => {},
  });
} catch (e) {
  console.error(`gift-tbstandin: ${opts.chain}: ${e.message}`);
  process.exit(2);
}

// A client-side RPC: v1/devices/me/rpc/request/<n> from a device.
function onClientRpc(client, n, body) {
  const d = client.tbDevice;
  d.counts.rpcsIn++;
  counters.rpcs++;
  if (d.profile !== 'gift-dispatcher') {
    // the root rule chain does not answer client-side RPC
    if (opts.verbose) log(`device ${d.name}: client-side RPC ${n} ignored (profile ${d.profile})`);
    return;
  }
  const msg = {
    type: 'TO_SERVER_RPC_REQUEST',
    originator: d,
    metadata: { deviceName: d.name, deviceType: d.profile, requestId: String(n), serviceId: 'tbstandin', sessionId: client.tbSid },
    data: body,
  };
  hop(() => chain.run(msg));
}

// The rpc call request node: a server-side RPC to a device, sent now to its
// RPC-subscribed session or when one subscribes, until the timeout.
function sendRpcToDevice(d, method, params, timeoutMs, done) {
  const id = d.rpcSeq++;
  const r = { id, body: JSON.stringify({ method, params }), sent: false, delivered: false, done, timer: null };
  d.pending.set(id, r);
  r.timer = setTimeout(() => {
    if (d.pending.get(id) !== r) return;
    d.pending.delete(id);
    const err = r.sent ? 'TIMEOUT' : 'NO_ACTIVE_CONNECTION';
    d.counts.errors[err] = (d.counts.errors[err] || 0) + 1;
    counters.errors[err] = (counters.errors[err] || 0) + 1;
    done({ error: err });
  }, timeoutMs);
  hop(() => { if (d.pending.get(id) === r && d.session && d.rpcSubscribed) deliver(d, r); });
}

function deliver(d, r) {
  r.sent = true;
  d.counts.rpcsToDevice++;
  publishTo(d.session, `rpc/request/${r.id}`, r.body);
  // the tap: what the motor receives, with its name in place of "me"
  broker.publish({ cmd: 'publish', topic: `v1/devices/${d.name}/rpc/request/${r.id}`, payload: Buffer.from(r.body), qos: 0, retain: false, dup: false }, () => {});
}

function onRpcSubscribe(client) {
  const d = client.tbDevice;
  d.rpcSubscribed = true;
  // pending requests not yet delivered go to the new session, as
  // ThingsBoard's device actor does
  if (d.session !== client) return;
  for (const r of d.pending.values()) if (!r.delivered) deliver(d, r);
}

// A device's answer to a server-side RPC: v1/devices/me/rpc/response/<m>.
function onDeviceReply(d, id, text, client) {
  const r = d.pending.get(id);
  if (!r) {
    if (opts.verbose) log(`device ${d.name}: reply to RPC ${id}, which is not pending`);
    return;
  }
  d.pending.delete(id);
  clearTimeout(r.timer);
  hop(() => r.done({ response: text }));
}

// The rpc call reply node: to the session that asked, if it still exists.
function sendRpcReply(serviceId, sessionId, requestId, data) {
  const client = sessions.get(sessionId);
  const d = client?.tbDevice;
  if (serviceId !== 'tbstandin' || !client) {
    counters.repliesDropped++;
    const owner = sessionOwner.get(sessionId);
    if (owner) owner.counts.repliesDropped++;
    if (opts.verbose) log(`reply to request ${requestId} of gone session ${sessionId}: dropped`);
    return;
  }
  d.counts.replies++;
  counters.replies++;
  hop(() => {
    if (sessions.get(sessionId) === client) {
      publishTo(client, `rpc/response/${requestId}`, data);
    } else {
      counters.repliesDropped++;
      d.counts.repliesDropped++;
    }
  });
}

// ------------------------------------------------------------ counters
let snapshot = 0;
function writeOut() {
  if (!opts.out) return;
  const devs = {};
  for (const d of devices.values()) {
    devs[d.name] = { profile: d.profile, connected: !!d.session, pending: d.pending.size, ...d.counts };
  }
  const j = { snapshot: ++snapshot, pid: process.pid, totals: counters, devices: devs };
  const tmp = `${opts.out}.tmp`;
  fs.writeFileSync(tmp, JSON.stringify(j) + '\n');
  fs.renameSync(tmp, opts.out);
}

const server = net.createServer((sock) => { sock.setNoDelay(true); broker.handle(sock); });
server.on('error', (e) => { console.error(`gift-tbstandin: listen ${opts.host}:${opts.port}: ${e.message}`); process.exit(1); });
server.listen(Number(opts.port), opts.host, () => {
  log(`gift-tbstandin: serving MQTT on ${opts.host}:${server.address().port}: ${devices.size} devices, rule chain "${chain.name}" (RPC timeout ${chain.rpcTimeoutMs} ms), queue delay ${opts['queue-delay-ms']} ms, rate limit ${rateSpec || 'none'}, max payload ${maxPayload}`);
});

process.on('SIGUSR1', writeOut);
let stopping = false;
function stop() {
  if (stopping) return;
  stopping = true;
  writeOut();
  server.close();
  broker.close(() => process.exit(0));
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);

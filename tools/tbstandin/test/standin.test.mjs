// gift-tbstandin and gift-motors as real processes on loopback, driven by
// MQTT clients that play the dispatcher, motors and an observer.  Run by
// t/62-tbstandin.t (or `npm test` here).  Each wait has a generous deadline
// and waits for an observable event, never for time to pass.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import mqtt from 'mqtt';

const here = path.dirname(fileURLToPath(import.meta.url));
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tbstandin-'));
const procs = [];
after(() => { for (const p of procs) if (p.exitCode === null) p.kill('SIGTERM'); });

const DEADLINE = 15000;
async function until(what, fn, ms = DEADLINE) {
  const t0 = Date.now();
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() - t0 > ms) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

let seq = 0;
// Start a program; resolves with {proc, port, log(), out()} once it serves.
async function start(prog, args, ready = /serving/) {
  const id = ++seq;
  const logf = path.join(dir, `${prog}-${id}.log`);
  const out = path.join(dir, `${prog}-${id}.json`);
  const fd = fs.openSync(logf, 'w');
  const proc = spawn(process.execPath, [path.join(here, '..', `${prog}.mjs`), '--out', out, ...args], { stdio: ['ignore', fd, fd] });
  procs.push(proc);
  const log = () => fs.readFileSync(logf, 'utf8');
  const m = await until(`${prog} to serve`, () => ready.exec(log()) || (proc.exitCode !== null && Promise.reject(new Error(log()))));
  let snap = 0;
  const totals = async () => {
    proc.kill('SIGUSR1');
    return until('totals', () => {
      try { const j = JSON.parse(fs.readFileSync(out, 'utf8')); if (j.snapshot > snap) { snap = j.snapshot; return j; } } catch { /* not yet */ }
      return null;
    });
  };
  return { proc, log, totals, port: m[1] ? Number(m[1]) : undefined };
}

const tb = async (...args) => start('tb', ['--port', '0', ...args], /serving MQTT on 127\.0\.0\.1:(\d+)/);

// An MQTT client with a message inbox.
async function client(port, username, extra = {}) {
  const c = mqtt.connect(`mqtt://127.0.0.1:${port}`, { username, clientId: `${username || 'obs'}-${++seq}`, reconnectPeriod: 0, connectTimeout: 10000, protocolVersion: 4, ...extra });
  c.inbox = [];
  c.closed = false;
  c.on('message', (topic, payload, pk) => c.inbox.push({ topic, payload: payload.toString(), qos: pk.qos }));
  c.on('close', () => { c.closed = true; });
  c.on('error', (e) => { c.error = e; });
  await until('connect', () => c.connected || (c.error && Promise.reject(c.error)) || (c.closed && Promise.reject(new Error('closed'))));
  return c;
}
const take = (c, re) => until(`a message on ${re}`, () => {
  const i = c.inbox.findIndex((m) => re.test(m.topic));
  return i < 0 ? null : c.inbox.splice(i, 1)[0];
});
const rotate = (dev, ev = 'e1', rounds = 2) => JSON.stringify({ method: 'rotate', params: { deviceId: dev, rounds, events: [{ id: ev, rounds }] } });

test('access tokens, one session per device, the RPC route and the tap', async () => {
  const s = await tb('--motors', 'motor_01,motor_02', '--dispatchers', '1', '--rpc-timeout-ms', '60000');
  // an unknown token is refused as ThingsBoard refuses it (CONNACK 5)
  await assert.rejects(client(s.port, 'no-such-token'), /Not authorized/);

  const obs = await client(s.port, undefined);
  const g = await obs.subscribeAsync('v1/devices/+/rpc/request/+', { qos: 1 });
  assert.equal(g[0].qos, 1, 'the tap may subscribe');
  await assert.rejects(obs.subscribeAsync('v1/devices/me/rpc/response/+', { qos: 1 }),
    (e) => e.packet?.granted?.[0] === 128, '... and nothing else (SUBACK 0x80)');

  const m1 = await client(s.port, 'motor_01');
  // QoS 2 asked: delivered at QoS 1 (aedes's SUBACK still says 2)
  await m1.subscribeAsync('v1/devices/me/rpc/request/+', { qos: 2 });
  const disp = await client(s.port, 'gift-dispatcher-1');
  await disp.subscribeAsync('v1/devices/me/rpc/response/+', { qos: 1 });

  // client-side RPC 41 -> server-side RPC 0 on the motor's own topic
  disp.publish('v1/devices/me/rpc/request/41', rotate('motor_01', 'a'), { qos: 1 });
  const r0 = await take(m1, /rpc\/request/);
  assert.equal(r0.topic, 'v1/devices/me/rpc/request/0', 'the motor gets its own id sequence');
  assert.equal(r0.qos, 1, 'at QoS 1, not the 2 it asked for');
  assert.deepEqual(JSON.parse(r0.payload), { method: 'rotate', params: { deviceId: 'motor_01', rounds: 2, events: [{ id: 'a', rounds: 2 }] } }, '{method, params} as the dispatcher sent them');
  const t0 = await take(obs, /rpc\/request/);
  assert.equal(t0.topic, 'v1/devices/motor_01/rpc/request/0', 'the tap sees it with the device name');
  assert.deepEqual(JSON.parse(t0.payload), JSON.parse(r0.payload));
  disp.publish('v1/devices/me/rpc/request/42', rotate('motor_01', 'b'), { qos: 1 });
  const r1 = await take(m1, /rpc\/request/);
  assert.equal(r1.topic, 'v1/devices/me/rpc/request/1', 'the next id of this motor');
  await take(obs, /^v1\/devices\/motor_01\/rpc\/request\/1$/);
  m1.publish('v1/devices/me/rpc/response/1', '{"ok":true,"n":1}', { qos: 1 });
  m1.publish('v1/devices/me/rpc/response/0', '{"ok":true,"n":0}', { qos: 1 });
  const a0 = await take(disp, /response\/41$/);
  assert.deepEqual(JSON.parse(a0.payload), { ok: true, n: 0 }, 'the motor reply answers request 41');
  const a1 = await take(disp, /response\/42$/);
  assert.deepEqual(JSON.parse(a1.payload), { ok: true, n: 1 });
  assert.equal(m1.inbox.length + obs.inbox.length, 0, 'nobody else got anything');

  // the chain's errors
  disp.publish('v1/devices/me/rpc/request/43', rotate('motor_99'), { qos: 1 });
  assert.deepEqual(JSON.parse((await take(disp, /response\/43$/)).payload), { ok: false, error: 'no device named motor_99' });
  disp.publish('v1/devices/me/rpc/request/44', JSON.stringify({ method: 'rotate', params: {} }), { qos: 1 });
  assert.deepEqual(JSON.parse((await take(disp, /response\/44$/)).payload), { ok: false, error: 'bad request: params.deviceId missing' });

  // a second connection with the motor's token closes the first
  const m1b = await client(s.port, 'motor_01');
  await until('the first session to close', () => m1.closed);
  assert.ok(!m1b.closed, 'the new session stays');

  // the tap is read-only: publishing closes it
  obs.publish('v1/devices/motor_01/rpc/request/7', '{}', { qos: 1 });
  await until('the observer to be cut off', () => obs.closed);
  for (const c of [m1b, disp]) c.end(true);
});

test('offline and silent motors, pending RPCs, orphaned replies', async () => {
  const s = await tb('--motors', '3', '--dispatchers', '2', '--rpc-timeout-ms', '1500');
  const disp = await client(s.port, 'gift-dispatcher-1');
  await disp.subscribeAsync('v1/devices/me/rpc/response/+', { qos: 1 });

  // nobody connected as motor_01: NO_ACTIVE_CONNECTION after the timeout
  disp.publish('v1/devices/me/rpc/request/1', rotate('motor_01'), { qos: 1 });
  assert.deepEqual(JSON.parse((await take(disp, /response\/1$/)).payload), { ok: false, error: 'NO_ACTIVE_CONNECTION' });

  // connected but silent: TIMEOUT
  const m2 = await client(s.port, 'motor_02');
  await m2.subscribeAsync('v1/devices/me/rpc/request/+', { qos: 1 });
  disp.publish('v1/devices/me/rpc/request/2', rotate('motor_02'), { qos: 1 });
  await take(m2, /rpc\/request\/0$/);
  assert.deepEqual(JSON.parse((await take(disp, /response\/2$/)).payload), { ok: false, error: 'TIMEOUT' });
  // its late answer goes nowhere
  m2.publish('v1/devices/me/rpc/response/0', '{"ok":true}', { qos: 1 });

  // a motor that connects within the timeout gets the pending RPC
  disp.publish('v1/devices/me/rpc/request/3', rotate('motor_03'), { qos: 1 });
  await until('the RPC to be pending', async () => (await s.totals()).devices.motor_03.pending === 1);
  const m3 = await client(s.port, 'motor_03');
  await m3.subscribeAsync('v1/devices/me/rpc/request/+', { qos: 1 });
  const p = await take(m3, /rpc\/request\/0$/);
  assert.equal(JSON.parse(p.payload).params.deviceId, 'motor_03');
  m3.publish('v1/devices/me/rpc/response/0', '{"ok":true}', { qos: 1 });
  assert.deepEqual(JSON.parse((await take(disp, /response\/3$/)).payload), { ok: true });

  // the dispatcher reconnects (a new session) before the motor answers: the
  // reply belonged to the old session and is dropped
  disp.publish('v1/devices/me/rpc/request/4', rotate('motor_03', 'x'), { qos: 1 });
  await take(m3, /rpc\/request\/1$/);
  const disp2 = await client(s.port, 'gift-dispatcher-1');
  await disp2.subscribeAsync('v1/devices/me/rpc/response/+', { qos: 1 });
  await until('the old session to close', () => disp.closed);
  m3.publish('v1/devices/me/rpc/response/1', '{"ok":true}', { qos: 1 });
  await until('the orphaned reply to be dropped', async () => (await s.totals()).devices['gift-dispatcher-1'].repliesDropped === 1);
  assert.equal(disp2.inbox.length, 0, 'the new session got no reply for the old one');
  // a second dispatcher device is a session of its own
  const d2 = await client(s.port, 'gift-dispatcher-2');
  await d2.subscribeAsync('v1/devices/me/rpc/response/+', { qos: 1 });
  d2.publish('v1/devices/me/rpc/request/1', rotate('motor_03', 'y'), { qos: 1 });
  await take(m3, /rpc\/request\/2$/);
  m3.publish('v1/devices/me/rpc/response/2', '{"ok":true}', { qos: 1 });
  assert.deepEqual(JSON.parse((await take(d2, /response\/1$/)).payload), { ok: true });
  assert.ok(!disp2.closed, 'two dispatcher devices coexist');
  for (const c of [m2, m3, disp2, d2]) c.end(true);
});

test('transport limits: 64 KiB, invalid JSON, rate limit, root chain', async () => {
  const devs = path.join(dir, 'devices.json');
  fs.writeFileSync(devs, JSON.stringify({ devices: [
    { name: 'motor_01', token: 'tok-m1' },
    { name: 'gift-dispatcher-1', token: 'tok-d1', profile: 'gift-dispatcher' },
    { name: 'gift-dispatcher-2', token: 'tok-d2', profile: 'gift-dispatcher', rateLimit: '5:60' },
  ] }));
  const s = await tb('--devices', devs, '--rpc-timeout-ms', '60000');
  // a payload over 64 KiB closes the connection
  const d1 = await client(s.port, 'tok-d1');
  const big = JSON.stringify({ method: 'rotate', params: { deviceId: 'motor_01', pad: 'x'.repeat(65536) } });
  d1.publish('v1/devices/me/rpc/request/1', big, { qos: 1 });
  await until('the connection to close (payload)', () => d1.closed);
  // exactly 64 KiB passes
  const d1b = await client(s.port, 'tok-d1');
  const pad = 65536 - JSON.stringify({ method: 'rotate', params: { deviceId: 'motor_01', pad: '' } }).length;
  d1b.publish('v1/devices/me/rpc/request/2', JSON.stringify({ method: 'rotate', params: { deviceId: 'motor_01', pad: 'x'.repeat(pad) } }), { qos: 1 });
  await until('the RPC to be pending', async () => (await s.totals()).devices.motor_01.pending === 1);
  assert.ok(!d1b.closed, '65,536 bytes are accepted');
  // invalid JSON closes the connection
  d1b.publish('v1/devices/me/rpc/request/3', '{"method":', { qos: 1 });
  await until('the connection to close (JSON)', () => d1b.closed);
  // over the device's rate limit (5 messages a minute): disconnected
  const d2 = await client(s.port, 'tok-d2');
  for (let i = 1; i <= 6; i++) d2.publish(`v1/devices/me/rpc/request/${i}`, rotate('motor_01', `r${i}`), { qos: 1 });
  await until('the rate-limited device to be disconnected', () => d2.closed);
  const t = await s.totals();
  assert.equal(t.devices['gift-dispatcher-2'].rateLimited, 1);
  assert.equal(t.devices['gift-dispatcher-2'].rpcsIn, 5, 'the first five went through');
  // a device without the dispatcher profile: the root chain does not answer
  const before = (await s.totals()).devices.motor_01.pending;
  const m = await client(s.port, 'tok-m1');
  m.publish('v1/devices/me/rpc/request/9', rotate('motor_01'), { qos: 1 });
  await until('the RPC to be counted', async () => (await s.totals()).devices.motor_01.rpcsIn === 1);
  assert.equal((await s.totals()).devices.motor_01.pending, before, 'no RPC was routed for it');
  m.end(true);
});

test('a rule chain ThingsBoard would not start is refused', async () => {
  const chain = JSON.parse(fs.readFileSync(path.join(here, '../../../packaging/thingsboard/gift-rule-chain.json'), 'utf8'));
  chain.metadata.nodes.find((n) => n.type.endsWith('TbSendRPCRequestNode')).configuration.forceAck = true;
  const f = path.join(dir, 'bad-chain.json');
  fs.writeFileSync(f, JSON.stringify(chain));
  const p = spawn(process.execPath, [path.join(here, '../tb.mjs'), '--port', '0', '--chain', f], { stdio: ['ignore', 'pipe', 'pipe'] });
  let err = '';
  p.stderr.on('data', (b) => { err += b; });
  const code = await new Promise((r) => p.on('exit', r));
  assert.equal(code, 2);
  assert.match(err, /forceAck.*would not start/);
});

test('motors: window of event ids, answer on acceptance, speed, record, control', async () => {
  const s = await tb('--motors', '2', '--dispatchers', '1', '--rpc-timeout-ms', '60000');
  const ctl = path.join(dir, 'motors.control');
  const m = await start('motors', ['--port', String(s.port), '--motors', '2', '--window', '3', '--speed', '20', '--control', ctl]);
  const disp = await client(s.port, 'gift-dispatcher-1');
  await disp.subscribeAsync('v1/devices/me/rpc/response/+', { qos: 1 });
  const send = (n, evs) => disp.publish(`v1/devices/me/rpc/request/${n}`, JSON.stringify({ method: 'rotate', params: { deviceId: 'motor_01', rounds: evs.reduce((a, e) => a + e[1], 0), events: evs.map(([id, rounds]) => ({ id, rounds })) } }), { qos: 1 });
  send(1, [['a', 10], ['b', 10]]);
  // answered on acceptance, long before 20 rounds at 20 a second are turned
  assert.deepEqual(JSON.parse((await take(disp, /response\/1$/)).payload), { ok: true });
  let t = await m.totals();
  assert.equal(t.devices.motor_01.rounds, 20, 'accepted 20 rounds');
  assert.ok(t.devices.motor_01.queued > 0, 'still turning when it answered');
  send(2, [['b', 10], ['c', 5]]);           // b again: a repeat
  await take(disp, /response\/2$/);
  t = await until('the motor to finish turning', async () => { const x = await m.totals(); return x.devices.motor_01.queued === 0 && x; });
  assert.deepEqual([t.devices.motor_01.events, t.devices.motor_01.duplicates, t.devices.motor_01.rounds, t.devices.motor_01.turned, t.devices.motor_01.commands], [3, 1, 25, 25, 2], 'events, repeats, rounds, turned, commands');
  // the window is bounded (3 ids): a, b, c, d pushes a out, so a runs again
  send(3, [['d', 1]]);
  await take(disp, /response\/3$/);
  send(4, [['a', 1]]);
  await take(disp, /response\/4$/);
  t = await m.totals();
  assert.equal(t.devices.motor_01.events, 5, 'an id older than the window is executed again');
  // control: silent, then offline
  fs.writeFileSync(ctl, 'silent motor_01\nspeed 0\n');
  m.proc.kill('SIGUSR2');
  await until('control applied', () => /control: speed 0/.test(m.log()));
  send(5, [['e', 1]]);
  await until('the silent motor to receive it', async () => (await m.totals()).devices.motor_01.ignored === 1);
  fs.writeFileSync(ctl, 'offline motor_02\n');
  m.proc.kill('SIGUSR2');
  await until('motor_02 to be offline', async () => !(await s.totals()).devices.motor_02.connected);
  disp.end(true);
});

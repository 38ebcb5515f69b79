// The seed stack's Worker / Processor: takes gifts from the BullMQ queue,
// converts diamonds to rounds (rounds = diamond * quantity), sends the
// device an MQTT RPC (ThingsBoard's topics: v1/devices/<device>/rpc/
// request/<id>, QoS 1) through Mosquitto, waits for its answer on
// .../rpc/response/<id> and returns the acknowledgement (the job's return
// value, which the API streams).  No answer in --rpc-timeout ms: the job
// fails and BullMQ retries it.  Part of bench/seed.sh only.
//
//   node worker.mjs --redis-port R --mqtt-port M [--concurrency 64] [--nodelay 1]
import { Worker } from 'bullmq';
import mqtt from 'mqtt';

const arg = (name, dflt) => {
    const i = process.argv.indexOf(`--${name}`);
    return i > 0 ? process.argv[i + 1] : dflt;
};
const HOST = arg('host', '127.0.0.1');
const connection = { host: HOST, port: Number(arg('redis-port', 6379)) };
const CONCURRENCY = Number(arg('concurrency', 64));
const RPC_TIMEOUT = Number(arg('rpc-timeout', 10000));
const DEVICES = Number(arg('devices', 4));

// --nodelay 1: TCP_NODELAY on the MQTT socket (mqtt.js leaves Nagle on;
// Mosquitto, ioredis and Node's HTTP server turn it off)
const NODELAY = arg('nodelay', '1') === '1';
const client = mqtt.connect({ host: HOST, port: Number(arg('mqtt-port', 1883)),
    clientId: `seed-worker-${process.pid}`, clean: true });
client.on('connect', () => NODELAY && client.stream?.setNoDelay?.(true));
await new Promise((resolve, reject) => {
    client.once('connect', resolve);
    client.once('error', reject);
});
await client.subscribeAsync('v1/devices/+/rpc/response/+', { qos: 1 });

const pending = new Map();      // request id -> { resolve, reject, timer }
let nextRpc = 0;
client.on('message', (topic, payload) => {
    const id = topic.slice(topic.lastIndexOf('/') + 1);
    const p = pending.get(id);
    if (!p) {
        return;                 // a late answer to a timed-out request
    }
    pending.delete(id);
    clearTimeout(p.timer);
    try {
        p.resolve(JSON.parse(payload.toString()));
    } catch (e) {
        p.reject(e);
    }
});

function rpc(device, body) {
    const id = String(++nextRpc);
    return new Promise((resolve, reject) => {
        const timer = setTimeout(() => {
            pending.delete(id);
            reject(new Error(`RPC to ${device} timed out`));
        }, RPC_TIMEOUT);
        pending.set(id, { resolve, reject, timer });
        client.publish(`v1/devices/${device}/rpc/request/${id}`,
            JSON.stringify(body), { qos: 1 }, (err) => {
                if (err) {
                    clearTimeout(timer);
                    pending.delete(id);
                    reject(err);
                }
            });
    });
}

// the gift's device: the same name always turns the same motor
function deviceOf(name) {
    let h = 0;
    for (let i = 0; i < name.length; i++) {
        h = (h * 31 + name.charCodeAt(i)) >>> 0;
    }
    return `motor_${String(1 + (h % DEVICES)).padStart(2, '0')}`;
}

const worker = new Worker('gifts', async (job) => {
    const g = job.data;
    const rounds = g.diamond * (g.quantity || 1);
    const deviceId = deviceOf(g.giftName);
    const t0 = Date.now();
    const answer = await rpc(deviceId, { method: 'rotate', params: { rounds } });
    return {
        eventId: g.eventId, deviceId, rounds,
        status: answer && answer.ok ? 'ok' : 'device_error',
        attempts: job.attemptsMade + 1,
        platform: g.platform, userId: g.userId, userName: g.userName,
        giftName: g.giftName, diamond: g.diamond, quantity: g.quantity,
        latencyMs: Date.now() - g.receivedAt, rpcMs: Date.now() - t0,
        ts: Date.now(),
    };
}, { connection, concurrency: CONCURRENCY });
await worker.waitUntilReady();
worker.on('error', (e) => console.error(`seed worker: ${e.message}`));
console.log(`seed worker: running (concurrency ${CONCURRENCY})`);

const stop = async () => {
    await worker.close();
    await client.endAsync();
    process.exit(0);
};
process.on('SIGTERM', stop);
process.on('SIGINT', stop);

// The seed stack's device simulator: N motors, each its own MQTT client
// (as devices connect to ThingsBoard), answering every rotate RPC at once
// on v1/devices/<device>/rpc/response/<id>.  Counts RPCs and rounds per
// motor; SIGUSR1 writes them to --out (JSON, with a snapshot counter).
// Part of bench/seed.sh only.
//
//   node device.mjs --mqtt-port M --out FILE [--devices 4] [--nodelay 1]
import mqtt from 'mqtt';
import { writeFileSync, renameSync } from 'node:fs';

const arg = (name, dflt) => {
    const i = process.argv.indexOf(`--${name}`);
    return i > 0 ? process.argv[i + 1] : dflt;
};
const HOST = arg('host', '127.0.0.1');
const PORT = Number(arg('mqtt-port', 1883));
const OUT = arg('out', 'device.json');
const N = Number(arg('devices', 4));
const NODELAY = arg('nodelay', '1') === '1';      // as in worker.mjs

const devices = {};
let snapshot = 0;
const clients = [];
for (let i = 1; i <= N; i++) {
    const name = `motor_${String(i).padStart(2, '0')}`;
    const st = devices[name] = { rpcs: 0, rounds: 0 };
    const c = mqtt.connect({ host: HOST, port: PORT, clientId: `seed-${name}`, clean: true });
    c.on('connect', () => NODELAY && c.stream?.setNoDelay?.(true));
    await new Promise((resolve, reject) => {
        c.once('connect', resolve);
        c.once('error', reject);
    });
    await c.subscribeAsync(`v1/devices/${name}/rpc/request/+`, { qos: 1 });
    c.on('message', (topic, payload) => {
        const id = topic.slice(topic.lastIndexOf('/') + 1);
        let rounds = 0;
        try {
            rounds = JSON.parse(payload.toString()).params.rounds | 0;
        } catch { /* answered as an error below */ }
        st.rpcs++;
        st.rounds += rounds;
        c.publish(`v1/devices/${name}/rpc/response/${id}`,
            JSON.stringify({ ok: rounds > 0, rounds }), { qos: 1 });
    });
    clients.push(c);
}

function dump() {
    const totals = { rpcs: 0, rounds: 0 };
    for (const d of Object.values(devices)) {
        totals.rpcs += d.rpcs;
        totals.rounds += d.rounds;
    }
    writeFileSync(`${OUT}.tmp`, JSON.stringify({ snapshot: ++snapshot, totals, devices }));
    renameSync(`${OUT}.tmp`, OUT);
}
process.on('SIGUSR1', dump);
const stop = async () => {
    dump();
    await Promise.all(clients.map((c) => c.endAsync()));
    process.exit(0);
};
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
dump();
console.log(`seed device: serving ${N} motors`);

// The seed stack's Backend API (docs of the design notes: Fastify, a BullMQ
// queue on Redis, SSE for the acknowledgements).  POST /gift takes the same
// webhook JSON as our nginx module, validates and normalizes it and adds it
// to the queue (jobId = eventId, BullMQ's own deduplication); 202 answers.
// GET /gift/events streams each completed job's acknowledgement (BullMQ's
// QueueEvents 'completed', the worker's return value) as
// `id: <n>\nevent: ack\ndata: <json>\n\n`, the shape our SSE endpoint uses;
// Last-Event-ID resumes from a replay window.  Part of bench/seed.sh only.
//
//   node api.mjs --port P --redis-port R [--host 127.0.0.1] [--replay 10000]
import Fastify from 'fastify';
import { Queue, QueueEvents } from 'bullmq';

const arg = (name, dflt) => {
    const i = process.argv.indexOf(`--${name}`);
    return i > 0 ? process.argv[i + 1] : dflt;
};
const HOST = arg('host', '127.0.0.1');
const PORT = Number(arg('port', 3000));
const connection = { host: HOST, port: Number(arg('redis-port', 6379)) };
const REPLAY = Number(arg('replay', 10000));
const QUEUE = 'gifts';

const queue = new Queue(QUEUE, {
    connection,
    defaultJobOptions: {
        attempts: 3,
        backoff: { type: 'exponential', delay: 200 },
        removeOnComplete: 1000,
        removeOnFail: 5000,
    },
});
const events = new QueueEvents(QUEUE, { connection });
await queue.waitUntilReady();
await events.waitUntilReady();

// SSE: the clients, the last events for Last-Event-ID
const clients = new Set();
const replay = [];
let seq = 0;
events.on('completed', ({ returnvalue }) => {
    let ack = returnvalue;
    if (typeof ack === 'string') {
        try { ack = JSON.parse(ack); } catch { return; }
    }
    if (!ack || !ack.eventId) {
        return;
    }
    const id = ++seq;
    const frame = `id: ${id}\nevent: ack\ndata: ${JSON.stringify(ack)}\n\n`;
    replay.push([id, frame]);
    if (replay.length > REPLAY) {
        replay.shift();
    }
    for (const res of clients) {
        res.write(frame);
    }
});

const app = Fastify({ logger: false, bodyLimit: 65536 });

const schema = {
    body: {
        type: 'object',
        required: ['eventId', 'giftName', 'diamond'],
        properties: {
            event: { type: 'string' },
            platform: { type: 'string' },
            eventId: { type: 'string', minLength: 1, maxLength: 128 },
            userId: { type: 'string' },
            userName: { type: 'string' },
            giftName: { type: 'string', minLength: 1, maxLength: 64 },
            diamond: { type: 'integer', minimum: 1, maximum: 1000000 },
            quantity: { type: 'integer', minimum: 1, maximum: 10000, default: 1 },
            timestamp: { type: 'integer' },
        },
    },
};

app.post('/gift', { schema }, async (req, reply) => {
    const b = req.body;
    const gift = {
        event: b.event || 'gift',
        platform: b.platform || 'tiktok',
        eventId: b.eventId,
        userId: b.userId || '',
        userName: b.userName || '',
        giftName: b.giftName,
        diamond: b.diamond,
        quantity: b.quantity,
        timestamp: b.timestamp || Date.now(),
        receivedAt: Date.now(),
    };
    const job = await queue.add('gift', gift, { jobId: b.eventId });
    reply.code(202);
    return { id: b.eventId, job: job.id };
});

app.get('/gift/events', (req, reply) => {
    reply.hijack();
    const res = reply.raw;
    res.writeHead(200, {
        'Content-Type': 'text/event-stream',
        'Cache-Control': 'no-cache',
        Connection: 'keep-alive',
    });
    res.write('retry: 2000\n\n');
    const last = Number(req.headers['last-event-id'] || 0);
    if (last > 0) {
        for (const [id, frame] of replay) {
            if (id > last) {
                res.write(frame);
            }
        }
    }
    clients.add(res);
    req.raw.on('close', () => clients.delete(res));
});

app.get('/healthz', async () => ({ ok: true }));

const stop = async () => {
    for (const res of clients) {
        res.end();
    }
    await app.close();
    await events.close();
    await queue.close();
    process.exit(0);
};
process.on('SIGTERM', stop);
process.on('SIGINT', stop);

await app.listen({ host: HOST, port: PORT });
console.log(`seed api: listening on ${HOST}:${PORT}`);

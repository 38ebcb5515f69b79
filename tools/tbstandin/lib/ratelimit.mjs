// ThingsBoard's rate limit format "N:S[,N:S...]": at most N messages in S
// seconds, for each pair; tokens refill continuously (a greedy token
// bucket per pair, as bucket4j's in ThingsBoard).
export class RateLimit {
  constructor(spec, now = () => performance.now()) {
    this.now = now;
    this.buckets = spec.split(',').map((p) => {
      const m = /^\s*(\d+)\s*:\s*(\d+)\s*$/.exec(p);
      if (!m || Number(m[1]) < 1 || Number(m[2]) < 1) throw new Error(`"${p}" is not N:S`);
      const cap = Number(m[1]);
      return { cap, perMs: cap / (Number(m[2]) * 1000), tokens: cap, at: now() };
    });
  }

  // One message: false when over a limit (nothing is taken then).
  take() {
    const t = this.now();
    for (const b of this.buckets) {
      b.tokens = Math.min(b.cap, b.tokens + (t - b.at) * b.perMs);
      b.at = t;
    }
    if (this.buckets.some((b) => b.tokens < 1)) return false;
    for (const b of this.buckets) b.tokens -= 1;
    return true;
  }
}

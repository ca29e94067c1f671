'use strict';
/*
 * Reference benchmark: the Node.js library cluster-client (leader elected by binding a
 * localhost port; followers forward calls to it over TCP) on the workloads connshare is
 * measured on.
 *
 *   node bench.js [--quick] [--phases raw,call,throughput,fanout] [--timeout-s 240]
 *
 * Prints exactly one JSON object on stdout; everything else (including the
 * children's and cluster-client's logs) goes to stderr.
 *
 * Phases (each uses a fresh free port and fresh processes):
 *   raw         control: plain Node.js TCP ping-pong of the same payload with a child
 *               echo process (net, setNoDelay), no cluster-client at all.
 *   call        leader + 1 follower; the follower makes `warmup` then `calls` sequential
 *               echo(p) calls (p = "x" * 100), timed one by one with hrtime.bigint.
 *               The leader's own (in-process) calls are timed the same way afterwards.
 *   throughput  leader + N followers, each keeping `inflight` calls outstanding until
 *               `tpCalls` calls are completed in total; aggregate calls/s over the span
 *               from the first follower's start to the last one's end.
 *   fanout      leader + N followers all subscribed to one key; the leader's real
 *               DataClient emits `events` events `intervalMs` apart, each carrying
 *               process.hrtime.bigint() at emission. Delivery latency is measured in the
 *               receiving process against its own hrtime: on Linux that is
 *               CLOCK_MONOTONIC, which is system-wide (checked: see clock_check).
 *
 * Every child has a watchdog and exits when its IPC channel closes; the parent kills
 * whatever is left on exit, on signals and on its own overall timeout.
 */

const { fork } = require('child_process');
const net = require('net');

const PAYLOAD = 'x'.repeat(100);
const DATA_KEY = { dataId: 'connshare.bench.fanout' };

// ------------------------------------------------------------------------- args

function parseArgs(argv) {
  const out = {};
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (!a.startsWith('--')) continue;
    const key = a.slice(2);
    const next = argv[i + 1];
    if (next === undefined || next.startsWith('--')) {
      out[key] = true;
    } else {
      out[key] = next;
      i++;
    }
  }
  return out;
}

function intArg(args, name, dflt) {
  if (args[name] === undefined) return dflt;
  const v = Number(args[name]);
  if (!Number.isFinite(v) || v < 0) throw new Error(`--${name} must be a number >= 0`);
  return Math.floor(v);
}

// ------------------------------------------------------------------------- stats

// nearest-rank percentiles, same definition as benchmarks/_common.py
function percentiles(samplesNs) {
  const v = Float64Array.from(samplesNs).sort();
  const n = v.length;
  if (n === 0) return { p50_us: null, p99_us: null, mean_us: null, n: 0 };
  const rank = q => v[Math.max(0, Math.min(n - 1, Math.ceil(q * n) - 1))];
  let sum = 0;
  for (let i = 0; i < n; i++) sum += v[i];
  const r3 = x => Math.round(x * 1000) / 1000;
  return {
    p50_us: r3(rank(0.5) / 1000),
    p99_us: r3(rank(0.99) / 1000),
    mean_us: r3(sum / n / 1000),
    max_us: r3(v[n - 1] / 1000),
    n,
  };
}

const now = () => process.hrtime.bigint();
const sleep = ms => new Promise(resolve => setTimeout(resolve, ms));

// ------------------------------------------------------------------------- child

async function runChild(args) {
  const port = intArg(args, 'port', 0);
  const expectLeader = args.role === 'leader';
  // fail-safe: a child never outlives this, nor its parent's IPC channel
  setTimeout(() => {
    process.stderr.write(`[bench child ${process.pid}] watchdog fired, exiting\n`);
    process.exit(3);
  }, intArg(args, 'child-timeout-ms', 300000)).unref();
  process.on('disconnect', () => process.exit(0));
  if (args.role === 'echo') return runEchoChild();

  const Base = require('sdk-base');
  const cluster = require('cluster-client');

  // The "real" client. It is only ever constructed in the leader process.
  class DataClient extends Base {
    constructor(options) {
      super(options);
      this._subs = new Map();
      DataClient.instance = this;
      this.ready(true);
    }

    // async => cluster-client auto-delegates it as an 'invoke' method.
    // NB: on the leader, cluster-client appends its callback to the arguments.
    async echo(p) {
      return p;
    }

    subscribe(reg, listener) {
      const key = reg.dataId;
      if (!this._subs.has(key)) this._subs.set(key, new Set());
      this._subs.get(key).add(listener);
    }

    unSubscribe(reg, listener) {
      const set = this._subs.get(reg.dataId);
      if (!set) return;
      if (listener) set.delete(listener);
      else set.clear();
    }

    publish() {}

    // not delegated (not async, leading underscore): only callable in the leader.
    _push(key, value) {
      for (const listener of this._subs.get(key) || []) listener(value);
    }
  }
  DataClient.instance = null;

  const client = cluster(DataClient, {
    port,
    name: 'ConnshareBenchDataClient',
    responseTimeout: 10000,
  }).create({});
  await client.ready();
  const isLeader = Boolean(client.isClusterClientLeader);
  if (isLeader !== expectLeader) {
    throw new Error(`expected to be ${expectLeader ? 'leader' : 'follower'}, got the other role`);
  }

  // fan-out receiver state
  const seen = new Set();
  const fanLatency = [];
  let duplicates = 0;
  let foreign = 0;
  const onEvent = ev => {
    const t = now();
    if (!ev || typeof ev.seq !== 'number' || typeof ev.ts !== 'string') {
      foreign++;
      return;
    }
    if (seen.has(ev.seq)) {
      duplicates++;
      return;
    }
    seen.add(ev.seq);
    fanLatency.push(Number(t - BigInt(ev.ts)));
  };

  const handlers = {
    async call({ n, warmup }) {
      for (let i = 0; i < warmup; i++) await client.echo(PAYLOAD);
      const samples = new Float64Array(n);
      let mismatches = 0;
      for (let i = 0; i < n; i++) {
        const t0 = now();
        const r = await client.echo(PAYLOAD);
        samples[i] = Number(now() - t0);
        if (r !== PAYLOAD) mismatches++;
      }
      const obj = { a: [ 1, 2, 3 ] };
      const back = await client.echo(obj);
      return {
        ...percentiles(samples),
        warmup,
        mismatches,
        result_is_same_object: back === obj,
      };
    },

    async warm({ n }) {
      for (let i = 0; i < n; i++) await client.echo(PAYLOAD);
      return { warmed: n };
    },

    async throughput({ quota, inflight }) {
      let issued = 0;
      let completed = 0;
      let errors = 0;
      let firstError = null;
      const worker = async () => {
        while (issued < quota) {
          issued++;
          try {
            const r = await client.echo(PAYLOAD);
            if (r === PAYLOAD) completed++;
            else errors++;
          } catch (err) {
            errors++;
            firstError = firstError || String(err && err.message);
          }
        }
      };
      const t0 = now();
      await Promise.all(Array.from({ length: inflight }, worker));
      const t1 = now();
      return { start_ns: t0.toString(), end_ns: t1.toString(), completed, errors, first_error: firstError };
    },

    async subscribe() {
      client.subscribe(DATA_KEY, onEvent);
      // the subscribe request is one-way; a round trip on the same socket guarantees
      // the leader has processed it before we report ready
      await client.echo('sync');
      return { subscribed: true };
    },

    async emit({ count, intervalMs }) {
      const real = DataClient.instance;
      if (!real) throw new Error('emit asked of a process without the real DataClient');
      const start = now();
      const interval = BigInt(Math.round(intervalMs * 1e6));
      let maxLateNs = 0n;
      const pushNs = new Float64Array(count);
      for (let i = 0; i < count; i++) {
        const due = start + BigInt(i) * interval;
        const wait = Number(due - now()) / 1e6;
        if (wait > 0) await sleep(wait);
        const t = now();
        if (t - due > maxLateNs) maxLateNs = t - due;
        real._push(DATA_KEY.dataId, { seq: i, ts: t.toString() });
        // synchronous part of the leader's broadcast: encode + one write per follower
        pushNs[i] = Number(now() - t);
      }
      return {
        emitted: count,
        duration_ms: Number(now() - start) / 1e6,
        max_late_ms: Number(maxLateNs) / 1e6,
        push_sync: percentiles(pushNs),
      };
    },

    async report() {
      return { received: seen.size, duplicates, foreign, latencies_ns: fanLatency };
    },

    async clock() {
      return { t: now().toString() };
    },

    async exit() {
      setImmediate(async () => {
        try {
          await Promise.race([ cluster.close(client), sleep(1000) ]);
        } finally {
          process.exit(0);
        }
      });
      return { exiting: true };
    },
  };

  process.on('message', msg => {
    const handler = handlers[msg && msg.cmd];
    if (!handler) {
      process.send({ id: msg && msg.id, error: `unknown command ${JSON.stringify(msg)}` });
      return;
    }
    Promise.resolve()
      .then(() => handler(msg))
      .then(
        data => process.connected && process.send({ id: msg.id, data }),
        err => process.connected && process.send({ id: msg.id, error: String(err && err.stack || err) })
      );
  });
  process.send({ id: 0, data: { ready: true, pid: process.pid, isLeader } });
}

// plain TCP echo server, for the 'raw' control phase
function runEchoChild() {
  const server = net.createServer(socket => {
    socket.setNoDelay(true);
    socket.on('data', chunk => socket.write(chunk));
    socket.on('error', () => {});
  });
  server.listen(0, '127.0.0.1', () => {
    process.send({ id: 0, data: { ready: true, pid: process.pid, port: server.address().port } });
  });
  process.on('message', msg => {
    if (msg && msg.cmd === 'exit') {
      process.send({ id: msg.id, data: { exiting: true } });
      setImmediate(() => process.exit(0));
    }
  });
}

// ------------------------------------------------------------------------- parent

const children = new Set();

function killAll() {
  for (const cp of children) {
    try {
      cp.kill('SIGKILL');
    } catch (e) {
      // already gone
    }
  }
}

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

class Child {
  constructor(role, port, childTimeoutMs) {
    this.role = role;
    this.nextId = 1;
    this.pending = new Map();
    this.exited = false;
    this.cp = fork(__filename, [ '--child', '--role', role, '--port', String(port), '--child-timeout-ms', String(childTimeoutMs) ], {
      stdio: [ 'ignore', 2, 2, 'ipc' ], // child stdout -> our stderr: stdout is for the JSON only
    });
    children.add(this.cp);
    this.readyPromise = new Promise((resolve, reject) => this.pending.set(0, { resolve, reject }));
    this.cp.on('message', msg => {
      const p = this.pending.get(msg.id);
      if (!p) return;
      this.pending.delete(msg.id);
      if (msg.error) p.reject(new Error(`${role} ${this.cp.pid}: ${msg.error}`));
      else p.resolve(msg.data);
    });
    this.exitPromise = new Promise(resolve => {
      this.cp.once('exit', (code, signal) => {
        this.exited = true;
        children.delete(this.cp);
        for (const p of this.pending.values()) p.reject(new Error(`${role} ${this.cp.pid} exited (code ${code}, signal ${signal})`));
        this.pending.clear();
        resolve();
      });
    });
  }

  ready(timeoutMs) {
    return withTimeout(this.readyPromise, timeoutMs, `${this.role} start`);
  }

  request(msg, timeoutMs) {
    if (this.exited || !this.cp.connected) return Promise.reject(new Error(`${this.role} is gone`));
    const id = this.nextId++;
    const p = new Promise((resolve, reject) => this.pending.set(id, { resolve, reject }));
    this.cp.send({ ...msg, id });
    return withTimeout(p, timeoutMs, `${this.role} ${msg.cmd}`);
  }

  async stop() {
    if (this.exited) return;
    try {
      await this.request({ cmd: 'exit' }, 1000);
    } catch (e) {
      // fall through to the kill below
    }
    await Promise.race([ this.exitPromise, sleep(2000) ]);
    if (!this.exited) {
      this.cp.kill('SIGKILL');
      await Promise.race([ this.exitPromise, sleep(2000) ]);
    }
  }
}

function withTimeout(promise, ms, what) {
  let timer;
  const t = new Promise((resolve, reject) => {
    timer = setTimeout(() => reject(new Error(`timeout after ${ms} ms: ${what}`)), ms);
  });
  return Promise.race([ promise, t ]).finally(() => clearTimeout(timer));
}

// start a leader, wait for it to hold the port, then the followers
async function withCluster(nFollowers, cfg, fn) {
  const port = await freePort();
  const procs = [];
  try {
    const leader = new Child('leader', port, cfg.childTimeoutMs);
    procs.push(leader);
    const li = await leader.ready(cfg.startTimeoutMs);
    if (!li.isLeader) throw new Error('first process did not become leader');
    const followers = [];
    for (let i = 0; i < nFollowers; i++) {
      const f = new Child('follower', port, cfg.childTimeoutMs);
      procs.push(f);
      followers.push(f);
    }
    await Promise.all(followers.map(f => f.ready(cfg.startTimeoutMs)));
    return await fn(leader, followers, port);
  } finally {
    // followers first: a follower that loses its leader tries to take over the port
    await Promise.all(procs.slice(1).map(p => p.stop()));
    if (procs.length) await procs[0].stop();
  }
}

async function phaseRaw(cfg) {
  const echo = new Child('echo', 0, cfg.childTimeoutMs);
  let socket = null;
  try {
    const { port } = await echo.ready(cfg.startTimeoutMs);
    socket = await new Promise((resolve, reject) => {
      const s = net.connect(port, '127.0.0.1', () => resolve(s));
      s.once('error', reject);
    });
    socket.setNoDelay(true);
    const size = Buffer.byteLength(PAYLOAD);
    const payload = Buffer.from(PAYLOAD);
    let got = 0;
    let wake = null;
    socket.on('data', chunk => {
      got += chunk.length;
      if (got >= size && wake) {
        got -= size;
        const w = wake;
        wake = null;
        w();
      }
    });
    const once = () => new Promise(resolve => {
      wake = resolve;
      socket.write(payload);
    });
    const run = async () => {
      for (let i = 0; i < cfg.warmup; i++) await once();
      const samples = new Float64Array(cfg.calls);
      for (let i = 0; i < cfg.calls; i++) {
        const t0 = now();
        await once();
        samples[i] = Number(now() - t0);
      }
      return { ...percentiles(samples), warmup: cfg.warmup, payload_bytes: size };
    };
    return await withTimeout(run(), cfg.phaseTimeoutMs, 'raw ping-pong');
  } finally {
    if (socket) socket.destroy();
    await echo.stop();
  }
}

async function phaseCall(cfg) {
  return withCluster(1, cfg, async (leader, [ follower ]) => {
    const remote = await follower.request({ cmd: 'call', n: cfg.calls, warmup: cfg.warmup }, cfg.phaseTimeoutMs);
    const local = await leader.request({ cmd: 'call', n: cfg.calls, warmup: cfg.warmup }, cfg.phaseTimeoutMs);
    return { ...remote, leader_local: local };
  });
}

async function phaseThroughput(cfg) {
  const n = cfg.tpFollowers;
  return withCluster(n, cfg, async (leader, followers) => {
    await Promise.all(followers.map(f => f.request({ cmd: 'warm', n: cfg.tpWarmup }, cfg.phaseTimeoutMs)));
    const quota = Math.ceil(cfg.tpCalls / n);
    const res = await Promise.all(followers.map(f => f.request({ cmd: 'throughput', quota, inflight: cfg.inflight }, cfg.phaseTimeoutMs)));
    const start = res.map(r => BigInt(r.start_ns)).reduce((a, b) => (a < b ? a : b));
    const end = res.map(r => BigInt(r.end_ns)).reduce((a, b) => (a > b ? a : b));
    const wall = Number(end - start) / 1e9;
    const completed = res.reduce((a, r) => a + r.completed, 0);
    const errors = res.reduce((a, r) => a + r.errors, 0);
    return {
      calls_per_s: Math.round(completed / wall * 10) / 10,
      calls: completed,
      errors,
      first_error: (res.find(r => r.first_error) || {}).first_error || null,
      wall_s: Math.round(wall * 1000) / 1000,
      followers: n,
      inflight_per_follower: cfg.inflight,
      per_follower_calls_per_s: res.map(r => Math.round(r.completed / (Number(BigInt(r.end_ns) - BigInt(r.start_ns)) / 1e9))),
    };
  });
}

async function clockCheck(child, rounds) {
  let violations = 0;
  let maxRtt = 0n;
  for (let i = 0; i < rounds; i++) {
    const t0 = now();
    const { t } = await child.request({ cmd: 'clock' }, 5000);
    const t1 = now();
    const tc = BigInt(t);
    if (tc < t0 || tc > t1) violations++;
    if (t1 - t0 > maxRtt) maxRtt = t1 - t0;
  }
  return { rounds, violations, max_rtt_us: Number(maxRtt) / 1000 };
}

async function phaseFanout(cfg) {
  return withCluster(cfg.fanFollowers, cfg, async (leader, followers) => {
    const clock = await clockCheck(followers[0], 50);
    await leader.request({ cmd: 'subscribe' }, cfg.phaseTimeoutMs);
    await Promise.all(followers.map(f => f.request({ cmd: 'subscribe' }, cfg.phaseTimeoutMs)));
    const emitTimeout = cfg.events * cfg.intervalMs + cfg.phaseTimeoutMs;
    const emitted = await leader.request({ cmd: 'emit', count: cfg.events, intervalMs: cfg.intervalMs }, emitTimeout);
    await sleep(cfg.graceMs);
    const reports = await Promise.all(followers.map(f => f.request({ cmd: 'report' }, cfg.phaseTimeoutMs)));
    const leaderReport = await leader.request({ cmd: 'report' }, cfg.phaseTimeoutMs);
    const all = [];
    for (const r of reports) for (const x of r.latencies_ns) all.push(x);
    const lostPer = reports.map(r => cfg.events - r.received);
    return {
      ...percentiles(all),
      events: cfg.events,
      interval_ms: cfg.intervalMs,
      subscribers: followers.length + 1,
      followers: followers.length,
      lost: lostPer.reduce((a, b) => a + b, 0),
      lost_per_follower: lostPer,
      duplicates: reports.reduce((a, r) => a + r.duplicates, 0),
      per_follower_p99_us: reports.map(r => percentiles(r.latencies_ns).p99_us),
      leader_local: { ...percentiles(leaderReport.latencies_ns), lost: cfg.events - leaderReport.received },
      emit_duration_ms: Math.round(emitted.duration_ms * 10) / 10,
      emit_max_late_ms: Math.round(emitted.max_late_ms * 1000) / 1000,
      leader_broadcast_sync: emitted.push_sync,
      clock_check: clock,
    };
  });
}

async function runParent(args) {
  const quick = Boolean(args.quick);
  const cfg = {
    quick,
    calls: intArg(args, 'calls', quick ? 5000 : 20000),
    warmup: intArg(args, 'warmup', quick ? 500 : 1000),
    tpFollowers: intArg(args, 'tp-followers', 3),
    tpCalls: intArg(args, 'tp-calls', quick ? 10000 : 50000),
    tpWarmup: intArg(args, 'tp-warmup', quick ? 200 : 1000),
    inflight: intArg(args, 'inflight', 100),
    fanFollowers: intArg(args, 'fanout-followers', 3),
    events: intArg(args, 'events', quick ? 200 : 1000),
    intervalMs: intArg(args, 'interval-ms', 10),
    graceMs: intArg(args, 'grace-ms', 1000),
    startTimeoutMs: 20000,
    phaseTimeoutMs: 120000,
    childTimeoutMs: 0,
  };
  const totalTimeoutMs = intArg(args, 'timeout-s', 240) * 1000;
  cfg.childTimeoutMs = totalTimeoutMs + 10000;
  const runners = { raw: phaseRaw, call: phaseCall, throughput: phaseThroughput, fanout: phaseFanout };
  const phases = String(args.phases || 'raw,call,throughput,fanout').split(',').filter(Boolean);
  for (const p of phases) {
    if (!runners[p]) throw new Error(`unknown phase ${p}`);
  }

  const overall = setTimeout(() => {
    process.stderr.write(`bench.js: overall timeout of ${totalTimeoutMs} ms, killing children\n`);
    killAll();
    process.exit(2);
  }, totalTimeoutMs);

  const t0 = Date.now();
  const out = {
    node: process.version,
    platform: `${process.platform}-${process.arch}`,
    cluster_client_version: require('cluster-client/package.json').version,
    sdk_base_version: require('sdk-base/package.json').version,
    quick,
    config: { ...cfg },
  };
  for (const p of phases) {
    const ts = Date.now();
    process.stderr.write(`bench.js: phase ${p}...\n`);
    out[p] = await runners[p](cfg);
    out[p].elapsed_s = (Date.now() - ts) / 1000;
  }
  out.elapsed_s = (Date.now() - t0) / 1000;
  clearTimeout(overall);
  process.stdout.write(JSON.stringify(out) + '\n');
}

// ------------------------------------------------------------------------- main

const ARGS = parseArgs(process.argv.slice(2));
if (ARGS.child) {
  runChild(ARGS).catch(err => {
    process.stderr.write(`[bench child ${process.pid}] ${err && err.stack || err}\n`);
    if (process.connected) process.send({ id: 0, error: String(err && err.message || err) });
    setTimeout(() => process.exit(1), 50);
  });
} else {
  process.on('exit', killAll);
  for (const sig of [ 'SIGINT', 'SIGTERM', 'SIGHUP' ]) {
    process.on(sig, () => {
      killAll();
      process.exit(128 + (sig === 'SIGINT' ? 2 : sig === 'SIGTERM' ? 15 : 1));
    });
  }
  runParent(ARGS).then(
    () => process.exit(0),
    err => {
      process.stderr.write(`bench.js failed: ${err && err.stack || err}\n`);
      killAll();
      process.exit(1);
    }
  );
}

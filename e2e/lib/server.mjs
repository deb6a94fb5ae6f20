// Helpers to run a real ordersync binary for the tests: temp database, users,
// a free loopback port, start/stop/restart, and a tiny REST client.
import { spawn, execFile } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
export const BIN = process.env.ORDERSYNC_BIN || path.join(REPO, 'target', 'release', 'ordersync');

/** A port that was free a moment ago on 127.0.0.1. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.unref();
    s.on('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

function run(args, { input, env } = {}) {
  return new Promise((resolve, reject) => {
    const child = execFile(BIN, args, { env: { ...process.env, ...env }, timeout: 60000 }, (err, stdout, stderr) => {
      if (err) {
        err.message += `\n$ ordersync ${args.join(' ')}\nstdout: ${stdout}\nstderr: ${stderr}`;
        reject(err);
      } else resolve({ stdout, stderr });
    });
    if (input !== undefined) child.stdin.end(input);
    else child.stdin.end();
  });
}

export class OrderSyncServer {
  /** @param {{dir?: string, port?: number, extraArgs?: string[]}} opts */
  constructor({ dir, port, extraArgs = [] } = {}) {
    this.dir = dir || mkdtempSync(path.join(os.tmpdir(), 'ordersync-e2e-'));
    this.ownsDir = !dir;
    this.db = path.join(this.dir, 'ordersync.db');
    this.port = port;
    this.extraArgs = extraArgs;
    this.proc = null;
    this.log = [];
  }

  get baseUrl() { return `http://127.0.0.1:${this.port}`; }

  async addUser(name, password) {
    await run(['user', 'add', name, '--password-stdin', '--db', this.db], { input: `${password}\n` });
  }

  async createToken(name) {
    const { stdout } = await run(['token', 'create', name, '--db', this.db]);
    const lines = stdout.trim().split('\n');
    return lines[lines.length - 1].trim();
  }

  /** Starts the server and resolves once it printed its listening line. */
  async start() {
    if (!this.port) this.port = await freePort();
    const args = ['serve', '--db', this.db, '--listen', `127.0.0.1:${this.port}`, ...this.extraArgs];
    // A port just released by a stopped server can stay busy for a moment: retry briefly.
    for (let attempt = 0; ; attempt++) {
      try {
        await this._spawn(args);
        return this;
      } catch (e) {
        if (attempt >= 20 || !/in use|AddrInUse|address already/i.test(e.message)) throw e;
        await new Promise((r) => setTimeout(r, 100));
      }
    }
  }

  _spawn(args) {
    return new Promise((resolve, reject) => {
      const proc = spawn(BIN, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, RUST_LOG: process.env.RUST_LOG || 'warn' } });
      let out = '';
      let settled = false;
      const timer = setTimeout(() => finish(new Error(`ordersync did not report listening within 20 s\n${out}`)), 20000);
      const finish = (err) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        if (err) { proc.kill('SIGKILL'); reject(err); } else { this.proc = proc; resolve(); }
      };
      const onData = (buf) => {
        const s = buf.toString();
        out += s;
        this.log.push(s);
        if (this.log.length > 500) this.log.splice(0, 100);
        if (/ordersync listening on http:\/\/\S+/.test(out)) finish(null);
      };
      proc.stdout.on('data', onData);
      proc.stderr.on('data', onData);
      proc.on('error', (e) => finish(e));
      proc.on('exit', (code, sig) => {
        if (this.proc === proc) this.proc = null;
        finish(new Error(`ordersync exited early (code ${code}, signal ${sig})\n${out}`));
      });
    });
  }

  /** SIGTERM and wait for exit (SIGKILL after 10 s). Resolves with the exit code. */
  async stop() {
    const proc = this.proc;
    if (!proc) return null;
    this.proc = null;
    if (proc.exitCode !== null || proc.signalCode !== null) return proc.exitCode;
    return new Promise((resolve) => {
      const kill = setTimeout(() => proc.kill('SIGKILL'), 10000);
      proc.once('exit', (code, sig) => { clearTimeout(kill); resolve(code ?? sig); });
      proc.kill('SIGTERM');
    });
  }

  async restart() {
    const code = await this.stop();
    await this.start();
    return code;
  }

  async dispose() {
    await this.stop();
    if (this.ownsDir) rmSync(this.dir, { recursive: true, force: true });
  }
}

/** Minimal REST client for driving the server from a test. */
export class Api {
  constructor(baseUrl, token) { this.baseUrl = baseUrl; this.token = token; }

  static async login(baseUrl, username, password, extra = {}) {
    const res = await rawFetch(baseUrl, 'POST', '/api/auth/login', { username, password, ...extra });
    if (!res.body || !res.body.success) throw new Error(`login failed: ${res.status} ${JSON.stringify(res.body)}`);
    return new Api(baseUrl, res.body.token);
  }

  req(method, p, body) { return rawFetch(this.baseUrl, method, p, body, this.token); }

  async ok(method, p, body) {
    const r = await this.req(method, p, body);
    if (r.status >= 300 || !r.body || r.body.success === false) throw new Error(`${method} ${p} → ${r.status} ${JSON.stringify(r.body)}`);
    return r.body;
  }

  list() { return this.ok('GET', '/api/pending-orders'); }
  upsert(orders) { return this.ok('POST', '/api/pending-orders', { orders }); }
  del(id, q = '') { return this.ok('DELETE', `/api/pending-orders/${encodeURIComponent(id)}${q}`); }
  lock(id, locked) { return this.ok('PATCH', `/api/pending-orders/${encodeURIComponent(id)}/lock`, { locked }); }
}

export async function rawFetch(baseUrl, method, p, body, token) {
  const headers = {};
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  if (token) headers.Authorization = `Bearer ${token}`;
  const res = await fetch(baseUrl + p, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await res.text();
  let json = null;
  try { json = JSON.parse(text); } catch { /* not JSON */ }
  return { status: res.status, body: json, text, headers: res.headers };
}

let counter = 0;
/** A valid OrderInput for tests. */
export function sampleOrder(overrides = {}) {
  counter += 1;
  return {
    id: `e2e-${process.pid}-${Date.now().toString(36)}-${counter}`,
    customerId: `C${100 + counter}`,
    customerName: `Customer ${counter}`,
    deviceId: 'test-api',
    items: [
      { articleCode: 'ART-1', quantity: 2, price: 10, vat: 22 },
      { articleCode: 'ART-2', quantity: 1, price: 5.5, vat: 10 },
    ],
    ...overrides,
  };
}

/** Polls `fn` until it returns a truthy value (returned) or `timeoutMs` elapses. */
export async function waitUntil(fn, { timeoutMs = 5000, intervalMs = 20, message = 'condition' } = {}) {
  const start = Date.now();
  let last;
  for (;;) {
    try {
      last = await fn();
      if (last) return last;
    } catch (e) { last = e; }
    if (Date.now() - start > timeoutMs) {
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${message}${last instanceof Error ? `: ${last.message}` : ''}`);
    }
    await new Promise((r) => setTimeout(r, intervalMs));
  }
}

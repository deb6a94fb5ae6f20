// An in-memory stand-in for ordersync that follows the wire contract closely
// enough to drive the client through situations the real server cannot be put in
// on demand (RESYNC_REQUIRED after retention pruning, a database that went back
// in time). The real-server tests are the ones that count; this one is scripted.
import http from 'node:http';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { WebSocketServer } from 'ws';
import { REPO } from './server.mjs';

export class FakeServer {
  constructor() {
    this.users = new Map([['alice', { id: '1', password: 'alice-demo' }], ['bob', { id: '2', password: 'bob-demo' }]]);
    this.tokens = new Map(); // token → userId
    this.data = new Map(); // userId → {orders: Map, events: [], floor}
    this.sockets = new Set();
    this.connections = []; // {url} of every WS connection, for assertions
  }

  stream(uid) {
    if (!this.data.has(uid)) this.data.set(uid, { orders: new Map(), events: [], seq: 0, floor: 0 });
    return this.data.get(uid);
  }

  /** Appends an event and pushes it to the user's live sockets. */
  append(uid, type, payload) {
    const s = this.stream(uid);
    const ev = { type, payload, timestamp: new Date().toISOString(), seq: ++s.seq };
    s.events.push(ev);
    for (const so of this.sockets) if (so.uid === uid && so.live) so.ws.send(JSON.stringify(ev));
    return ev;
  }

  /** Forgets events up to `seq`, as retention pruning would. */
  prune(uid, seq) {
    const s = this.stream(uid);
    s.events = s.events.filter((e) => e.seq > seq);
    s.floor = seq;
  }

  tokenFor(username) {
    const t = `tok-${username}-${Math.random().toString(36).slice(2)}`;
    this.tokens.set(t, this.users.get(username).id);
    return t;
  }

  async start() {
    this.http = http.createServer((req, res) => this.handle(req, res).catch((e) => send(res, 500, { success: false, error: e.message, code: 'INTERNAL' })));
    this.wss = new WebSocketServer({ noServer: true });
    this.http.on('upgrade', (req, sock, head) => this.wss.handleUpgrade(req, sock, head, (ws) => this.onSocket(ws, req)));
    await new Promise((r) => this.http.listen(0, '127.0.0.1', r));
    this.port = this.http.address().port;
    this.baseUrl = `http://127.0.0.1:${this.port}`;
    return this;
  }

  async stop() {
    for (const s of this.sockets) s.ws.terminate();
    this.wss.close();
    await new Promise((r) => this.http.close(r));
  }

  onSocket(ws, req) {
    const u = new URL(req.url, 'http://x');
    this.connections.push({ url: req.url });
    const uid = this.tokens.get(u.searchParams.get('token') || '');
    if (!uid) { ws.close(1008, 'authentication failed'); return; }
    const s = this.stream(uid);
    const so = { ws, uid, live: false };
    this.sockets.add(so);
    ws.on('close', () => this.sockets.delete(so));
    ws.on('message', (m) => { if (String(m) === 'ping') ws.send('pong'); });
    const since = u.searchParams.get('since');
    const frame = (type, payload) => JSON.stringify({ type, payload, timestamp: new Date().toISOString() });
    ws.send(frame('CONNECTED', { userId: uid, deviceId: u.searchParams.get('deviceId'), headSeq: s.seq, resumed: since != null }));
    if (since != null) {
      const n = Number(since);
      if (n < s.floor) ws.send(frame('RESYNC_REQUIRED', { headSeq: s.seq, reason: 'since is older than retention' }));
      else for (const e of s.events) if (e.seq > n) ws.send(JSON.stringify(e));
    }
    so.live = true;
  }

  async handle(req, res) {
    const u = new URL(req.url, 'http://x');
    const p = u.pathname;
    const files = { '/': ['index.html', 'text/html'], '/ordersync.js': ['ordersync.js', 'text/javascript'], '/ordersync.d.ts': ['ordersync.d.ts', 'application/typescript'] };
    if (req.method === 'GET' && files[p]) {
      res.writeHead(200, { 'Content-Type': `${files[p][1]}; charset=utf-8` });
      res.end(readFileSync(path.join(REPO, 'web', files[p][0])));
      return;
    }
    const body = await readJson(req);
    if (p === '/api/auth/login' && req.method === 'POST') {
      const user = this.users.get(body.username);
      if (!user || user.password !== body.password) return send(res, 401, { success: false, error: 'invalid username or password', code: 'INVALID_CREDENTIALS' });
      return send(res, 200, { success: true, token: this.tokenFor(body.username), user: { id: user.id, username: body.username }, expiresAt: null });
    }
    const uid = this.tokens.get((req.headers.authorization || '').replace(/^Bearer /, ''));
    if (!uid) return send(res, 401, { success: false, error: 'authentication required', code: 'UNAUTHORIZED' });
    const s = this.stream(uid);
    if (p === '/api/auth/logout') {
      this.tokens.delete((req.headers.authorization || '').replace(/^Bearer /, ''));
      return send(res, 200, { success: true });
    }
    if (p === '/api/pending-orders' && req.method === 'GET') {
      const ids = u.searchParams.get('ids');
      let orders = [...s.orders.values()];
      if (ids != null) { const want = new Set(ids.split(',')); orders = orders.filter((o) => want.has(o.id)); }
      return send(res, 200, { success: true, orders: orders.sort((a, b) => b.updatedAt - a.updatedAt), seq: s.seq });
    }
    if (p === '/api/pending-orders' && req.method === 'POST') {
      const results = [];
      const created = [];
      const updated = [];
      let device = null;
      for (const o of body.orders) {
        device = o.deviceId;
        const prev = s.orders.get(o.id);
        const now = Date.now();
        const { baseVersion, ...rest } = o;
        const order = { status: 'pending', ...rest, isLocked: prev ? prev.isLocked : false, version: prev ? prev.version + 1 : 1, createdAt: prev ? prev.createdAt : now, updatedAt: now };
        s.orders.set(o.id, order);
        (prev ? updated : created).push(o.id);
        results.push({ id: o.id, action: prev ? 'updated' : 'created', version: order.version, serverUpdatedAt: now });
      }
      if (created.length) this.append(uid, 'PENDING_CREATED', { orderIds: created, count: created.length, deviceId: device });
      if (updated.length) this.append(uid, 'PENDING_UPDATED', { orderIds: updated, count: updated.length, deviceId: device });
      return send(res, 200, { success: true, results, seq: s.seq });
    }
    const m = p.match(/^\/api\/pending-orders\/([^/]+)(\/lock)?$/);
    if (m) {
      const id = decodeURIComponent(m[1]);
      const o = s.orders.get(id);
      if (!o) return send(res, 404, { success: false, error: 'order not found', code: 'NOT_FOUND' });
      if (req.method === 'DELETE') {
        s.orders.delete(id);
        this.append(uid, 'PENDING_DELETED', { orderId: id, deviceId: u.searchParams.get('deviceId') });
        return send(res, 200, { success: true, seq: s.seq });
      }
      if (req.method === 'PATCH' && m[2]) {
        o.isLocked = !!body.locked; o.version += 1; o.updatedAt = Date.now();
        this.append(uid, 'PENDING_UPDATED', { orderIds: [id], count: 1, deviceId: body.deviceId || null });
        return send(res, 200, { success: true, id, isLocked: o.isLocked, version: o.version, seq: s.seq });
      }
    }
    return send(res, 404, { success: false, error: 'not found', code: 'NOT_FOUND' });
  }
}

function send(res, status, obj) {
  res.writeHead(status, { 'Content-Type': 'application/json' });
  res.end(JSON.stringify(obj));
}

function readJson(req) {
  return new Promise((resolve) => {
    let b = '';
    req.on('data', (c) => { b += c; });
    req.on('end', () => { try { resolve(b ? JSON.parse(b) : {}); } catch { resolve({}); } });
  });
}

// ordersync.js — dependency-free ES module client for an ordersync server.
//
// Runs unchanged in browsers and in Node >= 20 (pass `WebSocketImpl` from the
// `ws` package there: Node 20 has no global WebSocket). Types: ordersync.d.ts.
//
// How it stays in sync (DESIGN.md §5, §7):
//   1. loadOrders() reads the whole list and remembers its `seq` (the user's last
//      event in the same read snapshot).
//   2. connect() opens /ws/realtime?since=<lastSeq>; the server replays what came
//      after that seq and then streams live events, in order, without holes.
//   3. PENDING_CREATED / PENDING_UPDATED → GET /api/pending-orders?ids=… for just
//      those orders; PENDING_DELETED → remove. lastSeq follows frame.seq.
//   4. Our own writes update the map from the REST reply, so their echoes are
//      not refetched. An echo is a frame whose payload.deviceId is ours AND whose
//      seq a reply of *this client instance* returned. The seq check matters: two
//      tabs of one browser share the deviceId, and each must still apply the
//      other's writes.
//   5. Lost socket → reconnect with exponential backoff (1 s doubling to 30 s,
//      ±20 % jitter), resuming with since=lastSeq. RESYNC_REQUIRED → reload the
//      whole list. Close 1008 (auth failed) / 4001 (revoked) → 'signed-out',
//      never retried.

const KEY_DEVICE = 'ordersync.deviceId';
const KEY_TOKEN = 'ordersync.token';
const KEY_USER = 'ordersync.user';

/** Fields the server manages; stripped from writes (it would ignore them anyway). */
const SERVER_MANAGED = new Set(['version', 'isLocked', 'createdAt', 'updatedAt']);
/** Close codes after which reconnecting cannot help. */
const AUTH_CLOSE_CODES = new Set([1008, 4001]);
/** How many ids go into one `?ids=` request. */
const IDS_PER_REQUEST = 100;
/** How long an event may wait for this client's in-flight writes to answer. */
const ECHO_WAIT_MS = 5000;

/** An error answered by the API (`{success:false, error, code, details}`) or the network. */
export class OrderSyncError extends Error {
  constructor(message, { status = 0, code = 'NETWORK_ERROR', details, current, body } = {}) {
    super(message);
    this.name = 'OrderSyncError';
    this.status = status;
    this.code = code;
    this.details = details;
    this.current = current;
    this.body = body;
  }
}

/** A Storage-like object kept in memory (Node, or browsers where localStorage throws). */
export class MemoryStorage {
  constructor() { this._m = new Map(); }
  getItem(k) { return this._m.has(k) ? this._m.get(k) : null; }
  setItem(k, v) { this._m.set(k, String(v)); }
  removeItem(k) { this._m.delete(k); }
}

function defaultStorage() {
  try {
    const ls = globalThis.localStorage;
    if (ls) {
      const probe = '__ordersync_probe__';
      ls.setItem(probe, '1');
      ls.removeItem(probe);
      return ls;
    }
  } catch { /* private mode, sandboxed iframe, Node: fall through */ }
  return new MemoryStorage();
}

function randomId() {
  const c = globalThis.crypto;
  if (c && typeof c.randomUUID === 'function') return c.randomUUID();
  // randomUUID needs a secure context; getRandomValues does not.
  const b = new Uint8Array(16);
  if (c && typeof c.getRandomValues === 'function') c.getRandomValues(b);
  else for (let i = 0; i < 16; i++) b[i] = Math.floor(Math.random() * 256);
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/**
 * Delay before reconnect attempt `attempt` (0-based): 1 s doubling to 30 s, then
 * ±`jitter` (fraction) around it, never above `maxMs`.
 */
export function backoffDelay(attempt, { initialMs = 1000, maxMs = 30000, jitter = 0.2, random = Math.random } = {}) {
  const base = Math.min(maxMs, initialMs * 2 ** Math.min(attempt, 30));
  const spread = base * jitter * (2 * random() - 1);
  return Math.max(0, Math.min(maxMs, Math.round(base + spread)));
}

/**
 * Total with VAT of an order: Σ quantity·price·(1 + vat/100), less discountPercent.
 * @param {{items?: Array<{quantity:number, price:number, vat:number}>, discountPercent?: number}} order
 */
export function orderTotal(order) {
  let sum = 0;
  for (const it of order.items || []) {
    sum += Number(it.quantity) * Number(it.price) * (1 + Number(it.vat) / 100);
  }
  const discount = Number(order.discountPercent) || 0;
  return sum * (1 - discount / 100);
}

const isAuthError = (e) => e instanceof OrderSyncError && e.status === 401;

export class OrderSyncClient {
  constructor({
    baseUrl,
    storage,
    WebSocketImpl = globalThis.WebSocket,
    fetchImpl,
    deviceId,
    token,
    label = 'ordersync.js',
    reconnect = {},
    pingIntervalMs = 25000,
  } = {}) {
    if (!baseUrl) {
      if (globalThis.location && globalThis.location.origin) baseUrl = globalThis.location.origin;
      else throw new TypeError('OrderSyncClient: baseUrl is required outside a browser');
    }
    this.baseUrl = String(baseUrl).endsWith('/') ? String(baseUrl) : `${baseUrl}/`;
    this.storage = storage || defaultStorage();
    this.WebSocketImpl = WebSocketImpl;
    const f = fetchImpl || globalThis.fetch;
    if (typeof f !== 'function') throw new TypeError('OrderSyncClient: no fetch implementation');
    // Browsers require fetch to be called with `this` = window.
    this.fetchImpl = fetchImpl ? fetchImpl : (...a) => f.apply(globalThis, a);
    this.label = label;
    this.reconnectOptions = { initialMs: 1000, maxMs: 30000, jitter: 0.2, random: Math.random, ...reconnect };
    this.pingIntervalMs = pingIntervalMs;

    let id = deviceId || this.storage.getItem(KEY_DEVICE);
    if (!id) {
      id = randomId();
      this.storage.setItem(KEY_DEVICE, id);
    }
    /** This browser's stable device id (sent with every write and on the socket). */
    this.deviceId = id;

    if (token) this.storage.setItem(KEY_TOKEN, token);
    /** @type {Map<string, object>} id → Order, as last seen from the server. */
    this.orders = new Map();
    /** Last event seq reflected in `orders` (null until the list was loaded). */
    this.lastSeq = null;
    this.state = this.token ? 'offline' : 'signed-out';

    this._listeners = new Map();
    this._ws = null;
    this._want = false;          // the caller wants a live connection
    this._attempt = 0;           // reconnect attempts since the last CONNECTED
    this._reconnectTimer = null;
    this._pingTimer = null;
    this._lastMessageAt = 0;
    this._queue = [];            // frames and list loads, applied strictly in order
    this._draining = false;
    this._gen = 0;               // bumped to drop queued frames of a broken stream
    this._connCount = 0;         // sockets opened so far
    this._resyncConn = 0;        // the socket for which a full reload was queued
    this._ownWrites = new Map(); // seq → [{id, version}] written by this instance
    this._inflight = new Set();  // promises of writes not yet answered
    this._onOnline = () => { if (this._want && !this._ws) this._openSoon(0); };
    if (typeof globalThis.addEventListener === 'function') {
      globalThis.addEventListener('online', this._onOnline);
    }
  }

  // ---- identity ----------------------------------------------------------

  /** The bearer token (persisted in storage), or null when signed out. */
  get token() { return this.storage.getItem(KEY_TOKEN); }

  /** `{id, username}` of the signed-in user, or null. */
  get user() {
    try { return JSON.parse(this.storage.getItem(KEY_USER) || 'null'); } catch { return null; }
  }

  /** Orders sorted newest `updatedAt` first. */
  list() {
    return [...this.orders.values()].sort((a, b) => (b.updatedAt || 0) - (a.updatedAt || 0) || String(a.id).localeCompare(String(b.id)));
  }

  async login(username, password) {
    const body = await this._request('POST', 'api/auth/login', {
      body: { username, password, deviceId: this.deviceId, label: this.label },
      auth: false,
    });
    if (this.token && this.token !== body.token) this._resetData();
    this.storage.setItem(KEY_TOKEN, body.token);
    this.storage.setItem(KEY_USER, JSON.stringify(body.user));
    if (this.state === 'signed-out') this._setState('offline');
    return body;
  }

  /** Revokes the token on the server (best effort) and forgets it locally. */
  async logout() {
    const token = this.token;
    this._want = false;
    this._closeSocket(1000, 'logout');
    if (token) {
      try { await this._request('POST', 'api/auth/logout', { token }); } catch { /* already invalid or offline */ }
    }
    this._signOut(null);
  }

  // ---- data --------------------------------------------------------------

  /** Reloads the whole list (replacing the map) and remembers its seq. */
  loadOrders() {
    return new Promise((resolve, reject) => this._enqueue({ kind: 'load', resolve, reject }));
  }

  /** Upserts one order (a batch of one). Returns the server's result for it. */
  async saveOrder(orderInput, options = {}) {
    const [result] = await this.saveOrders([orderInput], options);
    return result;
  }

  /**
   * Upserts orders in one batch. Each result is `{id, action, version,
   * serverUpdatedAt, current?}`; `action: 'conflict'` results also refresh the map
   * from `current`.
   */
  async saveOrders(orderInputs, { baseVersion } = {}) {
    const inputs = orderInputs.map((o) => this._toInput(o, orderInputs.length === 1 ? baseVersion : undefined));
    const body = await this._write(() => this._request('POST', 'api/pending-orders', { body: { orders: inputs } }), (reply) => {
      const results = reply.results || [];
      const byId = new Map(inputs.map((o) => [o.id, o]));
      const created = [];
      const updated = [];
      for (const r of results) {
        const input = byId.get(r.id);
        if (r.action === 'created' || r.action === 'updated') {
          const prev = this.orders.get(r.id);
          const order = {
            ...(r.action === 'updated' && prev ? prev : {}),
            ...stripWriteOnly(input),
            isLocked: r.action === 'updated' && prev ? !!prev.isLocked : false,
            version: r.version,
            createdAt: r.action === 'updated' && prev ? prev.createdAt : r.serverUpdatedAt,
            updatedAt: r.serverUpdatedAt,
          };
          this._put(order);
          (r.action === 'created' ? created : updated).push({ id: r.id, version: r.version });
        } else if (r.action === 'conflict') {
          if (r.current) this._put(r.current, true);
          else this.orders.delete(r.id);
        }
      }
      // One aggregated event per action, in this order, ending at reply.seq.
      let seq = reply.seq;
      if (updated.length) this._ownWrites.set(seq--, updated);
      if (created.length) this._ownWrites.set(seq--, created);
      this._emit('orders', this.orders, { reason: 'write', ids: results.map((r) => r.id) });
    });
    return body.results;
  }

  /** Deletes an order. With `baseVersion`, a newer server version answers 409 (code in error). */
  async deleteOrder(id, { baseVersion } = {}) {
    const q = new URLSearchParams({ deviceId: this.deviceId });
    if (baseVersion != null) q.set('baseVersion', String(baseVersion));
    try {
      return await this._write(() => this._request('DELETE', `api/pending-orders/${encodeURIComponent(id)}?${q}`), (reply) => {
        const prev = this.orders.get(id);
        this.orders.delete(id);
        this._ownWrites.set(reply.seq, [{ id, version: prev ? prev.version : 0, deleted: true }]);
        this._emit('orders', this.orders, { reason: 'write', ids: [id] });
      });
    } catch (e) {
      if (e instanceof OrderSyncError && e.status === 404 && this.orders.delete(id)) {
        this._emit('orders', this.orders, { reason: 'write', ids: [id] });
      } else if (e instanceof OrderSyncError && e.status === 409 && e.current) {
        this._put(e.current, true);
        this._emit('orders', this.orders, { reason: 'write', ids: [id] });
      }
      throw e;
    }
  }

  /**
   * Locks or unlocks an order. Returns `{success, id, isLocked, version, seq}`.
   * The reply has no `updatedAt` (which a lock change bumps), so unlike other
   * writes its echo is not skipped: the order is refetched to show the exact time.
   */
  async setLocked(id, locked) {
    return this._write(() => this._request('PATCH', `api/pending-orders/${encodeURIComponent(id)}/lock`, {
      body: { locked: !!locked, deviceId: this.deviceId },
    }), (reply) => {
      const prev = this.orders.get(id);
      if (prev) this._put({ ...prev, isLocked: reply.isLocked, version: reply.version });
      this._emit('orders', this.orders, { reason: 'write', ids: [id] });
    });
  }

  // ---- connection --------------------------------------------------------

  /** Starts (or keeps) the realtime connection; loads the list first if needed. */
  connect() {
    if (!this.token) {
      this._setState('signed-out');
      return;
    }
    if (!this.WebSocketImpl) throw new TypeError('OrderSyncClient: no WebSocket implementation (pass WebSocketImpl)');
    this._want = true;
    if (this._ws || this._reconnectTimer || this._opening) return;
    this._setState(this._everLive ? 'reconnecting' : 'connecting');
    this._open();
  }

  /** Closes the connection and stays 'offline' until connect(). */
  disconnect() {
    this._want = false;
    this._closeSocket(1000, 'client disconnect');
    if (this.state !== 'signed-out') this._setState('offline');
  }

  /** Resolves once `state` equals `state` (or rejects after `timeoutMs`). */
  waitForState(state, { timeoutMs = 10000 } = {}) {
    if (this.state === state) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => { off(); reject(new Error(`timeout waiting for state ${state} (now ${this.state})`)); }, timeoutMs);
      const off = this.on('state', (s) => { if (s === state) { clearTimeout(t); off(); resolve(); } });
    });
  }

  /** Subscribes to 'orders' | 'state' | 'event' | 'error'. Returns an unsubscribe function. */
  on(name, cb) {
    if (!this._listeners.has(name)) this._listeners.set(name, new Set());
    this._listeners.get(name).add(cb);
    return () => this.off(name, cb);
  }

  off(name, cb) {
    const s = this._listeners.get(name);
    if (s) s.delete(cb);
  }

  /** Stops everything (timers, socket, window listeners). */
  close() {
    this.disconnect();
    if (typeof globalThis.removeEventListener === 'function') {
      globalThis.removeEventListener('online', this._onOnline);
    }
  }

  // ---- internals: HTTP ---------------------------------------------------

  _url(path) { return new URL(path, this.baseUrl).toString(); }

  async _request(method, path, { body, auth = true, token = this.token } = {}) {
    const headers = { Accept: 'application/json' };
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    if (auth) {
      if (!token) throw new OrderSyncError('not signed in', { status: 401, code: 'UNAUTHORIZED' });
      headers.Authorization = `Bearer ${token}`;
    }
    let res;
    try {
      res = await this.fetchImpl(this._url(path), {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        cache: 'no-store',
      });
    } catch (e) {
      throw new OrderSyncError(`network error: ${e && e.message ? e.message : e}`, { code: 'NETWORK_ERROR' });
    }
    let data = null;
    const text = await res.text().catch(() => '');
    if (text) {
      try { data = JSON.parse(text); } catch { data = null; }
    }
    if (!res.ok || !data || data.success === false) {
      const message = (data && data.error) || `HTTP ${res.status} ${res.statusText || ''}`.trim();
      const err = new OrderSyncError(message, {
        status: res.status,
        code: (data && data.code) || `HTTP_${res.status}`,
        details: data && data.details,
        current: data && data.current,
        body: data,
      });
      if (auth && res.status === 401 && token === this.token) this._signOut(err);
      throw err;
    }
    return data;
  }

  /** Runs a write, applying its reply before anyone waiting for echoes looks. */
  async _write(send, apply) {
    let done;
    const p = new Promise((r) => { done = r; });
    this._inflight.add(p);
    try {
      const reply = await send();
      apply(reply);
      return reply;
    } finally {
      this._inflight.delete(p);
      done();
    }
  }

  _toInput(o, baseVersion) {
    const out = {};
    for (const [k, v] of Object.entries(o || {})) {
      // null = "not set": absent is the same to the server and always accepted.
      if (v !== undefined && v !== null && !SERVER_MANAGED.has(k)) out[k] = v;
    }
    if (!out.id) out.id = randomId();
    out.deviceId = this.deviceId;
    if (baseVersion != null) out.baseVersion = baseVersion;
    return out;
  }

  // ---- internals: the ordered queue of list loads and frames -------------

  _enqueue(item) {
    this._queue.push(item);
    if (!this._draining) this._drain();
  }

  async _drain() {
    this._draining = true;
    try {
      while (this._queue.length) {
        const item = this._queue.shift();
        if (item.kind === 'load') {
          try { item.resolve(await this._loadAll(false)); } catch (e) { item.reject(e); }
          continue;
        }
        if (item.gen !== this._gen) continue; // stream broke after this frame was queued
        if (item.kind === 'resync') {
          try {
            await this._loadAll(true);
          } catch (e) {
            this._streamFailed(e);
          }
          continue;
        }
        // Coalesce consecutive CREATED/UPDATED frames into one `?ids=` fetch.
        const group = [item.frame];
        if (isUpsert(item.frame)) {
          while (this._queue.length && this._queue[0].kind === 'frame' && this._queue[0].gen === this._gen && isUpsert(this._queue[0].frame)) {
            group.push(this._queue.shift().frame);
          }
        }
        try {
          await this._applyFrames(group);
        } catch (e) {
          this._streamFailed(e);
        }
      }
    } finally {
      this._draining = false;
    }
  }

  async _loadAll(force) {
    const data = await this._request('GET', 'api/pending-orders');
    this.orders = new Map((data.orders || []).map((o) => [o.id, o]));
    if (typeof data.seq === 'number') {
      // `force` (resync): the server's timeline wins, even if lower than ours.
      this._setSeq(force || this.lastSeq == null ? data.seq : Math.max(this.lastSeq, data.seq));
      this._pruneOwnWrites();
    }
    this._emit('orders', this.orders, { reason: force ? 'resync' : 'load', ids: null });
    return this.orders;
  }

  async _applyFrames(frames) {
    const fetchIds = new Set();
    let changed = [];
    let maxSeq = this.lastSeq;
    for (const f of frames) {
      if (typeof f.seq === 'number' && this.lastSeq != null && f.seq <= this.lastSeq) continue; // already reflected
      const p = f.payload || {};
      if (f.type === 'PENDING_DELETED') {
        if (p.orderId != null && this.orders.delete(p.orderId)) changed.push(p.orderId);
      } else {
        const ids = Array.isArray(p.orderIds) ? p.orderIds : [];
        if (!(await this._isEcho(f, ids))) ids.forEach((id) => fetchIds.add(id));
      }
      if (typeof f.seq === 'number') maxSeq = maxSeq == null ? f.seq : Math.max(maxSeq, f.seq);
    }
    if (fetchIds.size) {
      const got = await this._fetchIds([...fetchIds]);
      for (const id of fetchIds) {
        const o = got.get(id);
        if (o) this._put(o);
        else this.orders.delete(id); // gone again already; its delete event follows
        changed.push(id);
      }
    }
    if (maxSeq != null) this._setSeq(maxSeq);
    this._pruneOwnWrites();
    if (changed.length) this._emit('orders', this.orders, { reason: 'event', ids: [...new Set(changed)] });
  }

  /** Our own write, already applied from its reply (see the header comment). */
  async _isEcho(frame, ids) {
    if (!frame.payload || frame.payload.deviceId !== this.deviceId) return false;
    const known = () => {
      const w = this._ownWrites.get(frame.seq);
      if (!w) return false;
      return ids.every((id) => {
        const mine = w.find((x) => x.id === id);
        const have = this.orders.get(id);
        return mine && have && (have.version || 0) >= mine.version;
      });
    };
    if (known()) return true;
    if (this._inflight.size) {
      // The event can overtake the HTTP reply that tells us it was ours.
      let timer;
      await Promise.race([
        Promise.allSettled([...this._inflight]),
        new Promise((r) => { timer = setTimeout(r, ECHO_WAIT_MS); }),
      ]);
      clearTimeout(timer);
      return known();
    }
    return false;
  }

  async _fetchIds(ids) {
    const out = new Map();
    const plain = ids.filter((id) => !String(id).includes(','));
    for (let i = 0; i < plain.length; i += IDS_PER_REQUEST) {
      const chunk = plain.slice(i, i + IDS_PER_REQUEST);
      const q = chunk.map((id) => encodeURIComponent(id)).join(',');
      const data = await this._request('GET', `api/pending-orders?ids=${q}`);
      for (const o of data.orders || []) out.set(o.id, o);
    }
    // An id with a comma cannot travel in `?ids=`: fetch it on its own.
    for (const id of ids.filter((x) => String(x).includes(','))) {
      try {
        const data = await this._request('GET', `api/pending-orders/${encodeURIComponent(id)}`);
        if (data.order) out.set(data.order.id, data.order);
      } catch (e) {
        if (!(e instanceof OrderSyncError && e.status === 404)) throw e;
      }
    }
    return out;
  }

  /** Stores an order unless the map already holds a newer version of the same incarnation. */
  _put(o, force = false) {
    const prev = this.orders.get(o.id);
    if (!force && prev && prev.createdAt === o.createdAt && (prev.version || 0) > (o.version || 0)) return;
    this.orders.set(o.id, o);
  }

  _pruneOwnWrites() {
    if (this.lastSeq == null) return;
    for (const seq of this._ownWrites.keys()) if (seq <= this.lastSeq) this._ownWrites.delete(seq);
  }

  /** Applying the stream failed (e.g. a fetch): drop the socket and resume from lastSeq. */
  _streamFailed(err) {
    this._gen++;
    if (isAuthError(err)) return; // _request already signed out
    this._emit('error', err);
    if (this._want) {
      this._closeSocket(4000, 'client resync');
      this._scheduleReconnect();
    }
  }

  // ---- internals: the socket ---------------------------------------------

  _wsUrl() {
    const u = new URL('ws/realtime', this.baseUrl);
    u.protocol = u.protocol === 'https:' ? 'wss:' : 'ws:';
    u.searchParams.set('token', this.token || '');
    if (this.lastSeq != null) u.searchParams.set('since', String(this.lastSeq));
    u.searchParams.set('deviceId', this.deviceId);
    return u.toString();
  }

  async _open() {
    this._reconnectTimer = null;
    if (!this._want || this._ws || this._opening) return;
    if (!this.token) { this._signOut(null); return; }
    this._opening = true;
    try {
      if (this.lastSeq == null) await this.loadOrders();
    } catch (e) {
      this._opening = false;
      if (isAuthError(e)) return;
      this._emit('error', e);
      if (this._want) this._scheduleReconnect();
      return;
    }
    this._opening = false;
    if (!this._want || this._ws) return;
    let ws;
    try {
      ws = new this.WebSocketImpl(this._wsUrl());
    } catch (e) {
      this._emit('error', e);
      this._scheduleReconnect();
      return;
    }
    this._ws = ws;
    const gen = this._gen;
    const conn = ++this._connCount;
    this._lastMessageAt = Date.now();
    ws.onopen = () => {
      if (this._ws !== ws) return;
      this._startPing(ws);
    };
    ws.onmessage = (ev) => {
      if (this._ws !== ws) return;
      this._lastMessageAt = Date.now();
      let data = ev.data;
      if (typeof data !== 'string') data = typeof TextDecoder !== 'undefined' ? new TextDecoder().decode(data) : String(data);
      if (data === 'pong') return;
      let frame;
      try { frame = JSON.parse(data); } catch { return; }
      this._onFrame(frame, gen, conn);
    };
    ws.onerror = () => { /* the close event follows and decides */ };
    ws.onclose = (ev) => {
      if (this._ws !== ws) return;
      this._ws = null;
      this._stopPing();
      const code = ev && ev.code;
      if (AUTH_CLOSE_CODES.has(code)) {
        const reason = code === 4001 ? 'token revoked' : 'authentication failed';
        this._signOut(new OrderSyncError(`signed out: ${(ev && ev.reason) || reason}`, { status: 401, code: code === 4001 ? 'TOKEN_REVOKED' : 'AUTH_FAILED' }));
      } else if (this._want) {
        this._scheduleReconnect();
      } else if (this.state !== 'signed-out') {
        this._setState('offline');
      }
    };
  }

  /** One full reload per connection is enough, whoever asked first. */
  _queueResync(gen, conn) {
    if (this._resyncConn === conn) return;
    this._resyncConn = conn;
    this._enqueue({ kind: 'resync', gen });
  }

  _onFrame(frame, gen, conn) {
    this._emit('event', frame, { echo: !!(frame.payload && frame.payload.deviceId === this.deviceId) });
    switch (frame.type) {
      case 'CONNECTED': {
        this._attempt = 0;
        this._everLive = true;
        const head = frame.payload && frame.payload.headSeq;
        // The server's log is behind us: a different database. Start over from it.
        if (typeof head === 'number' && this.lastSeq != null && head < this.lastSeq) {
          this._queueResync(gen, conn);
        }
        this._setState('live');
        break;
      }
      case 'RESYNC_REQUIRED':
        this._queueResync(gen, conn);
        break;
      case 'PENDING_CREATED':
      case 'PENDING_UPDATED':
      case 'PENDING_DELETED':
        this._enqueue({ kind: 'frame', frame, gen });
        break;
      default:
        break; // unknown types are for newer clients
    }
  }

  _startPing(ws) {
    this._stopPing();
    if (!this.pingIntervalMs) return;
    this._pingTimer = setInterval(() => {
      if (this._ws !== ws) return;
      // No pong (or anything) for two intervals: the connection is dead.
      if (Date.now() - this._lastMessageAt > 2 * this.pingIntervalMs + 1000) {
        this._closeSocket(4000, 'keepalive timeout');
        if (this._want) this._scheduleReconnect();
        return;
      }
      try { ws.send('ping'); } catch { /* close follows */ }
    }, this.pingIntervalMs);
  }

  _stopPing() {
    if (this._pingTimer) clearInterval(this._pingTimer);
    this._pingTimer = null;
  }

  _closeSocket(code, reason) {
    if (this._reconnectTimer) clearTimeout(this._reconnectTimer);
    this._reconnectTimer = null;
    this._stopPing();
    const ws = this._ws;
    this._ws = null;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
      try { ws.close(code, reason); } catch { try { ws.close(); } catch { /* ignore */ } }
    }
  }

  _scheduleReconnect() {
    if (this._reconnectTimer || !this._want) return;
    this._setState('reconnecting');
    const delay = backoffDelay(this._attempt++, this.reconnectOptions);
    this._reconnectTimer = setTimeout(() => this._open(), delay);
  }

  _openSoon(delay) {
    if (this._reconnectTimer) clearTimeout(this._reconnectTimer);
    this._reconnectTimer = setTimeout(() => this._open(), delay);
  }

  _signOut(err) {
    this._want = false;
    this._closeSocket(1000, 'signed out');
    this._gen++;
    this.storage.removeItem(KEY_TOKEN);
    this.storage.removeItem(KEY_USER);
    this._resetData();
    this._emit('orders', this.orders, { reason: 'signed-out', ids: null });
    this._setState('signed-out');
    if (err) this._emit('error', err);
  }

  _resetData() {
    this.orders = new Map();
    this.lastSeq = null;
    this._ownWrites.clear();
    this._everLive = false;
    this._attempt = 0;
  }

  _setSeq(seq) {
    if (seq === this.lastSeq) return;
    this.lastSeq = seq;
    this._emit('seq', seq);
  }

  _setState(s) {
    if (this.state === s) return;
    const prev = this.state;
    this.state = s;
    this._emit('state', s, prev);
  }

  _emit(name, ...args) {
    const s = this._listeners.get(name);
    if (!s) return;
    for (const cb of [...s]) {
      try { cb(...args); } catch (e) {
        if (name !== 'error') this._emit('error', e);
      }
    }
  }
}

function isUpsert(f) { return f.type === 'PENDING_CREATED' || f.type === 'PENDING_UPDATED'; }
function stripWriteOnly(o) {
  const { baseVersion, ...rest } = o || {};
  return rest;
}

export default OrderSyncClient;

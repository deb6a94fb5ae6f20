// Node tests of web/ordersync.js against a real ordersync (target/release/ordersync):
// list + since, applying other devices' changes with `?ids=`, echo skipping,
// resume after a dropped socket and after a server restart, no retry on 1008/4001,
// text ping/pong. RESYNC_REQUIRED is driven by a scripted fake (lib/fake-server.mjs).
import { test, before, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import WebSocket from 'ws';
import { OrderSyncClient, MemoryStorage, backoffDelay, orderTotal } from '../web/ordersync.js';
import { OrderSyncServer, Api, rawFetch, sampleOrder, waitUntil, REPO } from './lib/server.mjs';
import { FakeServer } from './lib/fake-server.mjs';

const FAST = { initialMs: 100, maxMs: 1000 };

/** A client whose sockets and requests are recorded for assertions. */
function makeClient(baseUrl, { deviceId, token, reconnect = FAST, pingIntervalMs = 25000 } = {}) {
  const sockets = [];
  const requests = [];
  class RecordingWebSocket extends WebSocket {
    constructor(url, ...rest) {
      super(url, ...rest);
      const rec = { url, sent: [], received: [], closeCode: null };
      sockets.push(rec);
      this.on('message', (d) => rec.received.push(d.toString()));
      this.on('close', (code) => { rec.closeCode = code; });
      const send = this.send.bind(this);
      this.send = (data, ...a) => { rec.sent.push(String(data)); return send(data, ...a); };
    }
  }
  const fetchImpl = (url, init = {}) => {
    requests.push({ method: init.method || 'GET', url: String(url) });
    return fetch(url, init);
  };
  const client = new OrderSyncClient({
    baseUrl, storage: new MemoryStorage(), WebSocketImpl: RecordingWebSocket, fetchImpl,
    deviceId, token, reconnect, pingIntervalMs, label: 'e2e client test',
  });
  const frames = [];
  client.on('event', (f) => frames.push(f));
  const errors = [];
  client.on('error', (e) => errors.push(e));
  return { client, sockets, requests, frames, errors };
}

const idsFetches = (requests) => requests.filter((r) => r.method === 'GET' && /\/api\/pending-orders\?ids=/.test(r.url));
const fullLists = (requests) => requests.filter((r) => r.method === 'GET' && /\/api\/pending-orders$/.test(r.url));
const seqOf = (u) => new URL(u).searchParams.get('since');

describe('ordersync.js against a real server', () => {
  let server;
  let api; // alice, through plain REST
  const clients = [];
  const track = (c) => { clients.push(c.client); return c; };

  before(async () => {
    server = new OrderSyncServer();
    await server.addUser('alice', 'alice-e2e-pass');
    await server.addUser('bob', 'bob-e2e-pass');
    await server.start();
    api = await Api.login(server.baseUrl, 'alice', 'alice-e2e-pass');
  });

  after(async () => {
    for (const c of clients) c.close();
    if (server) await server.dispose();
  });

  async function liveClient(opts = {}) {
    const c = track(makeClient(server.baseUrl, opts));
    await c.client.login(opts.user || 'alice', `${opts.user || 'alice'}-e2e-pass`);
    c.client.connect();
    await c.client.waitForState('live');
    return c;
  }

  test('serves the embedded client files unchanged', async () => {
    for (const [url, file, type] of [['/ordersync.js', 'ordersync.js', /javascript/], ['/ordersync.d.ts', 'ordersync.d.ts', /./], ['/', 'index.html', /text\/html/]]) {
      const r = await rawFetch(server.baseUrl, 'GET', url);
      assert.equal(r.status, 200, url);
      assert.match(r.headers.get('content-type') || '', type, `${url} content-type`);
      assert.equal(r.text, readFileSync(path.join(REPO, 'web', file), 'utf8'), `${url} is not the current web/${file} (rebuild the server?)`);
    }
  });

  test('loads the list, remembers seq and connects with since=seq and deviceId', async () => {
    await api.upsert([sampleOrder()]);
    const { client, sockets } = await liveClient({ deviceId: 'dev-load' });
    const list = await api.list();
    assert.equal(client.orders.size, list.orders.length);
    assert.equal(client.lastSeq, list.seq);
    const u = new URL(sockets[0].url);
    assert.equal(u.pathname, '/ws/realtime');
    assert.equal(u.searchParams.get('since'), String(list.seq));
    assert.equal(u.searchParams.get('deviceId'), 'dev-load');
    assert.ok(u.searchParams.get('token'));
  });

  test('applies other devices\' changes with ?ids= and skips its own echoes', async () => {
    const a = await liveClient({ deviceId: 'dev-A' });
    const b = await liveClient({ deviceId: 'dev-B' });
    const aIdsBefore = idsFetches(a.requests).length;
    const bListsBefore = fullLists(b.requests).length;

    // create in A
    const order = sampleOrder();
    const res = await a.client.saveOrder(order);
    assert.equal(res.action, 'created');
    assert.equal(res.version, 1);
    assert.ok(a.client.orders.has(order.id), 'A applies its own write from the reply');
    await waitUntil(() => b.client.orders.get(order.id), { message: 'B to receive the created order', timeoutMs: 3000 });
    const got = b.client.orders.get(order.id);
    assert.equal(got.customerName, order.customerName);
    assert.equal(got.deviceId, 'dev-A');
    assert.ok(idsFetches(b.requests).some((r) => decodeURIComponent(r.url).endsWith(`ids=${order.id}`)), 'B fetched only the changed id');
    assert.equal(fullLists(b.requests).length, bListsBefore, 'B did not reload the whole list');

    // A sees its own echo: lastSeq advances, but nothing is refetched
    const head = (await api.list()).seq;
    await waitUntil(() => a.client.lastSeq >= head, { message: 'A to track the echo seq' });
    assert.equal(idsFetches(a.requests).length, aIdsBefore, 'A refetched its own echo');

    // update in B → A
    const upd = await b.client.saveOrder({ ...got, customerName: 'Renamed by B' }, { baseVersion: got.version });
    assert.equal(upd.action, 'updated');
    assert.equal(upd.version, 2);
    await waitUntil(() => a.client.orders.get(order.id)?.customerName === 'Renamed by B', { message: 'A to see B\'s update' });
    assert.equal(a.client.orders.get(order.id).version, 2);

    // lock in A → B
    const lk = await a.client.setLocked(order.id, true);
    assert.equal(lk.isLocked, true);
    await waitUntil(() => b.client.orders.get(order.id)?.isLocked === true, { message: 'B to see the lock' });
    assert.equal(b.client.orders.get(order.id).version, lk.version);

    // delete in B → A
    await b.client.setLocked(order.id, false);
    await b.client.deleteOrder(order.id);
    assert.ok(!b.client.orders.has(order.id));
    await waitUntil(() => !a.client.orders.has(order.id), { message: 'A to see the delete' });

    // every change each client made itself was an echo it did not refetch
    const headNow = (await api.list()).seq;
    await waitUntil(() => a.client.lastSeq === headNow && b.client.lastSeq === headNow, { message: 'both at head' });
    const aIds = idsFetches(a.requests).length - aIdsBefore;
    // B's update, A's own lock (its reply lacks updatedAt, so it is refetched), B's unlock
    assert.equal(aIds, 3, `A fetched ids ${aIds} times; expected 3`);
    assert.equal(a.errors.length + b.errors.length, 0, [...a.errors, ...b.errors].map(String).join('; '));
  });

  test('two tabs sharing one deviceId still apply each other\'s writes', async () => {
    const t1 = await liveClient({ deviceId: 'shared-browser' });
    const t2 = await liveClient({ deviceId: 'shared-browser' });
    const order = sampleOrder();
    await t1.client.saveOrder(order);
    await waitUntil(() => t2.client.orders.has(order.id), { message: 'tab 2 to see tab 1\'s order', timeoutMs: 3000 });
    await t2.client.saveOrder({ ...t2.client.orders.get(order.id), notes: 'from tab 2' });
    await waitUntil(() => t1.client.orders.get(order.id)?.notes === 'from tab 2', { message: 'tab 1 to see tab 2\'s edit', timeoutMs: 3000 });
  });

  test('resumes with since=lastSeq after a dropped socket and gets exactly the missed events', async () => {
    const { client, sockets, frames, requests } = await liveClient({ deviceId: 'dev-resume' });
    const keep = sampleOrder();
    const gone = sampleOrder();
    await api.upsert([keep, gone]);
    await waitUntil(() => client.orders.has(keep.id) && client.orders.has(gone.id), { message: 'seeded orders' });
    const listsBefore = fullLists(requests).length;

    client.disconnect();
    assert.equal(client.state, 'offline');
    const resumeFrom = client.lastSeq;
    const added = sampleOrder();
    const r1 = await api.upsert([added]);
    const r2 = await api.upsert([{ ...keep, customerName: 'changed while offline' }]);
    const r3 = await api.del(gone.id);
    assert.ok(r1.seq > resumeFrom && r2.seq > r1.seq && r3.seq > r2.seq);

    const framesBefore = frames.length;
    client.connect();
    await client.waitForState('live');
    assert.equal(seqOf(sockets.at(-1).url), String(resumeFrom));
    await waitUntil(() => client.lastSeq === r3.seq, { message: 'client to reach the head seq' });
    assert.ok(client.orders.has(added.id));
    assert.equal(client.orders.get(keep.id).customerName, 'changed while offline');
    assert.ok(!client.orders.has(gone.id));
    const seqs = frames.slice(framesBefore).filter((f) => f.seq != null).map((f) => f.seq);
    assert.deepEqual(seqs, [r1.seq, r2.seq, r3.seq], 'replayed exactly the missed events, in order');
    assert.equal(fullLists(requests).length, listsBefore, 'resume did not reload the whole list');
  });

  test('reconnects with backoff after a server restart and resumes from lastSeq', async () => {
    const a = await liveClient({ deviceId: 'dev-restart-1' });
    const b = await liveClient({ deviceId: 'dev-restart-2' });
    const seqBefore = a.client.lastSeq;
    const code = await server.stop();
    assert.equal(code, 0, 'SIGTERM exits 0');
    await a.client.waitForState('reconnecting', { timeoutMs: 5000 });
    await b.client.waitForState('reconnecting', { timeoutMs: 5000 });
    assert.equal(a.sockets[0].closeCode, 1001, 'server shutdown closes sockets with 1001');
    await server.start();
    const order = sampleOrder({ customerName: 'made right after restart' });
    await api.upsert([order]);
    for (const c of [a, b]) {
      await waitUntil(() => c.client.orders.has(order.id), { message: 'the change after restart', timeoutMs: 15000 });
      await c.client.waitForState('live');
      assert.equal(seqOf(c.sockets.at(-1).url) !== null, true);
      assert.ok(Number(seqOf(c.sockets.at(-1).url)) >= seqBefore);
    }
  });

  test('bob\'s client never sees alice\'s orders or events', async () => {
    const bob = await liveClient({ user: 'bob', deviceId: 'dev-bob' });
    const alice = await liveClient({ deviceId: 'dev-alice-x' });
    const order = sampleOrder();
    await api.upsert([order]);
    await waitUntil(() => alice.client.orders.has(order.id), { message: 'alice to see her order' });
    const mine = sampleOrder({ customerName: 'bob\'s own' });
    const [res] = await bob.client.saveOrders([mine]);
    assert.equal(res.action, 'created');
    // bob's own event comes after alice's in time: once bob is past it, a leak would have shown
    const bobHead = (await Api.login(server.baseUrl, 'bob', 'bob-e2e-pass').then((b) => b.list())).seq;
    await waitUntil(() => bob.client.lastSeq >= bobHead, { message: 'bob to reach his head seq' });
    assert.ok(!bob.client.orders.has(order.id));
    assert.deepEqual([...bob.client.orders.keys()], [mine.id]);
    assert.ok(!bob.frames.some((f) => JSON.stringify(f.payload).includes(order.id)), 'bob got an event about alice\'s order');
  });

  test('close 1008 (bad token on the socket) → signed-out, never retried', async () => {
    const c = track(makeClient(server.baseUrl, { deviceId: 'dev-1008', reconnect: { initialMs: 50, maxMs: 100 } }));
    await c.client.login('alice', 'alice-e2e-pass');
    await c.client.loadOrders();
    // revoke the token behind the client's back, then connect
    const r = await rawFetch(server.baseUrl, 'POST', '/api/auth/logout', undefined, c.client.token);
    assert.equal(r.status, 200);
    c.client.connect();
    await c.client.waitForState('signed-out', { timeoutMs: 5000 });
    assert.equal(c.sockets.length, 1);
    assert.equal(c.sockets[0].closeCode, 1008);
    assert.equal(c.client.token, null);
    // a retry would come after 50-100 ms: give it ten times that
    await new Promise((res) => setTimeout(res, 1000));
    assert.equal(c.sockets.length, 1, 'retried after 1008');
    assert.ok(c.errors.some((e) => e.code === 'AUTH_FAILED'));
  });

  test('close 4001 (token revoked while connected) → signed-out, never retried', async () => {
    const c = await liveClient({ deviceId: 'dev-4001', reconnect: { initialMs: 50, maxMs: 100 } });
    const r = await rawFetch(server.baseUrl, 'POST', '/api/auth/logout', undefined, c.client.token);
    assert.equal(r.status, 200);
    await c.client.waitForState('signed-out', { timeoutMs: 5000 });
    assert.equal(c.sockets[0].closeCode, 4001);
    await new Promise((res) => setTimeout(res, 1000));
    assert.equal(c.sockets.length, 1, 'retried after 4001');
  });

  test('text ping keepalive is answered with pong', async () => {
    const c = await liveClient({ deviceId: 'dev-ping', pingIntervalMs: 150 });
    await waitUntil(() => c.sockets[0].received.includes('pong'), { message: 'a pong', timeoutMs: 3000 });
    assert.ok(c.sockets[0].sent.includes('ping'));
    assert.equal(c.client.state, 'live');
  });

  test('a stale baseVersion is a conflict that refreshes the map from `current`', async () => {
    const c = await liveClient({ deviceId: 'dev-conflict' });
    const order = sampleOrder();
    await c.client.saveOrder(order);
    await api.upsert([{ ...order, customerName: 'changed elsewhere' }]); // version 2
    const r = await c.client.saveOrder({ ...order, customerName: 'mine' }, { baseVersion: 1 });
    assert.equal(r.action, 'conflict');
    assert.equal(r.current.version, 2);
    assert.equal(c.client.orders.get(order.id).customerName, 'changed elsewhere');
    await assert.rejects(c.client.deleteOrder(order.id, { baseVersion: 1 }), (e) => {
      assert.equal(e.status, 409);
      assert.equal(e.current && e.current.version, 2);
      return true;
    });
    assert.ok(c.client.orders.has(order.id), 'a refused delete keeps the order');
    const after_ = (await api.list()).orders.find((o) => o.id === order.id);
    assert.equal(after_.customerName, 'changed elsewhere');
  });

  test('API errors carry the envelope\'s error, code and details', async () => {
    const c = await liveClient({ deviceId: 'dev-errors' });
    await assert.rejects(c.client.saveOrder({ ...sampleOrder(), items: [{ articleCode: 'X', quantity: 0, price: 1, vat: 22 }] }), (e) => {
      assert.equal(e.name, 'OrderSyncError');
      assert.equal(e.status, 400);
      assert.ok(e.message && e.message !== 'HTTP 400', `message from the envelope: ${e.message}`);
      assert.ok(e.code);
      assert.ok(Array.isArray(e.details) && e.details.some((d) => /items\[0\]\.quantity/.test(d.path)), JSON.stringify(e.details));
      return true;
    });
    const bad = track(makeClient(server.baseUrl));
    await assert.rejects(bad.client.login('alice', 'wrong'), (e) => e.status === 401 && e.message.length > 0);
  });
});

describe('ordersync.js against a scripted server', () => {
  let fake;
  before(async () => { fake = await new FakeServer().start(); });
  after(async () => { await fake.stop(); });

  test('RESYNC_REQUIRED reloads the whole list, then continues live', async () => {
    const { client, requests, frames } = makeClient(fake.baseUrl, { deviceId: 'dev-resync' });
    await client.login('alice', 'alice-demo');
    client.connect();
    await client.waitForState('live');
    client.disconnect();
    const uid = '1';
    const s = fake.stream(uid);
    const now = Date.now();
    for (const id of ['r1', 'r2']) {
      s.orders.set(id, { id, customerId: 'C', customerName: id, deviceId: 'x', status: 'pending', items: [], isLocked: false, version: 1, createdAt: now, updatedAt: now });
      fake.append(uid, 'PENDING_CREATED', { orderIds: [id], count: 1, deviceId: 'x' });
    }
    fake.prune(uid, s.seq); // the client's since is now older than retention
    const lists = fullLists(requests).length;
    client.connect();
    await waitUntil(() => client.orders.has('r1') && client.orders.has('r2'), { message: 'resync' });
    assert.equal(fullLists(requests).length, lists + 1, 'one full reload');
    assert.ok(frames.some((f) => f.type === 'RESYNC_REQUIRED'));
    assert.equal(client.lastSeq, s.seq);
    // and it keeps going live afterwards
    s.orders.set('r3', { id: 'r3', customerId: 'C', customerName: 'r3', deviceId: 'x', status: 'pending', items: [], isLocked: false, version: 1, createdAt: now, updatedAt: now });
    fake.append(uid, 'PENDING_CREATED', { orderIds: ['r3'], count: 1, deviceId: 'x' });
    await waitUntil(() => client.orders.has('r3'), { message: 'live after resync' });
    client.close();
  });

  test('a server whose log is behind lastSeq (new database) triggers a full reload', async () => {
    const { client, requests } = makeClient(fake.baseUrl, { deviceId: 'dev-behind' });
    await client.login('bob', 'bob-demo');
    await client.loadOrders();
    client.lastSeq = 999; // as if the previous server had a longer log
    const lists = fullLists(requests).length;
    client.connect();
    await client.waitForState('live');
    await waitUntil(() => fullLists(requests).length === lists + 1 && client.lastSeq === fake.stream('2').seq, { message: 'reload to the new head' });
    client.close();
  });
});

describe('pure helpers', () => {
  test('backoff: 1 s doubling to 30 s, with bounded jitter', () => {
    const mid = [0, 1, 2, 3, 4, 5, 6, 10, 50].map((a) => backoffDelay(a, { random: () => 0.5 }));
    assert.deepEqual(mid, [1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000, 30000]);
    for (let a = 0; a < 8; a++) {
      const base = Math.min(30000, 1000 * 2 ** a);
      const lo = backoffDelay(a, { random: () => 0 });
      const hi = backoffDelay(a, { random: () => 0.999999 });
      assert.ok(lo >= base * 0.8 - 1 && lo < base, `attempt ${a}: low ${lo}`);
      assert.ok(hi <= Math.min(30000, base * 1.2 + 1) && hi >= Math.min(base, 30000) - 1, `attempt ${a}: high ${hi}`);
    }
  });

  test('orderTotal: VAT per line, then the discount', () => {
    const o = { items: [{ quantity: 2, price: 10, vat: 22 }, { quantity: 1, price: 5.5, vat: 10 }], discountPercent: 10 };
    assert.equal(orderTotal(o).toFixed(4), ((24.4 + 6.05) * 0.9).toFixed(4));
    assert.equal(orderTotal({ items: [] }), 0);
  });

  test('deviceId is stable per storage and generated once', () => {
    const storage = new MemoryStorage();
    const a = new OrderSyncClient({ baseUrl: 'http://127.0.0.1:1', storage });
    const b = new OrderSyncClient({ baseUrl: 'http://127.0.0.1:1', storage });
    assert.ok(a.deviceId.length >= 16);
    assert.equal(a.deviceId, b.deviceId);
    assert.equal(storage.getItem('ordersync.deviceId'), a.deviceId);
    assert.equal(a.state, 'signed-out');
  });
});

// Type declarations for ordersync.js — the browser/Node client of an ordersync server.
// Wire contract: DESIGN.md §4 (REST) and §5 (WebSocket).

/** One line of an order. Unknown item fields are stored verbatim by the server. */
export interface OrderItem {
  articleCode: string;
  /** > 0 */
  quantity: number;
  /** >= 0 */
  price: number;
  /** VAT percent, 0..=100 */
  vat: number;
  description?: string;
  [extra: string]: unknown;
}

export type OrderStatus = 'pending' | 'syncing' | 'error' | 'completed-warehouse';

/** An order as the server returns it. Times are epoch milliseconds. */
export interface Order {
  id: string;
  customerId: string;
  customerName: string;
  deviceId: string;
  status: OrderStatus;
  items: OrderItem[];
  discountPercent?: number | null;
  targetTotalWithVat?: number | null;
  shippingCost?: number | null;
  shippingTax?: number | null;
  noShipping?: boolean | null;
  notes?: string | null;
  originDraftId?: string | null;
  subClientCodice?: string | null;
  subClientName?: string | null;
  subClientData?: unknown;
  deliveryAddressId?: string | null;
  idempotencyKey?: string | null;
  isLocked: boolean;
  version: number;
  createdAt: number;
  updatedAt: number;
}

/**
 * What saveOrder() sends. `id` is generated (UUID) when missing and `deviceId` is
 * always this client's. Server-managed fields (version, isLocked, createdAt,
 * updatedAt) are stripped, so an Order from `client.orders` can be edited and saved.
 * Any other unknown top-level field is rejected by the server with a 400.
 */
export interface OrderInput {
  id?: string;
  customerId: string;
  customerName: string;
  status?: OrderStatus;
  items: OrderItem[];
  discountPercent?: number | null;
  targetTotalWithVat?: number | null;
  shippingCost?: number | null;
  shippingTax?: number | null;
  noShipping?: boolean | null;
  notes?: string | null;
  originDraftId?: string | null;
  subClientCodice?: string | null;
  subClientName?: string | null;
  subClientData?: unknown;
  deliveryAddressId?: string | null;
  idempotencyKey?: string | null;
  /** Optimistic concurrency: write only if the stored version is still this one. */
  baseVersion?: number;
  version?: number;
  isLocked?: boolean;
  createdAt?: number;
  updatedAt?: number;
}

export interface SaveResult {
  id: string;
  action: 'created' | 'updated' | 'unchanged' | 'conflict';
  version: number;
  serverUpdatedAt: number;
  /** On 'conflict': the server's order, or null if it was deleted. */
  current?: Order | null;
}

export interface LockResult {
  success: true;
  id: string;
  isLocked: boolean;
  version: number;
  seq: number;
}

export interface LoginResult {
  success: true;
  token: string;
  user: User;
  expiresAt: number | string | null;
}

export interface User {
  id: string;
  username: string;
}

export type ConnectionState = 'connecting' | 'live' | 'reconnecting' | 'offline' | 'signed-out';

/** A WebSocket frame as the server sends it. */
export type Frame =
  | { type: 'CONNECTED'; payload: { userId: string; deviceId: string | null; headSeq: number; resumed: boolean }; timestamp: string; seq?: undefined }
  | { type: 'PENDING_CREATED' | 'PENDING_UPDATED'; payload: { orderIds: string[]; count: number; deviceId: string | null }; timestamp: string; seq: number }
  | { type: 'PENDING_DELETED'; payload: { orderId: string; deviceId: string | null }; timestamp: string; seq: number }
  | { type: 'RESYNC_REQUIRED'; payload: { headSeq: number; reason: string }; timestamp: string; seq?: undefined };

export interface OrdersChange {
  /** 'load' (list read), 'resync', 'event' (applied frames), 'write' (own REST reply), 'signed-out'. */
  reason: 'load' | 'resync' | 'event' | 'write' | 'signed-out';
  /** Ids touched, or null when the whole map was replaced. */
  ids: string[] | null;
}

export interface EventMap {
  /** The order map changed. */
  orders: (orders: Map<string, Order>, change: OrdersChange) => void;
  state: (state: ConnectionState, previous: ConnectionState) => void;
  /** `lastSeq` moved (also for echoes, which do not change the map). */
  seq: (lastSeq: number | null) => void;
  /** Every JSON frame as received; `echo` means payload.deviceId is this device's. */
  event: (frame: Frame, meta: { echo: boolean }) => void;
  error: (error: OrderSyncError | Error) => void;
}

/** Minimal Storage (window.localStorage fits). */
export interface StorageLike {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
  removeItem(key: string): void;
}

export interface ReconnectOptions {
  /** First delay, default 1000 ms; doubles per attempt. */
  initialMs?: number;
  /** Cap, default 30000 ms. */
  maxMs?: number;
  /** ± fraction of the delay, default 0.2. */
  jitter?: number;
  /** Random source in [0, 1), default Math.random. */
  random?: () => number;
}

export interface OrderSyncClientOptions {
  /** Server origin (optionally with a path prefix). Default: location.origin. */
  baseUrl?: string;
  /** Where token, user and deviceId live. Default: localStorage, else in memory. */
  storage?: StorageLike;
  /** Default globalThis.WebSocket. In Node 20 pass `WebSocket` from the `ws` package. */
  WebSocketImpl?: { new (url: string): WebSocket } | any;
  /** Default globalThis.fetch. */
  fetchImpl?: typeof fetch;
  /** Override the stored device id (storage key `ordersync.deviceId`). */
  deviceId?: string;
  /** Use an existing token (e.g. from `ordersync token create`). */
  token?: string;
  /** Label sent with login, shown in `ordersync token list`. Default 'ordersync.js'. */
  label?: string;
  reconnect?: ReconnectOptions;
  /** Text `ping` keepalive interval, default 25000 ms; 0 disables. */
  pingIntervalMs?: number;
}

/** An API failure (`error`, `code`, `details` from the envelope) or a network failure (status 0). */
export class OrderSyncError extends Error {
  readonly name: 'OrderSyncError';
  /** HTTP status; 0 for network errors. */
  readonly status: number;
  /** The API's machine code, e.g. 'VALIDATION_ERROR', or 'NETWORK_ERROR'. */
  readonly code: string;
  readonly details?: Array<{ path: string; message: string }>;
  /** On 409 conflicts: the server's current order. */
  readonly current?: Order | null;
  /** The parsed error body, if any. */
  readonly body?: unknown;
}

export class MemoryStorage implements StorageLike {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
  removeItem(key: string): void;
}

/** Reconnect delay for a 0-based attempt: 1 s doubling to 30 s, with jitter. */
export function backoffDelay(attempt: number, options?: ReconnectOptions): number;

/** Σ quantity·price·(1 + vat/100), less discountPercent. */
export function orderTotal(order: { items?: Array<Pick<OrderItem, 'quantity' | 'price' | 'vat'>>; discountPercent?: number | null }): number;

export class OrderSyncClient {
  constructor(options?: OrderSyncClientOptions);

  readonly baseUrl: string;
  /** Stable per browser (localStorage key `ordersync.deviceId`). */
  readonly deviceId: string;
  /** id → Order, kept in sync with the server. Do not mutate. */
  readonly orders: Map<string, Order>;
  /** The last event seq reflected in `orders`; null before the first load. */
  readonly lastSeq: number | null;
  readonly state: ConnectionState;
  readonly token: string | null;
  readonly user: User | null;

  /** POST /api/auth/login; stores the token. Rejects with OrderSyncError (401, 429…). */
  login(username: string, password: string): Promise<LoginResult>;
  /** Revokes the token (best effort), forgets it, closes the socket: state 'signed-out'. */
  logout(): Promise<void>;

  /** GET /api/pending-orders: replaces `orders`, remembers `seq`. */
  loadOrders(): Promise<Map<string, Order>>;
  /** Orders, newest `updatedAt` first. */
  list(): Order[];
  /** POST a batch of one; the map is updated from the reply (conflicts from `current`). */
  saveOrder(order: OrderInput, options?: { baseVersion?: number }): Promise<SaveResult>;
  /** POST a batch. `baseVersion` option applies only to a batch of one; else set it per order. */
  saveOrders(orders: OrderInput[], options?: { baseVersion?: number }): Promise<SaveResult[]>;
  /** DELETE; 404 and 409 reject with OrderSyncError (409 carries `current`). */
  deleteOrder(id: string, options?: { baseVersion?: number }): Promise<{ success: true; seq: number }>;
  /** PATCH …/lock. */
  setLocked(id: string, locked: boolean): Promise<LockResult>;

  /** Open the realtime socket (loading the list first if needed) and keep it open. */
  connect(): void;
  /** Close the socket; state 'offline' until connect(). lastSeq is kept for resume. */
  disconnect(): void;
  /** disconnect() and remove global listeners. */
  close(): void;
  /** Resolves when `state` becomes the given one. */
  waitForState(state: ConnectionState, options?: { timeoutMs?: number }): Promise<void>;

  /** Subscribe; returns an unsubscribe function. */
  on<K extends keyof EventMap>(name: K, cb: EventMap[K]): () => void;
  off<K extends keyof EventMap>(name: K, cb: EventMap[K]): void;
}

export default OrderSyncClient;

// The API client: the envelope, the session, and silent token refresh.
//
// Where the tokens live (docs/security-dashboard.md says why): the access token in this
// module's memory only, never in storage; the refresh token and the user in IndexedDB,
// shared by this site's tabs, so a reload or a new tab signs in by refreshing. The API
// rotates the refresh token on every refresh and revokes the whole session when a rotated
// one is presented again, so refreshes are serialized across tabs by a Web Lock and read
// the refresh token from storage inside it: a tab that waited presents the token the tab
// before it stored. (IndexedDB, not localStorage: a tab can read a stale copy of
// localStorage for some milliseconds after another tab wrote it, which is enough to
// present a rotated token; an IndexedDB read after a committed write sees it.)

const DB_NAME = 'maof';
const STORE = 'session';
const KEY = 'current';
const LEGACY_KEY = 'maof.session'; // localStorage, before IndexedDB (with the access token)
const FLASH_KEY = 'maof.flash';
// The address just registered, for the sign-in form that follows (read once, and forgotten
// when a session ends): the form after a sign-out or an expiry starts empty, so the next
// person at this browser does not find the last one's address in it.
const REGISTERED_EMAIL_KEY = 'maof.lastEmail';
// The New workflow page's draft (its definition and input, which may be private) is its
// user's: kept under their id, shown to no one else, forgotten when they sign out. One
// saved before drafts had owners could be anyone's: it goes.
const DRAFT_PREFIX = 'maof.draft.';
localStorage.removeItem('maof.draft');
const REFRESH_LOCK = 'maof-refresh';
const CHANNEL = 'maof-session';

let accessToken = null; // this tab's, in memory only
let current = null; // this tab's view of the stored session: {refreshToken, user} or null
let knownRefreshToken = null; // the refresh token this tab last presented or was given
let opened = null;
// One channel object for sending and receiving: it does not hear its own messages.
const channel = typeof BroadcastChannel === 'function' ? new BroadcastChannel(CHANNEL) : null;

export class ApiError extends Error {
  constructor({ status = 0, code = 'ERROR', message = 'Something went wrong', details = null, requestId = null }) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = Array.isArray(details) ? details : null;
    this.requestId = requestId;
  }

  static fromResponse(response, payload) {
    const error = (payload && payload.error) || {};
    return new ApiError({
      status: response.status,
      code: error.code || `HTTP_${response.status}`,
      message: error.message || `The API answered ${response.status} ${response.statusText}`.trim(),
      details: error.details,
      requestId: error.requestId || response.headers.get('X-Request-Id'),
    });
  }
}

function sessionExpired() {
  return new ApiError({ status: 401, code: 'SESSION_EXPIRED', message: 'Your session has expired. Please sign in again.' });
}

/** Run `task` holding the cross-tab refresh lock (without Web Locks: in this tab alone). */
function withRefreshLock(task) {
  if (navigator.locks && typeof navigator.locks.request === 'function') {
    return navigator.locks.request(REFRESH_LOCK, task);
  }
  return task();
}

function database() {
  opened ||= new Promise((resolve, reject) => {
    const request = indexedDB.open(DB_NAME, 1);
    request.onupgradeneeded = () => request.result.createObjectStore(STORE);
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
  return opened;
}

/** One IndexedDB transaction on the session store; resolves when it has committed. */
async function transact(mode, operation) {
  const db = await database();
  return new Promise((resolve, reject) => {
    const transaction = db.transaction(STORE, mode);
    const request = operation(transaction.objectStore(STORE));
    transaction.oncomplete = () => resolve(request.result);
    transaction.onerror = () => reject(transaction.error);
    transaction.onabort = () => reject(transaction.error);
  });
}

async function readStored() {
  const value = await transact('readonly', (store) => store.get(KEY));
  return value && typeof value.refreshToken === 'string' && value.refreshToken
    ? { refreshToken: value.refreshToken, user: value.user || null }
    : null;
}

async function writeStored(value) {
  await transact('readwrite', (store) => (value ? store.put(value, KEY) : store.delete(KEY)));
  current = value;
  if (value) knownRefreshToken = value.refreshToken;
}

/** Tell the other tabs that someone signed in or out here. */
function announce() {
  channel?.postMessage('changed');
}

function userOf(value) {
  return value?.user?.userUuid || null;
}

export const session = {
  /** Read the stored session (once, at start-up). A session kept in localStorage by an
   * earlier version moves here, without its access token. */
  async restore() {
    const legacy = localStorage.getItem(LEGACY_KEY);
    if (legacy !== null) {
      localStorage.removeItem(LEGACY_KEY);
      try {
        const { refreshToken, user } = JSON.parse(legacy);
        if (typeof refreshToken === 'string' && refreshToken && !(await readStored())) {
          await writeStored({ refreshToken, user: user || null });
        }
      } catch {
        // unreadable: signed out
      }
    }
    current = await readStored();
    return current;
  },
  /** This tab's session, `{refreshToken, user}`, or null when signed out. */
  load() {
    return current;
  },
  /** Signed in: the refresh token and the user are stored, the access token kept in memory. */
  async start({ accessToken: access, refreshToken, user }) {
    await withRefreshLock(() => writeStored({ refreshToken, user: user || null }));
    accessToken = access;
    announce();
  },
  /** Forget the session in this tab and in storage. */
  async clear() {
    accessToken = null;
    sessionStorage.removeItem(REGISTERED_EMAIL_KEY);
    await writeStored(null);
    announce();
  },
};

/** The signed-in user's draft of a new workflow (`{definition, input}`, strings), or null. */
export const drafts = {
  load() {
    const key = draftKey(current);
    try {
      const draft = key && JSON.parse(localStorage.getItem(key) || 'null');
      if (draft && typeof draft.definition === 'string' && typeof draft.input === 'string') return draft;
    } catch {
      /* a broken draft is no draft */
    }
    return null;
  },
  save(draft) {
    const key = draftKey(current);
    if (key) localStorage.setItem(key, JSON.stringify({ definition: draft.definition, input: draft.input }));
  },
};

function draftKey(stored) {
  const user = userOf(stored);
  return user ? DRAFT_PREFIX + user : null;
}

/** Call `onChange(stored)` when another tab signs out, or in as someone else. */
export function watchSession(onChange) {
  if (!channel) return;
  channel.onmessage = async () => {
    const stored = await readStored();
    const changed = Boolean(stored) !== Boolean(current) || userOf(stored) !== userOf(current);
    current = stored;
    if (changed) {
      accessToken = null;
      onChange(stored);
    }
  };
}

/** A one-time message for the next page (e.g. "your session expired"). */
export function setFlash(message, kind = 'info', extra = {}) {
  sessionStorage.setItem(FLASH_KEY, JSON.stringify({ message, kind, ...extra }));
}

/** Keep the address just registered for the sign-in form that comes next (this tab). */
export function setRegisteredEmail(email) {
  sessionStorage.setItem(REGISTERED_EMAIL_KEY, email);
}

/** The address just registered, or ''; read once, like the flash. */
export function takeRegisteredEmail() {
  const email = sessionStorage.getItem(REGISTERED_EMAIL_KEY) || '';
  sessionStorage.removeItem(REGISTERED_EMAIL_KEY);
  return email;
}

export function takeFlash() {
  const raw = sessionStorage.getItem(FLASH_KEY);
  sessionStorage.removeItem(FLASH_KEY);
  try {
    return raw ? JSON.parse(raw) : null;
  } catch {
    return null;
  }
}

export class Api {
  constructor(baseUrl, { onSessionExpired } = {}) {
    this.baseUrl = baseUrl.replace(/\/+$/, '');
    this.onSessionExpired = onSessionExpired || (() => {});
    this.refreshing = null;
  }

  get(path, query) {
    return this.request('GET', path, { query });
  }

  post(path, body, options = {}) {
    return this.request('POST', path, { ...options, body });
  }

  delete(path) {
    return this.request('DELETE', path);
  }

  url(path, query) {
    const url = new URL(this.baseUrl + path);
    for (const [key, value] of Object.entries(query || {})) {
      if (value !== null && value !== undefined && value !== '') url.searchParams.set(key, String(value));
    }
    return url.toString();
  }

  async send(method, url, body, token, extraHeaders) {
    const headers = { ...extraHeaders, Accept: 'application/json' };
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    if (token) headers.Authorization = `Bearer ${token}`;
    let response;
    try {
      response = await fetch(url, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch {
      throw new ApiError({
        code: 'NETWORK_ERROR',
        message: `Cannot reach the API at ${this.baseUrl}. Is it running?`,
      });
    }
    let payload = null;
    try {
      payload = await response.json();
    } catch {
      payload = null;
    }
    return { response, payload };
  }

  /** Call the API (a first call in this tab refreshes to get an access token); on a 401
   * refresh once and retry; returns the envelope's data. `headers` are sent as well (e.g.
   * an Idempotency-Key). */
  async request(method, path, { body, query, auth = true, headers } = {}) {
    const url = this.url(path, query);
    let token = null;
    if (auth) {
      token = accessToken || ((await this.refresh(null)) ? accessToken : null);
      if (!token) throw await this.sessionEnded();
    }
    let { response, payload } = await this.send(method, url, body, token, headers);
    if (auth && response.status === 401) {
      const renewed = (await this.refresh(token)) ? accessToken : null;
      if (renewed) ({ response, payload } = await this.send(method, url, body, renewed, headers));
      if (!renewed || response.status === 401) throw await this.sessionEnded();
    }
    if (!response.ok || !payload || payload.success !== true) {
      throw ApiError.fromResponse(response, payload);
    }
    return payload.data;
  }

  /** A new access token; true when there is one, false when the session is over.
   * `refused` is the access token the API just refused (null: this tab has none yet). One
   * refresh at a time in this tab, and across tabs under the Web Lock. */
  refresh(refused) {
    if (accessToken && accessToken !== refused) return Promise.resolve(true); // renewed meanwhile
    if (!this.refreshing) {
      this.refreshing = withRefreshLock(() => this.refreshInLock()).finally(() => {
        this.refreshing = null;
      });
    }
    return this.refreshing;
  }

  async refreshInLock() {
    // Read now, inside the lock: another tab may have rotated the token while this one waited.
    const stored = await readStored();
    current = stored;
    if (!stored) return false;
    knownRefreshToken = stored.refreshToken;
    const { response, payload } = await this.send('POST', this.url('/auth/refresh'), {
      refreshToken: stored.refreshToken,
    });
    if (response.status === 400 || response.status === 401) return false;
    if (!response.ok || !payload || payload.success !== true) throw ApiError.fromResponse(response, payload);
    const { accessToken: access, refreshToken, user } = payload.data;
    await writeStored({ refreshToken, user: user || stored.user });
    accessToken = access;
    return true;
  }

  /** The session is over: forget it, with a message for the sign-in page. A session
   * another tab signed in since this one's was refused is kept. */
  async expire() {
    accessToken = null;
    const stored = await readStored();
    current = stored;
    if (stored && stored.refreshToken === knownRefreshToken) {
      await session.clear();
      setFlash('Your session has expired. Please sign in again.', 'warning');
    }
  }

  /** A call found the session over: expire it and go to sign in. */
  async sessionEnded() {
    await this.expire();
    this.onSessionExpired();
    return sessionExpired();
  }

  /** Sign out: forget the session here and in every tab, then revoke it at the API. The
   * local state goes first, so signing out never waits for (or needs) the API; a failed
   * revocation is ignored (the refresh token still expires on its own). */
  async signOut() {
    const ended = await withRefreshLock(async () => {
      const stored = await readStored();
      await session.clear();
      return stored;
    });
    if (!ended) return;
    const draft = draftKey(ended);
    if (draft) localStorage.removeItem(draft);
    this.send('POST', this.url('/auth/logout'), { refreshToken: ended.refreshToken }).catch(() => {});
  }
}

/** Read config.json, written next to index.html when the site is deployed. */
export async function loadConfig() {
  let response;
  try {
    response = await fetch('config.json', { cache: 'no-store' });
  } catch {
    throw new Error('config.json could not be fetched.');
  }
  if (!response.ok) {
    throw new Error(`config.json is missing (HTTP ${response.status}). Deploying the site writes it.`);
  }
  let config;
  try {
    config = await response.json();
  } catch {
    throw new Error('config.json is not valid JSON.');
  }
  if (!config || typeof config.apiUrl !== 'string' || !/^https?:\/\//.test(config.apiUrl)) {
    throw new Error('config.json must be {"apiUrl": "http(s)://…"}.');
  }
  return config;
}

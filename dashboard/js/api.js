// The API client: the envelope, the session, and silent token refresh.

const SESSION_KEY = 'maof.session';
const FLASH_KEY = 'maof.flash';

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

export const session = {
  load() {
    try {
      const value = JSON.parse(localStorage.getItem(SESSION_KEY) || 'null');
      return value && value.accessToken ? value : null;
    } catch {
      return null;
    }
  },
  save(value) {
    localStorage.setItem(SESSION_KEY, JSON.stringify(value));
  },
  clear() {
    localStorage.removeItem(SESSION_KEY);
  },
};

/** A one-time message for the next page (e.g. "your session expired"). */
export function setFlash(message, kind = 'info', extra = {}) {
  sessionStorage.setItem(FLASH_KEY, JSON.stringify({ message, kind, ...extra }));
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

  async send(method, url, body, token) {
    const headers = { Accept: 'application/json' };
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

  /** Call the API; on a 401 refresh the tokens once and retry; returns the envelope's data. */
  async request(method, path, { body, query, auth = true } = {}) {
    const url = this.url(path, query);
    const token = auth ? session.load()?.accessToken : null;
    let { response, payload } = await this.send(method, url, body, token);
    if (auth && response.status === 401) {
      if (await this.refresh()) {
        ({ response, payload } = await this.send(method, url, body, session.load()?.accessToken));
      }
      if (response.status === 401) {
        this.expire();
        throw new ApiError({
          status: 401,
          code: 'SESSION_EXPIRED',
          message: 'Your session has expired. Please sign in again.',
        });
      }
    }
    if (!response.ok || !payload || payload.success !== true) {
      throw ApiError.fromResponse(response, payload);
    }
    return payload.data;
  }

  /** New tokens from the refresh token; concurrent callers share one refresh. */
  refresh() {
    if (!this.refreshing) {
      this.refreshing = this.refreshOnce().finally(() => {
        this.refreshing = null;
      });
    }
    return this.refreshing;
  }

  async refreshOnce() {
    const current = session.load();
    if (!current || !current.refreshToken) return false;
    const { response, payload } = await this.send('POST', this.url('/auth/refresh'), {
      refreshToken: current.refreshToken,
    });
    if (!response.ok || !payload || !payload.success) return false;
    session.save({ ...current, ...payload.data });
    return true;
  }

  expire() {
    if (!session.load()) return;
    session.clear();
    setFlash('Your session has expired. Please sign in again.', 'warning');
    this.onSessionExpired();
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

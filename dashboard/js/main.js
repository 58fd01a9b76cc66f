// Boot: read config.json, then route `#/…` to pages inside the signed-in shell.
import { Api, loadConfig, session, setFlash, watchSession } from './api.js';
import { h, replace } from './dom.js';
import { emptyState } from './components.js';
import { icon, logo } from './icons.js';
import { loginPage, registerPage } from './pages/auth.js';
import { overviewPage } from './pages/overview.js';
import { agentsPage } from './pages/agents.js';
import { workflowsPage } from './pages/workflows.js';
import { runPage } from './pages/run.js';
import { newWorkflowPage } from './pages/new-workflow.js';

const ROUTES = [
  { pattern: /^\/login$/, page: loginPage, public: true, title: 'Sign in' },
  { pattern: /^\/register$/, page: registerPage, public: true, title: 'Create an account' },
  { pattern: /^\/$/, page: overviewPage, nav: 'overview', title: 'Overview' },
  { pattern: /^\/agents$/, page: agentsPage, nav: 'agents', title: 'Agents' },
  { pattern: /^\/workflows$/, page: workflowsPage, nav: 'workflows', title: 'Workflows' },
  { pattern: /^\/workflows\/new$/, page: newWorkflowPage, nav: 'new', title: 'New workflow' },
  { pattern: /^\/runs\/([^/]+)$/, page: runPage, nav: 'workflows', title: 'Run' },
];

const NAV = [
  { key: 'overview', href: '#/', label: 'Overview', icon: 'overview' },
  { key: 'agents', href: '#/agents', label: 'Agents', icon: 'agents' },
  { key: 'workflows', href: '#/workflows', label: 'Workflows', icon: 'workflows' },
  { key: 'new', href: '#/workflows/new', label: 'New workflow', icon: 'plus' },
];

const app = document.getElementById('app');
let current = null; // {controller, cleanups}
let shell = null;

export function navigate(hash, { replace: replaceEntry = false } = {}) {
  const target = hash.startsWith('#') ? hash : `#${hash}`;
  if (location.hash === target) {
    route();
  } else if (replaceEntry) {
    history.replaceState(null, '', target);
    route();
  } else {
    location.hash = target;
  }
}

function parseHash() {
  const raw = location.hash.replace(/^#/, '') || '/';
  const [path, search = ''] = raw.split('?');
  return { path: path || '/', query: Object.fromEntries(new URLSearchParams(search)) };
}

async function signOut() {
  await window.maofApi.signOut();
  setFlash('You have signed out.', 'info');
  navigate('#/login');
}

function buildShell() {
  const user = session.load()?.user || {};
  const nav = h(
    'nav',
    { class: 'nav', id: 'main-nav', 'aria-label': 'Main' },
    NAV.map((item) =>
      h('a', { class: 'nav__link', href: item.href, 'data-nav': item.key }, icon(item.icon), h('span', null, item.label)),
    ),
  );
  const toggle = h(
    'button',
    {
      class: 'nav-toggle btn btn--ghost',
      type: 'button',
      'aria-expanded': 'false',
      'aria-controls': 'main-nav',
      onClick: () => {
        const open = toggle.getAttribute('aria-expanded') !== 'true';
        toggle.setAttribute('aria-expanded', String(open));
        element.classList.toggle('shell--nav-open', open);
      },
    },
    icon('menu'),
    h('span', { class: 'sr-only' }, 'Menu'),
  );
  const main = h('main', { class: 'main', id: 'main', tabindex: '-1' });
  const userName = h('span', { class: 'user__name', 'data-testid': 'user-name' }, user.name || user.email || 'Signed in');
  const element = h(
    'div',
    { class: 'shell' },
    h('a', { class: 'skip-link', href: '#main', onClick: (e) => { e.preventDefault(); main.focus(); } }, 'Skip to content'),
    h(
      'aside',
      { class: 'sidebar' },
      h('div', { class: 'sidebar__top' }, h('a', { class: 'brand', href: '#/' }, logo(30), h('span', { class: 'brand__text' }, h('strong', null, 'MAOF'), h('small', null, 'Agent orchestration'))), toggle),
      nav,
      h(
        'div',
        { class: 'sidebar__foot' },
        h('div', { class: 'user' }, h('span', { class: 'user__avatar', 'aria-hidden': 'true' }, (user.name || user.email || '?').trim().charAt(0).toUpperCase()), h('span', { class: 'user__text' }, userName, h('small', { class: 'user__email' }, user.email || ''))),
        h('button', { class: 'btn btn--ghost btn--block signout', type: 'button', onClick: signOut }, icon('logout'), 'Sign out'),
      ),
    ),
    main,
  );
  return { element, main, nav, toggle, userName };
}

async function route() {
  const api = window.maofApi;
  const { path, query } = parseHash();
  const match = ROUTES.map((r) => ({ r, m: path.match(r.pattern) })).find((x) => x.m);
  if (current) {
    current.controller.abort();
    current.cleanups.forEach((fn) => {
      try {
        fn();
      } catch (error) {
        console.error(error);
      }
    });
    current = null;
  }
  if (!match) {
    navigate(session.load() ? '#/' : '#/login', { replace: true });
    return;
  }
  const { r, m } = match;
  const signedIn = Boolean(session.load());
  if (!r.public && !signedIn) {
    sessionStorage.setItem('maof.returnTo', location.hash);
    navigate('#/login', { replace: true });
    return;
  }
  if (r.public && signedIn) {
    navigate('#/', { replace: true });
    return;
  }
  const controller = new AbortController();
  const cleanups = [];
  current = { controller, cleanups };
  document.title = `${r.title} · MAOF`;
  let root;
  if (r.public) {
    shell = null;
    root = app;
    replace(app);
  } else {
    if (!shell || !app.contains(shell.element)) {
      shell = buildShell();
      replace(app, shell.element);
    }
    const user = session.load()?.user;
    if (user) shell.userName.textContent = user.name || user.email;
    for (const link of shell.nav.querySelectorAll('.nav__link')) {
      const active = link.dataset.nav === r.nav;
      link.classList.toggle('is-active', active);
      if (active) link.setAttribute('aria-current', 'page');
      else link.removeAttribute('aria-current');
    }
    shell.toggle.setAttribute('aria-expanded', 'false');
    shell.element.classList.remove('shell--nav-open');
    root = shell.main;
    replace(root);
    window.scrollTo(0, 0);
  }
  let params;
  try {
    params = m.slice(1).map(decodeURIComponent);
  } catch {
    // A broken %-escape (a link cut short, say) names nothing this page could show.
    replace(root, emptyState({ title: 'Page not found', text: 'This link is malformed: it has a broken %-escape.', iconName: 'alert', action: h('a', { class: 'btn btn--secondary', href: '#/' }, 'Go to the overview') }));
    return;
  }
  const ctx = {
    api,
    root,
    query,
    params,
    signal: controller.signal,
    onCleanup: (fn) => cleanups.push(fn),
    navigate,
    get active() {
      return !controller.signal.aborted;
    },
  };
  try {
    await r.page(ctx);
  } catch (error) {
    if (error?.code === 'SESSION_EXPIRED' || controller.signal.aborted) return;
    console.error(error);
    replace(root, h('div', { class: 'state state--error', role: 'alert' }, h('h3', { class: 'state__title' }, 'Something went wrong'), h('p', null, error?.message || String(error))));
  }
}

function fatal(message) {
  replace(
    app,
    h(
      'div',
      { class: 'fatal', role: 'alert' },
      logo(44),
      h('h1', null, 'The dashboard cannot start'),
      h('p', null, message),
      h('p', { class: 'muted' }, 'Publish the site with `make dev` (or your deploy), which writes config.json next to index.html.'),
    ),
  );
}

/** Narrow the page's Content-Security-Policy to the one API it talks to. index.html's own
 * policy must admit any API config.json may name (loopback ports, https:); a policy added
 * later can only take away, so from here on the page reaches its own origin and that API. */
function pinConnectSrc(apiUrl) {
  const meta = document.createElement('meta');
  meta.httpEquiv = 'Content-Security-Policy';
  meta.content = `connect-src 'self' ${new URL(apiUrl).origin}`;
  document.head.append(meta);
}

async function boot() {
  let config;
  try {
    config = await loadConfig();
  } catch (error) {
    fatal(error.message);
    return;
  }
  pinConnectSrc(config.apiUrl);
  const api = new Api(config.apiUrl, { onSessionExpired: () => navigate('#/login') });
  window.maofApi = api;
  try {
    await session.restore();
  } catch {
    fatal('This browser keeps no IndexedDB for this site (a private window may not), so no one can stay signed in.');
    return;
  }
  if (session.load()) {
    // A reload or a new tab: the access token was in the last page's memory only. A refused
    // refresh token ends the session (and the route below goes to sign in).
    try {
      if (!(await api.refresh(null))) await api.expire();
    } catch {
      // The API cannot be reached (or failed): stay signed in; the pages say what is wrong.
    }
  }
  watchSession(() => {
    shell = null; // signed out, or in as someone else, in another tab
    route();
  });
  window.addEventListener('hashchange', route);
  route();
}

boot();

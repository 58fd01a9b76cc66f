// Overview: agents, online agents, runs, failure rate, runs over time, the latest runs.
import { session } from '../api.js';
import { h, s, replace } from '../dom.js';
import { icon } from '../icons.js';
import { badge, card, emptyState, errorState, loadingState, pageHeader } from '../components.js';
import { parseTime, percent, timeAgo } from '../format.js';

const REFRESH_MS = 10000;
const WINDOWS = {
  day: { label: '24 h', buckets: 24, size: 3600e3, describe: 'the last 24 hours' },
  fortnight: { label: '14 days', buckets: 14, size: 86400e3, describe: 'the last 14 days' },
};

async function loadStats(api) {
  const total = (query) => api.get('/workflows', { ...query, limit: 1 }).then((data) => data.meta.total);
  const [agents, online, recent, failed, completed, cancelled, running, queued] = await Promise.all([
    api.get('/agents', { limit: 1 }).then((data) => data.meta.total),
    api.get('/agents', { status: 'online', limit: 1 }).then((data) => data.meta.total),
    api.get('/workflows', { limit: 100 }),
    total({ status: 'failed' }),
    total({ status: 'completed' }),
    total({ status: 'cancelled' }),
    total({ status: 'in_progress' }),
    total({ status: 'queued' }),
  ]);
  const runs = [...recent.runs];
  // Enough history for the 14-day chart, within reason.
  const horizon = Date.now() - WINDOWS.fortnight.buckets * WINDOWS.fortnight.size;
  for (let page = 2; page <= Math.min(recent.meta.pages, 5); page++) {
    const oldest = parseTime(runs[runs.length - 1]?.createdAt);
    if (!oldest || oldest.getTime() < horizon) break;
    runs.push(...(await api.get('/workflows', { limit: 100, page })).runs);
  }
  return { agents, online, runs, totalRuns: recent.meta.total, failed, completed, cancelled, running: running + queued };
}

/** Failed of the runs that finished by themselves: a cancelled run did not fail. */
function failureSub(stats, finished) {
  const cancelled = stats.cancelled ? ` (${stats.cancelled} cancelled not counted)` : '';
  return finished ? `${stats.failed} failed of ${finished} finished${cancelled}` : `no finished runs yet${cancelled}`;
}

function statCard({ id, label, value, sub, iconName, tone }) {
  return h(
    'div',
    { class: ['stat', `stat--${tone}`], 'data-stat': id },
    h('div', { class: 'stat__icon' }, icon(iconName, { size: 20 })),
    h('div', { class: 'stat__label' }, label),
    h('div', { class: 'stat__value', 'data-testid': `stat-${id}` }, value),
    h('div', { class: 'stat__sub' }, sub),
  );
}

// The chart's buckets, oldest first: the last 24 clock hours, or the last 14 local calendar
// days (stepped by date, not by 24 h: a day across a daylight-saving change has 23 or 25).
export function bucketRuns(runs, windowKey, now = Date.now()) {
  const { buckets, size } = WINDOWS[windowKey];
  const edges = [];
  if (windowKey === 'day') {
    const end = Math.ceil(now / size) * size;
    for (let i = buckets; i >= 0; i--) edges.push(end - i * size);
  } else {
    const d = new Date(now);
    d.setHours(24, 0, 0, 0); // the coming local midnight
    for (let i = 0; i <= buckets; i++) {
      edges.unshift(d.getTime());
      d.setDate(d.getDate() - 1);
    }
  }
  const rows = edges.slice(0, -1).map((start) => ({ start, completed: 0, failed: 0, cancelled: 0, live: 0 }));
  const [start, end] = [edges[0], edges[edges.length - 1]];
  for (const run of runs) {
    const t = parseTime(run.createdAt)?.getTime();
    if (t === undefined || t < start || t >= end) continue;
    let index = rows.length - 1;
    while (edges[index] > t) index--;
    const row = rows[index];
    if (run.status === 'completed') row.completed++;
    else if (run.status === 'failed') row.failed++;
    else if (run.status === 'cancelled') row.cancelled++;
    else row.live++;
  }
  return rows;
}

function runsChart(runs, windowKey, available = 720) {
  const rows = bucketRuns(runs, windowKey);
  const width = Math.max(280, Math.round(available));
  const height = 220;
  const left = 34;
  const bottom = 26;
  const top = 10;
  const plotH = height - bottom - top;
  const plotW = width - left - 8;
  const count = (r) => r.completed + r.failed + r.cancelled + r.live;
  const max = Math.max(1, ...rows.map(count));
  const niceMax = max <= 4 ? max : Math.ceil(max / 4) * 4;
  const barGap = windowKey === 'day' ? 6 : 10;
  const barW = plotW / rows.length - barGap;
  const y = (v) => top + plotH - (v / niceMax) * plotH;
  const ticks = niceMax <= 4 ? Array.from({ length: niceMax + 1 }, (_, i) => i) : [0, 1, 2, 3, 4].map((i) => (i * niceMax) / 4);
  const label = (start) => {
    const d = new Date(start);
    return windowKey === 'day'
      ? `${String(d.getHours()).padStart(2, '0')}:00`
      : d.toLocaleDateString(undefined, { month: 'short', day: 'numeric' });
  };
  const every = Math.max(1, Math.ceil(rows.length / Math.floor(width / 62)));
  const total = rows.reduce((sum, r) => sum + count(r), 0);
  const sum = (kind) => rows.reduce((a, r) => a + r[kind], 0);
  const summary = `${total} run${total === 1 ? '' : 's'} in ${WINDOWS[windowKey].describe}: ${sum('completed')} completed, ${sum('failed')} failed, ${sum('cancelled')} cancelled, ${sum('live')} running.`;
  const svg = s(
    'svg',
    { class: 'chart', viewBox: `0 0 ${width} ${height}`, role: 'img', 'aria-label': summary, width, height },
    ticks.map((t) =>
      s('g', { class: 'chart__tick' }, s('line', { x1: left, x2: width - 4, y1: y(t), y2: y(t) }), s('text', { x: left - 8, y: y(t) + 4, 'text-anchor': 'end' }, String(Math.round(t)))),
    ),
    rows.map((row, i) => {
      const x = left + i * (barW + barGap) + barGap / 2;
      let base = 0;
      const segments = ['completed', 'failed', 'cancelled', 'live'].map((kind) => {
        const value = row[kind];
        if (!value) return null;
        const rect = s('rect', { class: `chart__bar chart__bar--${kind}`, x, width: Math.max(2, barW), y: y(base + value), height: Math.max(1, y(base) - y(base + value)), rx: 3 });
        base += value;
        return rect;
      });
      const runs = count(row);
      return s(
        'g',
        { class: 'chart__col' },
        s('title', null, `${label(row.start)} — ${runs} run${runs === 1 ? '' : 's'} (${row.completed} completed, ${row.failed} failed, ${row.cancelled} cancelled, ${row.live} running)`),
        s('rect', { class: 'chart__hit', x: x - barGap / 2, width: barW + barGap, y: top, height: plotH }),
        segments,
        (rows.length - 1 - i) % every === 0
          ? s('text', { class: 'chart__label', x: x + barW / 2, y: height - 8, 'text-anchor': 'middle' }, label(row.start))
          : null,
      );
    }),
  );
  return h(
    'div',
    { class: 'chart-wrap' },
    svg,
    h(
      'ul',
      { class: 'chart-legend' },
      h('li', { class: 'chart-legend__item chart-legend__item--completed' }, 'Completed'),
      h('li', { class: 'chart-legend__item chart-legend__item--failed' }, 'Failed'),
      h('li', { class: 'chart-legend__item chart-legend__item--cancelled' }, 'Cancelled'),
      h('li', { class: 'chart-legend__item chart-legend__item--live' }, 'Queued or running'),
    ),
    h('p', { class: 'sr-only' }, summary),
  );
}

function recentRuns(runs) {
  if (!runs.length) {
    return emptyState({
      title: 'No runs yet',
      text: 'Submit a workflow and watch it run here.',
      iconName: 'workflows',
      action: h('a', { class: 'btn btn--primary', href: '#/workflows/new' }, icon('plus'), 'New workflow'),
    });
  }
  return h(
    'ul',
    { class: 'run-list' },
    runs.slice(0, 6).map((run) =>
      h(
        'li',
        null,
        h(
          'a',
          { class: 'run-list__item', href: `#/runs/${encodeURIComponent(run.workflowRunId)}` },
          h('span', { class: 'run-list__main' }, h('span', { class: 'run-list__name' }, run.workflowName), h('span', { class: 'run-list__meta' }, `${run.progress.completed}/${run.progress.total} stages · ${timeAgo(run.createdAt)}`)),
          badge(run.status),
        ),
      ),
    ),
  );
}

export async function overviewPage(ctx) {
  const user = session.load()?.user || {};
  const body = h('div', { class: 'overview' }, loadingState('Loading the overview…', 4));
  ctx.root.append(
    pageHeader('Overview', {
      subtitle: `Hello${user.name ? `, ${user.name}` : ''}. Here is how your agents and workflows are doing.`,
      actions: h('a', { class: 'btn btn--primary', href: '#/workflows/new' }, icon('plus'), 'New workflow'),
    }),
    body,
  );
  let windowKey = null;
  let stats = null;
  let shown = null; // what is on screen, so a refresh that changed nothing redraws nothing

  const draw = () => {
    const finished = stats.completed + stats.failed;
    const chartHost = h('div');
    const toggle = h(
      'div',
      { class: 'segmented', role: 'group', 'aria-label': 'Time window' },
      Object.entries(WINDOWS).map(([key, w]) =>
        h(
          'button',
          {
            type: 'button',
            class: ['segmented__item', key === windowKey && 'is-active'],
            'aria-pressed': String(key === windowKey),
            onClick: () => {
              windowKey = key;
              draw();
            },
          },
          w.label,
        ),
      ),
    );
    replace(
      body,
      h(
        'div',
        { class: 'stats' },
        statCard({ id: 'agents', label: 'Total agents', value: String(stats.agents), sub: stats.agents ? 'registered and not deleted' : 'none registered yet', iconName: 'agents', tone: 'indigo' }),
        statCard({ id: 'online', label: 'Online agents', value: String(stats.online), sub: stats.agents ? `${percent(stats.online, stats.agents)} of all agents` : 'register one to start', iconName: 'sparkle', tone: 'green' }),
        statCard({ id: 'runs', label: 'Workflow runs', value: String(stats.totalRuns), sub: stats.running ? `${stats.running} running now` : 'none running now', iconName: 'workflows', tone: 'blue' }),
        statCard({ id: 'failure-rate', label: 'Failure rate', value: finished ? percent(stats.failed, finished) : '—', sub: failureSub(stats, finished), iconName: 'alert', tone: stats.failed ? 'red' : 'slate' }),
      ),
      h(
        'div',
        { class: 'overview__grid' },
        card('Runs over time', chartHost, { actions: toggle, className: 'overview__chart' }),
        card('Latest runs', recentRuns(stats.runs), { actions: h('a', { class: 'link', href: '#/workflows' }, 'All runs'), className: 'overview__recent' }),
      ),
    );
    replace(
      chartHost,
      stats.runs.length
        ? runsChart(stats.runs, windowKey, chartHost.clientWidth || 720)
        : emptyState({ title: 'Nothing to chart yet', text: 'Runs appear here as you submit workflows.', iconName: 'overview' }),
    );
  };

  const load = async (quiet) => {
    try {
      const next = await loadStats(ctx.api);
      if (!ctx.active) return;
      const print = JSON.stringify(next);
      if (quiet && print === shown) return;
      shown = print;
      stats = next;
      if (!windowKey) {
        const dayAgo = Date.now() - WINDOWS.day.buckets * WINDOWS.day.size;
        windowKey = stats.runs.some((r) => parseTime(r.createdAt)?.getTime() >= dayAgo) || !stats.runs.length ? 'day' : 'fortnight';
      }
      draw();
    } catch (error) {
      if (!ctx.active || error.code === 'SESSION_EXPIRED') return;
      if (!quiet || !stats) replace(body, errorState(error, () => { replace(body, loadingState()); load(false); }));
    }
  };
  await load(false);
  const timer = setInterval(() => {
    if (document.visibilityState === 'visible') load(true);
  }, REFRESH_MS);
  ctx.onCleanup(() => clearInterval(timer));
}

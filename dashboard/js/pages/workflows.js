// Workflows: your runs, newest first, filtered by status, a page at a time; live while any runs.
import { h, replace } from '../dom.js';
import { icon } from '../icons.js';
import { badge, card, emptyState, errorState, loadingState, pageHeader, pagination, progressBar } from '../components.js';
import { LIVE_STATUSES, RUN_STATUSES, durationBetween, formatDateTime, formatDuration, statusLabel, timeAgo } from '../format.js';

const FILTERS = ['', ...RUN_STATUSES];
const PAGE_SIZE = 20;
const LIVE_REFRESH_MS = 1500;
const IDLE_REFRESH_MS = 10000;

function runRow(run) {
  const href = `#/runs/${encodeURIComponent(run.workflowRunId)}`;
  const duration = durationBetween(run.startedAt || run.createdAt, run.completedAt);
  return h(
    'tr',
    { 'data-run-id': run.workflowRunId, 'data-status': run.status },
    h(
      'td',
      { 'data-label': 'Workflow' },
      h('a', { class: 'cell-title link-strong', href }, run.workflowName),
      h('div', { class: 'cell-sub mono' }, run.workflowRunId),
    ),
    h('td', { 'data-label': 'Status' }, badge(run.status)),
    h(
      'td',
      { 'data-label': 'Progress' },
      h('div', { class: 'progress-cell' }, progressBar(run.progress), h('span', { class: 'progress-cell__text' }, `${run.progress.completed}/${run.progress.total}`)),
    ),
    h('td', { 'data-label': 'Created' }, h('time', { datetime: run.createdAt, title: formatDateTime(run.createdAt) }, timeAgo(run.createdAt))),
    h('td', { 'data-label': 'Duration' }, run.completedAt ? formatDuration(duration) : LIVE_STATUSES.has(run.status) ? h('span', { class: 'muted' }, 'running…') : '—'),
  );
}

export async function workflowsPage(ctx) {
  const status = FILTERS.includes(ctx.query.status) ? ctx.query.status : '';
  const page = Math.max(1, Number(ctx.query.page) || 1);
  const link = (changes) => {
    const next = { status, page, ...changes };
    const params = new URLSearchParams(Object.entries(next).filter(([k, v]) => v && !(k === 'page' && Number(v) === 1)));
    return `#/workflows${params.toString() ? `?${params}` : ''}`;
  };
  const tabs = h(
    'nav',
    { class: 'tabs', 'aria-label': 'Filter runs by status' },
    FILTERS.map((value) =>
      h(
        'a',
        {
          class: ['tabs__item', value === status && 'is-active'],
          href: link({ status: value, page: 1 }),
          'aria-current': value === status ? 'page' : null,
          'data-filter': value || 'all',
        },
        value ? statusLabel(value) : 'All',
      ),
    ),
  );
  const body = h('div', null, loadingState('Loading runs…'));
  ctx.root.append(
    pageHeader('Workflows', {
      subtitle: 'Your runs, newest first. Open one to watch its stages.',
      actions: h('a', { class: 'btn btn--primary', href: '#/workflows/new' }, icon('plus'), 'New workflow'),
    }),
    card(null, [tabs, body], { className: 'card--table' }),
  );

  let timer = null;
  let delay = LIVE_REFRESH_MS;
  let shown = null;
  ctx.onCleanup(() => clearTimeout(timer));

  async function load() {
    try {
      const data = await ctx.api.get('/workflows', { status, page, limit: PAGE_SIZE });
      if (!ctx.active) return;
      const print = JSON.stringify(data);
      const changed = print !== shown;
      if (changed) {
        shown = print;
        draw(data);
      }
      // Watch closely while something on this page is still running, now and then otherwise
      // (runs finishing elsewhere join a filtered list).
      if (data.runs.some((run) => LIVE_STATUSES.has(run.status))) {
        delay = changed ? LIVE_REFRESH_MS : Math.min(delay * 1.5, 8000);
      } else {
        delay = IDLE_REFRESH_MS;
      }
      timer = setTimeout(load, delay);
    } catch (error) {
      if (!ctx.active || error.code === 'SESSION_EXPIRED') return;
      shown = null;
      replace(body, errorState(error, () => { replace(body, loadingState()); load(); }));
    }
  }

  function draw(data) {
    if (!data.runs.length) {
      replace(
        body,
        status || page > 1
          ? emptyState({
              title: status ? `No ${statusLabel(status).toLowerCase()} runs` : 'No runs on this page',
              text: status ? 'Runs with this status appear here.' : 'Try the first page.',
              iconName: 'workflows',
              action: h('a', { class: 'btn btn--secondary', href: '#/workflows' }, 'Show all runs'),
            })
          : emptyState({
              title: 'No runs yet',
              text: 'Submit a workflow and watch its stages light up.',
              iconName: 'workflows',
              action: h('a', { class: 'btn btn--primary', href: '#/workflows/new' }, icon('plus'), 'New workflow'),
            }),
      );
    } else {
      replace(
        body,
        h(
          'div',
          { class: 'table-wrap' },
          h(
            'table',
            { class: 'table table--cards', 'data-testid': 'runs-table' },
            h('caption', { class: 'sr-only' }, 'Workflow runs'),
            h('thead', null, h('tr', null, ['Workflow', 'Status', 'Progress', 'Created', 'Duration'].map((t) => h('th', { scope: 'col' }, t)))),
            h('tbody', null, data.runs.map(runRow)),
          ),
        ),
        pagination(data.meta, (p) => ctx.navigate(link({ page: p }))),
      );
    }
  }
  await load();
}

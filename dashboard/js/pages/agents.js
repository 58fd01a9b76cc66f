// Agents: yours and the shared ones, as a table; register one, delete your own.
import { session } from '../api.js';
import { h, replace } from '../dom.js';
import { icon } from '../icons.js';
import {
  alertBox,
  badge,
  card,
  confirmDialog,
  emptyState,
  errorState,
  field,
  loadingState,
  pageHeader,
  pagination,
  setBusy,
  showFieldErrors,
  toast,
} from '../components.js';
import { characterCount, formatDateTime, timeAgo } from '../format.js';

const CAPABILITY = /^[a-z0-9]+(?:[-.][a-z0-9]+)*$/;
// The API's limits, in characters. Checked on submit, not by maxlength, which counts UTF-16
// units and so would cut an emoji name at half the length the API takes.
const MAX_CHARACTERS = { name: 255, agentId: 255, description: 2000 };
const PAGE_SIZE = 20;

function splitCapabilities(text) {
  return [...new Set(String(text || '').split(/[\s,]+/).map((c) => c.trim()).filter(Boolean))];
}

function registerDialog(ctx, onRegistered) {
  const admin = session.load()?.user?.role === 'admin';
  const error = h('div', { class: 'form-error' });
  const submit = h('button', { class: 'btn btn--primary', type: 'submit' }, 'Register agent');
  const cancel = h('button', { class: 'btn btn--secondary', type: 'button', onClick: () => dialog.close() }, 'Cancel');
  const form = h(
    'form',
    { class: 'form dialog__form', novalidate: true, 'aria-label': 'Register an agent' },
    h('h2', { class: 'dialog__title', id: 'register-agent-title' }, 'Register an agent'),
    h('p', { class: 'dialog__text' }, 'Stages needing one of its capabilities can be routed to it.'),
    h(
      'div',
      { class: 'form-grid' },
      field({ label: 'Name', name: 'name', attrs: { required: true, placeholder: 'Text Summarizer', autocomplete: 'off' } }),
      field({ label: 'Agent ID', name: 'agentId', hint: 'Your name for it, unique among your agents.', attrs: { required: true, placeholder: 'my-summarizer', autocomplete: 'off' } }),
      field({ label: 'Endpoint', name: 'endpoint', type: 'url', hint: 'Where MAOF sends its tasks.', attrs: { required: true, placeholder: 'https://agents.example.com/summarize', autocomplete: 'off' } }),
      field({ label: 'Auth token', name: 'authToken', type: 'password', hint: 'Encrypted at rest; never shown again.', attrs: { required: true, autocomplete: 'off' } }),
      field({
        label: 'Capabilities',
        name: 'capabilities',
        hint: "Comma-separated lowercase tags, e.g. summarization, text-generation, code-audit.python",
        attrs: { required: true, placeholder: 'summarization, text-generation', autocomplete: 'off' },
      }),
      field({ label: 'Max concurrent tasks', name: 'maxConcurrentTasks', type: 'number', attrs: { min: 1, max: 100, value: '5' } }),
      field({
        label: 'Description (optional)',
        name: 'description',
        control: h('textarea', { class: 'input textarea', rows: 2, placeholder: 'What it does' }),
      }),
      admin
        ? h(
            'label',
            { class: 'checkbox' },
            h('input', { type: 'checkbox', name: 'shared', value: 'yes' }),
            h('span', null, 'Share with every user (it serves their runs; they never see its endpoint)'),
          )
        : null,
    ),
    error,
    h('div', { class: 'dialog__actions' }, cancel, submit),
  );
  const dialog = h('dialog', { class: 'dialog dialog--wide', 'aria-labelledby': 'register-agent-title' }, form);
  dialog.addEventListener('close', () => dialog.remove());
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    error.replaceChildren();
    const data = Object.fromEntries(new FormData(form));
    const capabilities = splitCapabilities(data.capabilities);
    const problems = [];
    for (const name of ['name', 'agentId', 'endpoint', 'authToken']) {
      if (!String(data[name] || '').trim()) problems.push({ field: name, message: 'is required' });
    }
    for (const [name, max] of Object.entries(MAX_CHARACTERS)) {
      if (characterCount(String(data[name] || '').trim()) > max) problems.push({ field: name, message: `must be at most ${max} characters` });
    }
    if (data.endpoint && !/^(https?|mock):\/\/[^/\s]+/i.test(data.endpoint.trim())) {
      problems.push({ field: 'endpoint', message: 'must be an absolute http:// or https:// URL' });
    }
    if (!capabilities.length) problems.push({ field: 'capabilities', message: 'name at least one capability' });
    const bad = capabilities.filter((c) => !CAPABILITY.test(c));
    if (bad.length) {
      problems.push({ field: 'capabilities', message: `${bad.map((c) => `'${c}'`).join(', ')}: use lowercase words joined by '-' or '.'` });
    }
    const max = Number(data.maxConcurrentTasks || 5);
    if (!Number.isInteger(max) || max < 1 || max > 100) problems.push({ field: 'maxConcurrentTasks', message: 'must be a whole number from 1 to 100' });
    if (problems.length) {
      showFieldErrors(form, problems);
      return;
    }
    showFieldErrors(form, []);
    setBusy(submit, true, 'Registering…');
    try {
      const body = {
        agentId: data.agentId.trim(),
        name: data.name.trim(),
        endpoint: data.endpoint.trim(),
        authToken: data.authToken,
        capabilities,
        maxConcurrentTasks: max,
        visibility: data.shared ? 'shared' : 'private',
      };
      if (String(data.description || '').trim()) body.description = data.description.trim();
      const agent = await ctx.api.post('/agents/register', body);
      dialog.close();
      toast(`Agent ${agent.agentId} registered`, 'success');
      onRegistered(agent);
    } catch (err) {
      setBusy(submit, false);
      if (err.code === 'SESSION_EXPIRED') return;
      const rest = showFieldErrors(form, err.details || []);
      error.replaceChildren(alertBox('error', err.message, { details: rest }));
    }
  });
  document.body.append(dialog);
  dialog.showModal();
  form.querySelector('input')?.focus();
  ctx.onCleanup(() => dialog.open && dialog.close());
}

function agentRow(ctx, agent, reload) {
  const me = session.load()?.user?.userUuid;
  const mine = me && agent.ownerUserUuid === me;
  const remove = h(
    'button',
    {
      class: 'btn btn--ghost btn--small btn--danger-text',
      type: 'button',
      disabled: !mine,
      title: mine ? `Delete ${agent.agentId}` : 'Only the agent’s owner can delete it',
      'aria-label': `Delete agent ${agent.agentId}`,
      onClick: async () => {
        const ok = await confirmDialog({
          title: `Delete ${agent.name}?`,
          message: `Agent ${agent.agentId} will no longer be routed to. Runs it took part in keep their history.`,
          confirmLabel: 'Delete agent',
          danger: true,
          signal: ctx.signal,
        });
        if (!ok || !ctx.active) return;
        setBusy(remove, true, 'Deleting…');
        try {
          await ctx.api.delete(`/agents/${encodeURIComponent(agent.agentUuid)}`);
          toast(`Agent ${agent.agentId} deleted`, 'success');
          reload();
        } catch (err) {
          setBusy(remove, false);
          if (err.code !== 'SESSION_EXPIRED') toast(err.message, 'error');
        }
      },
    },
    icon('trash', { size: 15 }),
    h('span', { class: 'btn__label' }, 'Delete'),
  );
  return h(
    'tr',
    { 'data-agent-id': agent.agentId },
    h('td', { 'data-label': 'Name' }, h('div', { class: 'cell-title' }, agent.name), agent.description ? h('div', { class: 'cell-sub' }, agent.description) : null),
    h('td', { 'data-label': 'Agent ID' }, h('code', { class: 'mono' }, agent.agentId)),
    h('td', { 'data-label': 'Capabilities' }, h('div', { class: 'chips' }, agent.capabilities.map((c) => h('span', { class: 'chip' }, c)))),
    h('td', { 'data-label': 'Status' }, badge(agent.status)),
    h(
      'td',
      { 'data-label': 'Visibility' },
      h(
        'span',
        {
          class: ['chip', agent.visibility === 'shared' && 'chip--shared'],
          'data-visibility': agent.visibility,
          title: agent.visibility === 'shared' ? 'Serves every user’s runs' : 'Serves only its owner’s runs',
        },
        agent.visibility === 'shared' ? (mine ? 'Shared by you' : 'Shared') : 'Private',
      ),
    ),
    h(
      'td',
      { 'data-label': 'Last health check' },
      agent.lastHealthCheck ? h('time', { datetime: agent.lastHealthCheck, title: formatDateTime(agent.lastHealthCheck) }, timeAgo(agent.lastHealthCheck)) : h('span', { class: 'muted' }, 'Never'),
    ),
    h('td', { 'data-label': '', class: 'cell-actions' }, remove),
  );
}

export async function agentsPage(ctx) {
  const query = { page: Number(ctx.query.page) || 1, capability: ctx.query.capability || '', status: ctx.query.status || '' };
  const body = h('div', null, loadingState('Loading agents…'));
  const setQuery = (changes) => {
    const next = { ...query, ...changes };
    const params = new URLSearchParams(Object.entries(next).filter(([k, v]) => v && !(k === 'page' && Number(v) === 1)));
    ctx.navigate(`#/agents${params.toString() ? `?${params}` : ''}`);
  };
  const openRegister = () => registerDialog(ctx, () => (query.page === 1 ? load() : setQuery({ page: 1 })));
  const capabilityInput = h('input', { class: 'input input--small', type: 'search', name: 'capability', placeholder: 'e.g. summarization', value: query.capability, 'aria-label': 'Filter by capability' });
  const statusSelect = h(
    'select',
    { class: 'input input--small', name: 'status', 'aria-label': 'Filter by status' },
    ['', 'online', 'degraded', 'offline'].map((value) => h('option', { value, selected: value === query.status }, value ? value[0].toUpperCase() + value.slice(1) : 'Any status')),
  );
  const filters = h(
    'form',
    {
      class: 'filters',
      role: 'search',
      onSubmit: (e) => {
        e.preventDefault();
        setQuery({ capability: capabilityInput.value.trim().toLowerCase(), status: statusSelect.value, page: 1 });
      },
    },
    h('label', { class: 'filters__item' }, h('span', null, 'Capability'), capabilityInput),
    h('label', { class: 'filters__item' }, h('span', null, 'Status'), statusSelect),
    h('button', { class: 'btn btn--secondary btn--small', type: 'submit' }, 'Filter'),
    query.capability || query.status
      ? h('a', { class: 'link', href: '#/agents' }, 'Clear')
      : null,
  );
  statusSelect.addEventListener('change', () => filters.requestSubmit());
  ctx.root.append(
    pageHeader('Agents', {
      subtitle: 'Your agents and those an admin shared with everyone: what they can do and whether they answer.',
      actions: h('button', { class: 'btn btn--primary', type: 'button', onClick: openRegister }, icon('plus'), 'Register agent'),
    }),
    card(null, [filters, body], { className: 'card--table' }),
  );

  async function load() {
    try {
      const data = await ctx.api.get('/agents', { page: query.page, limit: PAGE_SIZE, capability: query.capability, status: query.status });
      if (!ctx.active) return;
      if (!data.agents.length) {
        replace(
          body,
          query.capability || query.status || query.page > 1
            ? emptyState({ title: 'No agents match', text: 'Try another capability or status.', iconName: 'agents', action: h('a', { class: 'btn btn--secondary', href: '#/agents' }, 'Show all agents') })
            : emptyState({
                title: 'No agents yet',
                text: 'Register an agent so workflows have someone to route stages to.',
                iconName: 'agents',
                action: h('button', { class: 'btn btn--primary', type: 'button', onClick: openRegister }, icon('plus'), 'Register agent'),
              }),
        );
        return;
      }
      replace(
        body,
        h(
          'div',
          { class: 'table-wrap' },
          h(
            'table',
            { class: 'table table--cards', 'data-testid': 'agents-table' },
            h('caption', { class: 'sr-only' }, 'Registered agents'),
            h('thead', null, h('tr', null, ['Name', 'Agent ID', 'Capabilities', 'Status', 'Visibility', 'Last health check', ''].map((t) => h('th', { scope: 'col' }, t)))),
            h('tbody', null, data.agents.map((agent) => agentRow(ctx, agent, load))),
          ),
        ),
        pagination(data.meta, (page) => setQuery({ page })),
      );
    } catch (error) {
      if (!ctx.active || error.code === 'SESSION_EXPIRED') return;
      const details = error.details?.length ? ` (${error.details.map((d) => `${d.field}: ${d.message}`).join('; ')})` : '';
      replace(body, errorState({ ...error, message: `${error.message}${details}` }, () => { replace(body, loadingState()); load(); }));
    }
  }
  await load();
}

// Run detail: the stage graph lighting up live, each stage's data, the result, the audit
// chain; cancelling a live run and retrying a failed or cancelled one.
import { h, replace } from '../dom.js';
import { icon } from '../icons.js';
import {
  alertBox,
  badge,
  card,
  confirmDialog,
  copyButton,
  downloadFile,
  emptyState,
  errorState,
  jsonView,
  liveDot,
  loadingState,
  pageHeader,
  progressBar,
  setBusy,
  toast,
} from '../components.js';
import { dagLegend, renderDag } from '../dag.js';
import {
  LIVE_STATUSES,
  durationBetween,
  formatClock,
  formatDateTime,
  formatDuration,
  shortHash,
  statusLabel,
  timeAgo,
  timeUntil,
} from '../format.js';

const POLL_MIN_MS = 400;
const WAITING_INPUT = {
  pending: 'Resolved when its dependencies complete.',
  queued: 'Resolved when the stage starts.',
  waiting: 'Resolved when an agent has a free slot.',
  in_progress: 'Recorded when the stage finishes.',
  cancelled: 'The stage never started: its run was cancelled.',
};
const POLL_MAX_MS = 5000;
const NARROW = '(max-width: 720px)';
const RETRYABLE = new Set(['failed', 'cancelled']);
const CALLBACK_STATES = {
  pending: 'Delivering',
  delivered: 'Delivered',
  failed: 'Not delivered',
};

const plural = (n, word) => `${n} ${word}${n === 1 ? '' : 's'}`;
const byWhom = (details, done) => (details?.by ? `${done} by ${details.by}` : done);

// What each audit action says, from the entry's details (who, why) where the API gives them.
const ACTIONS = {
  submit: () => 'Submitted',
  execute: () => 'Executed',
  complete: () => 'Completed',
  fail: (d) => ({ title: 'Failed', note: d?.error }),
  skip: (d) => ({ title: 'Skipped', note: d?.reason }),
  requeue: (d) => ({ title: 'Re-queued', note: d?.reason }),
  retry: (d) => ({ title: 'Retried after an error', note: d?.error }),
  fallback: (d) => ({ title: 'Fell back to another agent', note: d?.error }),
  wait: () => 'Waited for a free agent slot',
  cancel: (d) => ({
    title: byWhom(d, 'Cancelled'),
    note: d?.stagesEnded?.length ? `Not started, now cancelled: ${d.stagesEnded.join(', ')}` : null,
  }),
  'retry-run': (d) => ({
    title: byWhom(d, 'Retried'),
    note: d?.stages?.length ? `Was ${statusLabel(d.was).toLowerCase()}; run again: ${d.stages.join(', ')}` : null,
  }),
  discard: () => 'Output discarded: the run had ended',
  deadline: (d) => ({
    title: d?.timeoutMs ? `Deadline of ${formatDuration(d.timeoutMs)} passed` : 'Deadline passed',
    note: d?.stagesEnded?.length ? `Not started, now skipped: ${d.stagesEnded.join(', ')}` : null,
  }),
};

/** `{title, note}` for an audit entry (an action this page does not know shows as is). */
export function describeEntry(entry) {
  const described = ACTIONS[entry.action]?.(entry.details || {}) ?? entry.action;
  return typeof described === 'string' ? { title: described, note: null } : described;
}

function graphStages(run) {
  const ended = !LIVE_STATUSES.has(run.status);
  return run.stages.map((stage) => ({ ...stage, id: stage.stageId, runEnded: ended }));
}

function fingerprint(run) {
  return JSON.stringify([
    run.status,
    run.errorMessage,
    run.deadlineAt,
    run.callback,
    run.stages.map((s) => [s.status, s.attempt, s.agentId, s.completedAt]),
  ]);
}

function defaultStage(run) {
  const by = (status) => run.stages.find((stage) => stage.status === status);
  return (by('failed') || by('in_progress') || by('waiting') || by('queued') || run.stages[run.stages.length - 1])?.stageId;
}

function fact(label, value, testid) {
  return h('div', { class: 'fact' }, h('dt', null, label), h('dd', { 'data-testid': testid || null }, value));
}

function timeValue(value) {
  return value ? h('time', { datetime: value, title: formatDateTime(value) }, formatClock(value)) : '—';
}

function stagePanel(stage, { onTab, tab, runStatus, runId }) {
  if (!stage) return emptyState({ title: 'Select a stage', text: 'Click a node in the graph to see its data.', iconName: 'workflows' });
  const hasOutput = stage.output !== null && stage.output !== undefined;
  const active = tab || (hasOutput ? 'output' : 'input');
  const tabButton = (key, label) =>
    h(
      'button',
      {
        class: ['tabs__item', active === key && 'is-active'],
        type: 'button',
        role: 'tab',
        id: `stage-tab-${key}`,
        'aria-selected': String(active === key),
        'aria-controls': 'stage-tabpanel',
        tabindex: active === key ? '0' : '-1',
        onClick: () => onTab(key),
        onKeydown: (event) => {
          if (event.key === 'ArrowRight' || event.key === 'ArrowLeft') {
            event.preventDefault();
            onTab(key === 'output' ? 'input' : 'output', true);
          }
        },
      },
      label,
    );
  const content =
    active === 'output'
      ? hasOutput
        ? jsonView(stage.output, { label: `Output of ${stage.stageId}`, filename: `${runId}-${stage.stageId}-output.json` })
        : h('p', { class: 'muted' }, 'No output.')
      : stage.input !== null && stage.input !== undefined
        ? jsonView(stage.input, { label: `Input of ${stage.stageId}`, filename: `${runId}-${stage.stageId}-input.json` })
        : h('p', { class: 'muted' }, WAITING_INPUT[stage.status] || 'No input.');
  return h(
    'div',
    { class: 'stage', 'data-testid': 'stage-panel', 'data-stage-id': stage.stageId },
    h(
      'div',
      { class: 'stage__head' },
      h('div', null, h('h3', { class: 'stage__title' }, stage.name), h('code', { class: 'stage__id mono' }, stage.stageId)),
      badge(stage.status),
    ),
    stage.errorMessage ? alertBox('error', stage.errorMessage, { title: 'Error' }) : null,
    stage.status === 'in_progress' && runStatus === 'cancelled'
      ? alertBox('info', 'The run was cancelled while this stage was running. Whatever its agent answers is discarded, and the stage then shows as cancelled.')
      : null,
    h(
      'dl',
      { class: 'facts facts--grid' },
      fact('Capability', h('span', { class: 'chip' }, stage.agentCapability)),
      fact('Agent', stage.agentId ? h('code', { class: 'mono' }, stage.agentId) : h('span', { class: 'muted' }, 'not assigned'), 'stage-agent'),
      fact('Attempt', String(stage.attempt ?? 0)),
      fact('Depends on', stage.dependencies?.length ? h('span', { class: 'chips' }, stage.dependencies.map((d) => h('span', { class: 'chip chip--muted' }, d))) : h('span', { class: 'muted' }, 'nothing')),
      fact('Queued', timeValue(stage.queuedAt)),
      fact('Started', timeValue(stage.startedAt)),
      fact('Completed', timeValue(stage.completedAt)),
      fact('Duration', stage.durationMs != null ? formatDuration(stage.durationMs) : '—', 'stage-duration'),
    ),
    h(
      'div',
      { class: 'stage__data' },
      h(
        'div',
        { class: 'tabs tabs--small', role: 'tablist', 'aria-label': 'Stage data' },
        tabButton('output', 'Output'),
        tabButton('input', 'Input'),
        h('span', { class: 'tabs__spacer' }),
        copyButton(() => JSON.stringify(active === 'output' ? stage.output : stage.input, null, 2), 'Copy JSON'),
      ),
      h('div', { class: 'stage__tabpanel', role: 'tabpanel', id: 'stage-tabpanel', 'aria-labelledby': `stage-tab-${active}` }, content),
    ),
  );
}

function stageTable(run, selected, onSelect) {
  return h(
    'div',
    { class: 'table-wrap' },
    h(
      'table',
      { class: 'table table--compact table--cards', 'data-testid': 'stage-table' },
      h('caption', { class: 'sr-only' }, 'Stages'),
      h('thead', null, h('tr', null, ['Stage', 'Capability', 'Status', 'Agent', 'Started', 'Duration'].map((t) => h('th', { scope: 'col' }, t)))),
      h(
        'tbody',
        null,
        run.stages.map((stage) =>
          h(
            'tr',
            { class: stage.stageId === selected ? 'is-selected' : null, 'data-stage-id': stage.stageId },
            h(
              'td',
              { 'data-label': 'Stage' },
              h('button', { class: 'link-button', type: 'button', onClick: () => onSelect(stage.stageId), 'aria-pressed': String(stage.stageId === selected) }, stage.name),
              h('div', { class: 'cell-sub mono' }, stage.stageId),
            ),
            h('td', { 'data-label': 'Capability' }, h('span', { class: 'chip' }, stage.agentCapability)),
            h('td', { 'data-label': 'Status' }, badge(stage.status)),
            h('td', { 'data-label': 'Agent' }, stage.agentId ? h('code', { class: 'mono' }, stage.agentId) : h('span', { class: 'muted' }, '—')),
            h('td', { 'data-label': 'Started' }, timeValue(stage.startedAt)),
            h('td', { 'data-label': 'Duration' }, stage.durationMs != null ? formatDuration(stage.durationMs) : '—'),
          ),
        ),
      ),
    ),
  );
}

// The trail's proof: who signed it, and the signed checkpoint in S3 that freezes it.
function signatureLine(chain) {
  const { signed = 0, legacy = 0 } = chain.signatures || {};
  const text = legacy
    ? `${signed} entr${signed === 1 ? 'y' : 'ies'} signed (Ed25519), ${legacy} from before signing (hash only)`
    : `${signed} of ${chain.length} entr${chain.length === 1 ? 'y' : 'ies'} signed (Ed25519)`;
  return h(
    'div',
    { class: 'proof__row', 'data-testid': 'audit-signatures', 'data-signed': String(signed), 'data-legacy': String(legacy) },
    icon('check', { size: 15 }),
    h('span', null, text, chain.outputsChecked ? ` · ${chain.outputsChecked} stored output${chain.outputsChecked === 1 ? '' : 's'} match their hashes` : ''),
  );
}

function checkpointLine(checkpoint, ended) {
  if (!checkpoint) {
    return h(
      'div',
      { class: 'proof__row proof__row--muted', 'data-testid': 'audit-checkpoint', 'data-status': 'none' },
      icon('clock', { size: 15 }),
      h('span', null, ended ? 'Not in a signed checkpoint yet: one is written within a minute of the run’s end.' : 'Checkpointed once the run has ended.'),
    );
  }
  if (checkpoint.status === 'unavailable') {
    return h(
      'div',
      { class: 'proof__row proof__row--muted', 'data-testid': 'audit-checkpoint', 'data-status': 'unavailable' },
      icon('alert', { size: 15 }),
      h('span', null, 'The checkpoint store did not answer; the checkpoint could not be checked.'),
    );
  }
  const ok = checkpoint.status === 'verified';
  return h(
    'div',
    { class: ['proof__row', !ok && 'proof__row--bad'], 'data-testid': 'audit-checkpoint', 'data-status': checkpoint.status, 'data-checkpoint': String(checkpoint.checkpoint) },
    icon('lock', { size: 15 }),
    h(
      'span',
      null,
      `${ok ? 'In' : 'Does not match'} signed checkpoint #${checkpoint.checkpoint}`,
      checkpoint.createdAt ? h('span', { class: 'muted' }, ` · ${formatDateTime(checkpoint.createdAt)}`) : null,
      ' · entry #',
      String(checkpoint.seq),
      ' · root ',
      h('code', { class: 'mono', title: checkpoint.rootHash || '' }, shortHash(checkpoint.rootHash, 10)),
      checkpoint.object ? h('span', { class: 'muted', title: `s3://${checkpoint.object.bucket}/${checkpoint.object.key}` }, ' · copy in S3') : null,
    ),
  );
}

function proofView(audit, runId, ctx, ended) {
  const download = h(
    'button',
    {
      class: 'btn btn--secondary btn--small',
      type: 'button',
      'data-testid': 'download-proof',
      title: 'The bundle maof-verify checks offline: entries, public keys, outputs, checkpoints',
      onClick: async () => {
        download.disabled = true;
        try {
          const bundle = await ctx.api.get(`/workflows/${encodeURIComponent(runId)}/audit/export`);
          downloadFile(JSON.stringify(bundle, null, 2), `${runId}-audit.json`, 'application/json');
          toast('Proof downloaded: check it with maof-verify', 'success');
        } catch (error) {
          toast(error.message || 'The proof could not be downloaded', 'error');
        } finally {
          download.disabled = false;
        }
      },
    },
    icon('download', { size: 15 }),
    h('span', { class: 'btn__label' }, 'Download proof'),
  );
  return h(
    'div',
    { class: 'proof', 'data-testid': 'audit-proof' },
    h('div', { class: 'proof__lines' }, signatureLine(audit.chain), checkpointLine(audit.chain.checkpoint, ended)),
    download,
  );
}

function auditView(audit, runId, ctx, ended) {
  const { chain, logs } = audit;
  const problems = (chain.problems || []).slice(0, 5);
  const banner = chain.valid
    ? h(
        'div',
        { class: 'chain chain--valid', 'data-testid': 'audit-chain', 'data-valid': 'true' },
        icon('shield', { size: 22 }),
        h('div', null, h('strong', null, 'Hash chain valid'), h('div', { class: 'chain__meta' }, `${chain.length} entr${chain.length === 1 ? 'y' : 'ies'} verified · head `, h('code', { class: 'mono', title: chain.head || '' }, shortHash(chain.head, 12)))),
        chain.head ? copyButton(chain.head, 'Copy head') : null,
      )
    : h(
        'div',
        { class: 'chain chain--broken', role: 'alert', 'data-testid': 'audit-chain', 'data-valid': 'false' },
        icon('shieldOff', { size: 22 }),
        h(
          'div',
          null,
          h('strong', null, `Hash chain broken${chain.brokenAtSeq != null ? ` at entry #${chain.brokenAtSeq}` : ''}`),
          h('div', { class: 'chain__meta' }, 'The audit trail was altered after it was written. Entries from that point on cannot be trusted.'),
          problems.length ? h('ul', { class: 'chain__problems', 'data-testid': 'audit-problems' }, problems.map((problem) => h('li', null, problem))) : null,
        ),
      );
  const proof = proofView(audit, runId, ctx, ended);
  if (!logs.length) return h('div', null, banner, emptyState({ title: 'No audit entries yet', iconName: 'shield' }));
  return h(
    'div',
    null,
    banner,
    proof,
    h(
      'ol',
      { class: 'audit', 'data-testid': 'audit-log' },
      logs.map((entry) => {
        const broken = !chain.valid && chain.brokenAtSeq != null && entry.seq >= chain.brokenAtSeq;
        const { title, note } = describeEntry(entry);
        return h(
          'li',
          { class: ['audit__entry', `audit__entry--${entry.action}`, broken && 'audit__entry--broken'], 'data-seq': entry.seq },
          h('span', { class: 'audit__seq', 'aria-label': `Entry ${entry.seq}` }, String(entry.seq)),
          h(
            'div',
            { class: 'audit__body' },
            h(
              'div',
              { class: 'audit__line' },
              h('strong', { 'data-testid': 'audit-title' }, title),
              entry.stageId ? h('span', null, ' · stage ', h('code', { class: 'mono' }, entry.stageId)) : h('span', { class: 'muted' }, ' · run'),
              entry.agentId ? h('span', { class: 'muted' }, ' · agent ', h('code', { class: 'mono' }, entry.agentId)) : null,
              h('time', { class: 'audit__time', datetime: entry.loggedAt, title: formatDateTime(entry.loggedAt) }, formatClock(entry.loggedAt)),
            ),
            note ? h('p', { class: 'audit__note' }, note) : null,
            h(
              'div',
              { class: 'audit__hashes' },
              h('span', { title: `previous: ${entry.prevHash}` }, h('span', { class: 'audit__hash-label' }, 'prev '), h('code', { class: 'mono' }, shortHash(entry.prevHash, 8))),
              icon('chevronRight', { size: 14 }),
              h('span', { title: `entry: ${entry.hash}` }, h('span', { class: 'audit__hash-label' }, 'hash '), h('code', { class: 'mono' }, shortHash(entry.hash, 8))),
              entry.signature ? h('span', { class: 'audit__hash-extra', title: `signed by key ${entry.kid}: ${entry.signature}` }, h('span', { class: 'audit__hash-label' }, 'signed ')) : null,
              entry.outputHash ? h('span', { class: 'audit__hash-extra', title: `output: ${entry.outputHash}` }, h('span', { class: 'audit__hash-label' }, 'output '), h('code', { class: 'mono' }, shortHash(entry.outputHash, 6))) : null,
            ),
          ),
        );
      }),
    ),
  );
}

function deadlineFact(run, live) {
  if (!run.deadlineAt) return null;
  const until = live ? timeUntil(run.deadlineAt) : '';
  return fact(
    'Deadline',
    h(
      'span',
      null,
      timeValue(run.deadlineAt),
      until ? h('span', { class: 'muted' }, ` (${until})`) : null,
    ),
    'run-deadline',
  );
}

function callbackFact(callback, live) {
  if (!callback) return null;
  const state = callback.state
    ? CALLBACK_STATES[callback.state] || callback.state
    : live
      ? 'Sent when the run ends'
      : 'Not sent yet';
  return fact(
    'Callback',
    h(
      'span',
      { class: 'callback' },
      h('code', { class: 'mono callback__url', 'data-testid': 'callback-url' }, callback.url),
      h(
        'span',
        { class: ['callback__state', `callback__state--${callback.state || 'none'}`], 'data-testid': 'callback-state', 'data-state': callback.state || '' },
        state,
        callback.attempts ? ` · ${plural(callback.attempts, 'attempt')}` : '',
      ),
      callback.lastError ? h('span', { class: 'callback__error', 'data-testid': 'callback-error' }, `Last error: ${callback.lastError}`) : null,
    ),
    'run-callback',
  );
}

function runAlert(run) {
  if (run.status === 'failed') {
    return alertBox('error', run.errorMessage || 'A stage failed.', { title: 'This run failed' });
  }
  if (run.status === 'cancelled') {
    return alertBox('warning', run.errorMessage || 'The run was cancelled.', { title: 'This run was cancelled' });
  }
  return null;
}

export async function runPage(ctx) {
  const [runId] = ctx.params;
  const path = `/workflows/${encodeURIComponent(runId)}`;
  const body = h('div', null, loadingState('Loading the run…', 5));
  ctx.root.append(body);

  let run;
  try {
    run = await ctx.api.get(path);
  } catch (error) {
    if (!ctx.active || error.code === 'SESSION_EXPIRED') return;
    replace(
      body,
      error.status === 404
        ? emptyState({ title: 'Run not found', text: `There is no run ${runId} among yours.`, iconName: 'workflows', action: h('a', { class: 'btn btn--secondary', href: '#/workflows' }, 'Back to workflows') })
        : errorState(error, () => ctx.navigate(location.hash)),
    );
    return;
  }
  if (!ctx.active) return;

  let selected = defaultStage(run);
  let userPicked = false; // until someone picks a stage, the panel follows the live one
  let tab = null;
  let lastPrint = fingerprint(run);
  let lastAudit = null;
  let resultLoaded = false;
  let acting = false; // a cancel or retry is being confirmed or sent
  let sending = false; // … and has been sent: its own toast says how the run ended
  const narrow = window.matchMedia(NARROW);

  const statusHost = h('div', { class: 'run-status' });
  const actionsHost = h('div', { class: 'run-actions' });
  const progressHost = h('div', { class: 'run-progress' });
  const factsHost = h('dl', { class: 'facts facts--inline' });
  const alertHost = h('div', { 'data-testid': 'run-error' });
  const graphHost = h('div', { class: 'graph-host' });
  const stageHost = h('div');
  const stagesHost = h('div');
  const resultHost = h('div', { 'data-testid': 'run-result' });
  const auditHost = h('div', null, loadingState('Loading the audit trail…', 2));
  let graph = null;

  const live = () => LIVE_STATUSES.has(run.status);

  const drawGraph = () => {
    graph = renderDag(graphStages(run), {
      orientation: narrow.matches ? 'tb' : 'lr',
      selectedId: selected,
      label: `Stages of ${run.workflowName}`,
      onSelect: select,
    });
    replace(graphHost, graph.element);
  };

  function drawStage() {
    const stage = run.stages.find((s) => s.stageId === selected);
    replace(
      stageHost,
      stagePanel(stage, {
        tab,
        runStatus: run.status,
        runId,
        onTab: (key, focus) => {
          tab = key;
          drawStage();
          if (focus) stageHost.querySelector(`#stage-tab-${key}`)?.focus();
        },
      }),
    );
  }

  function select(stageId) {
    userPicked = true;
    selected = stageId;
    tab = null;
    graph?.select(stageId);
    drawStage();
    replace(stagesHost, stageTable(run, selected, select));
    if (narrow.matches) stageHost.scrollIntoView({ behavior: 'smooth', block: 'start' });
  }

  function drawSummary(reconnecting = false) {
    const progress = run.progress;
    const isLive = live();
    document.title = `${run.workflowName} · ${statusLabel(run.status)} · MAOF`;
    replace(
      statusHost,
      isLive ? liveDot(reconnecting ? 'Reconnecting…' : 'Live') : null,
      h('span', { 'data-testid': 'run-status' }, badge(run.status, { large: true })),
    );
    replace(
      progressHost,
      progressBar(progress, { label: `${progress.completed} of ${progress.total} stages completed` }),
      h('span', { class: 'run-progress__text' }, `${progress.completed} of ${progress.total} stages completed${progress.failed ? `, ${progress.failed} failed` : ''}`),
    );
    const end = run.completedAt || (isLive ? new Date().toISOString() : null);
    replace(
      factsHost,
      fact('Created', h('time', { datetime: run.createdAt, title: formatDateTime(run.createdAt) }, timeAgo(run.createdAt))),
      fact('Started', timeValue(run.startedAt)),
      fact('Finished', timeValue(run.completedAt)),
      fact('Duration', run.startedAt && end ? formatDuration(durationBetween(run.startedAt, end)) : '—', 'run-duration'),
      deadlineFact(run, isLive),
      callbackFact(run.callback, isLive),
    );
    replace(alertHost, runAlert(run));
    if (!acting) drawActions();
  }

  /** Cancel while the run is live; Retry once it failed or was cancelled. Drawn again only
   * when that changes (the summary is redrawn every second while live). */
  let actionsShown = null;
  function drawActions() {
    const kind = live() ? 'cancel' : RETRYABLE.has(run.status) ? 'retry' : 'none';
    if (kind === actionsShown) return;
    actionsShown = kind;
    if (kind === 'cancel') {
      replace(actionsHost, h('button', { class: 'btn btn--secondary btn--danger-text', type: 'button', onClick: (event) => cancelRun(event.currentTarget) }, icon('x', { size: 16 }), 'Cancel run'));
    } else if (kind === 'retry') {
      replace(actionsHost, h('button', { class: 'btn btn--primary', type: 'button', onClick: (event) => retryRun(event.currentTarget) }, icon('refresh', { size: 16 }), 'Retry run'));
    } else {
      replace(actionsHost);
    }
  }

  let checkpointChecks = 0;
  async function loadAudit() {
    try {
      const audit = await ctx.api.get(`${path}/audit`);
      if (!ctx.active) return;
      const ended = !LIVE_STATUSES.has(run.status);
      const print = JSON.stringify([audit.chain, audit.logs.length]);
      if (print !== lastAudit) {
        lastAudit = print;
        replace(auditHost, auditView(audit, runId, ctx, ended));
      }
      // A run's checkpoint is written within a minute of its end: look again a few times.
      if (ended && !audit.chain.checkpoint && checkpointChecks < 6) {
        checkpointChecks += 1;
        setTimeout(() => ctx.active && loadAudit(), 20_000);
      }
    } catch (error) {
      if (!ctx.active || error.code === 'SESSION_EXPIRED') return;
      replace(auditHost, errorState(error, loadAudit));
    }
  }

  async function loadResult() {
    if (run.status === 'failed' || run.status === 'cancelled') {
      resultLoaded = false;
      const why = run.status === 'failed' ? 'The run failed' : 'The run was cancelled';
      replace(resultHost, emptyState({ title: 'No result', text: `${why} before its last stage completed.`, iconName: 'x' }));
      return;
    }
    if (run.status !== 'completed') {
      resultLoaded = false;
      replace(resultHost, h('div', { class: 'state state--waiting' }, h('span', { class: 'spinner', 'aria-hidden': 'true' }), h('p', null, 'The result appears when the run completes.')));
      return;
    }
    if (resultLoaded) return;
    try {
      const result = await ctx.api.get(`${path}/result`);
      if (!ctx.active) return;
      resultLoaded = true;
      replace(resultHost, h('div', { class: 'result' }, h('div', { class: 'result__actions' }, copyButton(() => JSON.stringify(result.output, null, 2), 'Copy result')), jsonView(result.output, { label: 'Final result', filename: `${runId}-result.json` })));
    } catch (error) {
      if (!ctx.active || error.code === 'SESSION_EXPIRED') return;
      replace(resultHost, errorState(error, loadResult));
    }
  }

  // Polling. Every read of the run is numbered and only the newest is shown, so a poll that
  // was in flight when a cancel or retry answered cannot bring back the state before it.
  let polling = false;
  let timer = null;
  let clock = null;
  let delay = POLL_MIN_MS;
  let reads = 0;

  /** The run as the API has it now, or null when a newer read was started meanwhile. */
  async function readRun() {
    const mine = ++reads;
    const next = await ctx.api.get(path);
    return mine === reads && ctx.active ? next : null;
  }

  function schedule(ms) {
    clearTimeout(timer);
    timer = setTimeout(tick, ms);
  }

  function watch() {
    if (!live()) return;
    polling = true;
    delay = POLL_MIN_MS;
    schedule(delay);
    clock ||= setInterval(() => live() && drawSummary(), 1000);
  }

  function stopWatching() {
    polling = false;
    clearTimeout(timer);
    clearInterval(clock);
    clock = null;
  }
  ctx.onCleanup(stopWatching);

  /** Show `next`; when the run has just ended, say how (unless `quiet`: the page's own
   * cancel already did). Returns whether anything changed. */
  function show(next, { quiet = sending } = {}) {
    const wasLive = live();
    const statusChanged = next.status !== run.status;
    const print = fingerprint(next);
    const changed = print !== lastPrint;
    run = next;
    lastPrint = print;
    if (changed) {
      if (!userPicked) selected = defaultStage(run);
      graph.update(graphStages(run));
      graph.select(selected);
      drawStage();
      replace(stagesHost, stageTable(run, selected, select));
      loadAudit();
    }
    drawSummary();
    // A retried run may have completed (or failed again) before this page read it again.
    if (statusChanged) loadResult();
    if (live()) {
      if (!wasLive) watch();
      return changed;
    }
    stopWatching();
    if (wasLive) {
      if (!quiet) {
        const ended = { completed: ['completed', 'success'], failed: ['failed', 'error'], cancelled: ['was cancelled', 'warning'] }[run.status];
        if (ended) toast(`${run.workflowName} ${ended[0]}`, ended[1]);
      }
    }
    return changed;
  }

  async function tick() {
    let next;
    try {
      next = await readRun();
    } catch (error) {
      if (!ctx.active || error.code === 'SESSION_EXPIRED' || !polling) return;
      drawSummary(true);
      delay = Math.min(delay * 2, POLL_MAX_MS);
      schedule(delay);
      return;
    }
    if (!next || !polling) return; // a newer read shows the run (and schedules what follows)
    const changed = show(next);
    if (polling) {
      delay = changed ? POLL_MIN_MS : Math.min(delay * 1.6, POLL_MAX_MS);
      schedule(delay);
    }
  }

  /** Read the run again at once (after a cancel or retry, or a 409 saying it moved on). */
  async function reload() {
    clearTimeout(timer); // no poll starts meanwhile (one in flight is outdated by this read)
    try {
      const next = await readRun();
      if (next) show(next);
    } catch (error) {
      if (!ctx.active || error.code === 'SESSION_EXPIRED') return;
      toast(`Could not reload the run: ${error.message}`, 'error');
    }
    if (polling && ctx.active) schedule(delay);
  }

  /** Confirm, then POST `action`; a 409 (the run moved on meanwhile) is said and shown. */
  async function control(button, { action, dialog, busyLabel, done }) {
    acting = true;
    try {
      if (!(await confirmDialog({ ...dialog, signal: ctx.signal })) || !ctx.active) return;
      setBusy(button, true, busyLabel);
      sending = true;
      let answer;
      try {
        answer = await ctx.api.post(`${path}/${action}`);
      } catch (error) {
        if (!ctx.active || error.code === 'SESSION_EXPIRED') return;
        toast(error.message, error.status === 409 ? 'warning' : 'error');
        if (error.status === 409) await reload();
        return;
      }
      if (!ctx.active) return;
      toast(done(answer), 'success');
      await reload();
    } finally {
      acting = false;
      sending = false;
      actionsShown = null; // the button may still be busy: draw it afresh
      if (ctx.active) drawActions();
    }
  }

  function cancelRun(button) {
    return control(button, {
      action: 'cancel',
      busyLabel: 'Cancelling…',
      dialog: {
        title: 'Cancel this run?',
        message: 'Stages that have not started are cancelled and no agent is called for this run again. A stage already running finishes, but its output is discarded. You can retry the run later.',
        confirmLabel: 'Cancel run',
        cancelLabel: 'Keep running',
        danger: true,
      },
      done: (answer) => `Run cancelled${answer.stagesCancelled?.length ? `: ${plural(answer.stagesCancelled.length, 'stage')} will not run` : ''}`,
    });
  }

  function retryRun(button) {
    return control(button, {
      action: 'retry',
      busyLabel: 'Retrying…',
      dialog: {
        title: 'Retry this run?',
        message: 'Completed stages keep their outputs; every other stage runs again from the start, under the same run and audit trail.',
        confirmLabel: 'Retry run',
      },
      done: (answer) => `Run retried${answer.stagesRequeued?.length ? `: ${plural(answer.stagesRequeued.length, 'stage')} queued again` : ''}`,
    });
  }

  replace(
    body,
    pageHeader(run.workflowName, {
      crumbs: [h('a', { href: '#/workflows' }, 'Workflows'), h('span', { 'aria-hidden': 'true' }, ' / '), h('span', { class: 'mono' }, run.workflowRunId)],
      actions: [statusHost, actionsHost],
    }),
    h('section', { class: 'card run-summary', 'aria-label': 'Summary' }, progressHost, factsHost),
    alertHost,
    card('Pipeline', [graphHost, dagLegend()], {
      className: 'card--graph',
      actions: h('span', { class: 'card__hint' }, 'Select a stage to see its data'),
    }),
    h(
      'div',
      { class: 'run-grid' },
      card('Stage', stageHost, { className: 'run-grid__stage' }),
      card('Result', resultHost, { className: 'run-grid__result' }),
    ),
    card('Stages', stagesHost, { className: 'card--table' }),
    card('Audit trail', auditHost, { id: 'audit' }),
  );

  drawSummary();
  drawGraph();
  drawStage();
  replace(stagesHost, stageTable(run, selected, select));
  loadResult();
  loadAudit();
  const onResize = () => drawGraph();
  narrow.addEventListener('change', onResize);
  ctx.onCleanup(() => narrow.removeEventListener('change', onResize));
  // Poll while the run is live: quickly while things change, backing off while they don't.
  watch();
}

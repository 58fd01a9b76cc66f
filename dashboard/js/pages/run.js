// Run detail: the stage graph lighting up live, each stage's data, the result, the audit chain.
import { h, replace } from '../dom.js';
import { icon } from '../icons.js';
import {
  alertBox,
  badge,
  card,
  copyButton,
  emptyState,
  errorState,
  jsonView,
  liveDot,
  loadingState,
  pageHeader,
  progressBar,
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
} from '../format.js';

const POLL_MIN_MS = 400;
const WAITING_INPUT = {
  pending: 'Resolved when its dependencies complete.',
  queued: 'Resolved when the stage starts.',
  waiting: 'Resolved when an agent has a free slot.',
  in_progress: 'Recorded when the stage finishes.',
};
const POLL_MAX_MS = 5000;
const NARROW = '(max-width: 720px)';
const ACTIONS = {
  submit: 'Submitted',
  execute: 'Executed',
  complete: 'Completed',
  fail: 'Failed',
  skip: 'Skipped',
  requeue: 'Re-queued',
  retry: 'Retried',
  fallback: 'Fell back',
  wait: 'Waited for a slot',
};

function graphStages(run) {
  return run.stages.map((stage) => ({ ...stage, id: stage.stageId }));
}

function fingerprint(run) {
  return JSON.stringify([run.status, run.errorMessage, run.stages.map((s) => [s.status, s.attempt, s.agentId, s.completedAt])]);
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

function stagePanel(stage, { onTab, tab }) {
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
        ? jsonView(stage.output, { label: `Output of ${stage.stageId}` })
        : h('p', { class: 'muted' }, 'No output.')
      : stage.input !== null && stage.input !== undefined
        ? jsonView(stage.input, { label: `Input of ${stage.stageId}` })
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
          const blob = new Blob([JSON.stringify(bundle, null, 2)], { type: 'application/json' });
          const url = URL.createObjectURL(blob);
          const link = h('a', { href: url, download: `${runId}-audit.json`, class: 'sr-only' });
          document.body.append(link);
          link.click();
          link.remove();
          setTimeout(() => URL.revokeObjectURL(url), 10_000);
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
              h('strong', null, ACTIONS[entry.action] || entry.action),
              entry.stageId ? h('span', null, ' stage ', h('code', { class: 'mono' }, entry.stageId)) : h('span', null, ' run'),
              entry.agentId ? h('span', { class: 'muted' }, ' by ', h('code', { class: 'mono' }, entry.agentId)) : null,
              h('time', { class: 'audit__time', datetime: entry.loggedAt, title: formatDateTime(entry.loggedAt) }, formatClock(entry.loggedAt)),
            ),
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

export async function runPage(ctx) {
  const [runId] = ctx.params;
  const body = h('div', null, loadingState('Loading the run…', 5));
  ctx.root.append(body);

  let run;
  try {
    run = await ctx.api.get(`/workflows/${encodeURIComponent(runId)}`);
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
  const narrow = window.matchMedia(NARROW);

  const statusHost = h('div', { class: 'run-status' });
  const progressHost = h('div', { class: 'run-progress' });
  const factsHost = h('dl', { class: 'facts facts--inline' });
  const alertHost = h('div', { 'data-testid': 'run-error' });
  const graphHost = h('div', { class: 'graph-host' });
  const stageHost = h('div');
  const stagesHost = h('div');
  const resultHost = h('div', { 'data-testid': 'run-result' });
  const auditHost = h('div', null, loadingState('Loading the audit trail…', 2));
  let graph = null;

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

  function drawSummary(live, reconnecting) {
    const progress = run.progress;
    document.title = `${run.workflowName} · ${statusLabel(run.status)} · MAOF`;
    replace(
      statusHost,
      live ? liveDot(reconnecting ? 'Reconnecting…' : 'Live') : null,
      h('span', { 'data-testid': 'run-status' }, badge(run.status, { large: true })),
    );
    replace(
      progressHost,
      progressBar(progress, { label: `${progress.completed} of ${progress.total} stages completed` }),
      h('span', { class: 'run-progress__text' }, `${progress.completed} of ${progress.total} stages completed${progress.failed ? `, ${progress.failed} failed` : ''}`),
    );
    const end = run.completedAt || (LIVE_STATUSES.has(run.status) ? new Date().toISOString() : null);
    replace(
      factsHost,
      fact('Created', h('time', { datetime: run.createdAt, title: formatDateTime(run.createdAt) }, timeAgo(run.createdAt))),
      fact('Started', timeValue(run.startedAt)),
      fact('Finished', timeValue(run.completedAt)),
      fact('Duration', run.startedAt && end ? formatDuration(durationBetween(run.startedAt, end)) : '—', 'run-duration'),
    );
    replace(
      alertHost,
      run.status === 'failed'
        ? alertBox('error', run.errorMessage || 'A stage failed.', { title: 'This run failed' })
        : null,
    );
  }

  let checkpointChecks = 0;
  async function loadAudit() {
    try {
      const audit = await ctx.api.get(`/workflows/${encodeURIComponent(runId)}/audit`);
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
    if (run.status === 'failed') {
      replace(resultHost, emptyState({ title: 'No result', text: 'The run failed before its last stage completed.', iconName: 'x' }));
      return;
    }
    if (run.status !== 'completed') {
      replace(resultHost, h('div', { class: 'state state--waiting' }, h('span', { class: 'spinner', 'aria-hidden': 'true' }), h('p', null, 'The result appears when the run completes.')));
      return;
    }
    if (resultLoaded) return;
    try {
      const result = await ctx.api.get(`/workflows/${encodeURIComponent(runId)}/result`);
      if (!ctx.active) return;
      resultLoaded = true;
      replace(resultHost, h('div', { class: 'result' }, h('div', { class: 'result__actions' }, copyButton(() => JSON.stringify(result.output, null, 2), 'Copy result')), jsonView(result.output, { label: 'Final result' })));
    } catch (error) {
      if (!ctx.active || error.code === 'SESSION_EXPIRED') return;
      replace(resultHost, errorState(error, loadResult));
    }
  }

  replace(
    body,
    pageHeader(run.workflowName, {
      crumbs: [h('a', { href: '#/workflows' }, 'Workflows'), h('span', { 'aria-hidden': 'true' }, ' / '), h('span', { class: 'mono' }, run.workflowRunId)],
      actions: statusHost,
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

  const live = () => LIVE_STATUSES.has(run.status);
  drawSummary(live());
  drawGraph();
  drawStage();
  replace(stagesHost, stageTable(run, selected, select));
  loadResult();
  loadAudit();
  const onResize = () => drawGraph();
  narrow.addEventListener('change', onResize);
  ctx.onCleanup(() => narrow.removeEventListener('change', onResize));

  if (!live()) return;

  // Poll while the run is live: quickly while things change, backing off while they don't.
  let delay = POLL_MIN_MS;
  let timer = null;
  const clock = setInterval(() => live() && drawSummary(true), 1000);
  ctx.onCleanup(() => {
    clearTimeout(timer);
    clearInterval(clock);
  });
  const tick = async () => {
    let next;
    try {
      next = await ctx.api.get(`/workflows/${encodeURIComponent(runId)}`);
    } catch (error) {
      if (!ctx.active || error.code === 'SESSION_EXPIRED') return;
      drawSummary(true, true);
      delay = Math.min(delay * 2, POLL_MAX_MS);
      timer = setTimeout(tick, delay);
      return;
    }
    if (!ctx.active) return;
    const print = fingerprint(next);
    const changed = print !== lastPrint;
    run = next;
    lastPrint = print;
    if (changed) {
      if (!userPicked) selected = defaultStage(run);
      drawSummary(live());
      graph.update(graphStages(run));
      graph.select(selected);
      drawStage();
      replace(stagesHost, stageTable(run, selected, select));
      loadAudit();
      delay = POLL_MIN_MS;
    } else {
      delay = Math.min(delay * 1.6, POLL_MAX_MS);
    }
    if (live()) {
      timer = setTimeout(tick, delay);
      return;
    }
    clearInterval(clock);
    drawSummary(false);
    loadResult();
    loadAudit();
    toast(
      run.status === 'completed' ? `${run.workflowName} completed` : `${run.workflowName} failed`,
      run.status === 'completed' ? 'success' : 'error',
    );
  };
  timer = setTimeout(tick, delay);
}

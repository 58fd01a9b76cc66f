// New workflow: edit a JSON or YAML definition and input, set a deadline and a completion
// callback, check it here and with the API, run it (once, however often it is sent).
import { drafts } from '../api.js';
import { h, replace, debounce } from '../dom.js';
import { icon } from '../icons.js';
import { alertBox, card, field, pageHeader, setBusy, showFieldErrors, toast } from '../components.js';
import { renderDag } from '../dag.js';
import { characterCount } from '../format.js';
import { DEADLINE_MAX_MS, DEADLINE_MIN_MS, checkWorkflow, describeField, parseJson } from '../workflow-check.js';

const TEMPLATES = [
  {
    key: 'linear',
    label: 'Extract → translate → summarize',
    workflow: {
      name: 'extract-translate-summarize',
      stages: [
        { id: 'extract', name: 'Extract key points', agentCapability: 'text-generation' },
        {
          id: 'translate',
          name: 'Translate to Spanish',
          agentCapability: 'translation',
          dependencies: ['extract'],
          input: { text: '${extract.output.result}', to: '${workflow.input.language}' },
        },
        { id: 'summarize', name: 'Summarize', agentCapability: 'summarization', dependencies: ['translate'] },
      ],
    },
    input: { text: 'MAOF routes each stage of a pipeline to an agent with the right capability.', language: 'es' },
  },
  {
    key: 'diamond',
    label: 'Fan out and fan in',
    workflow: {
      name: 'research-brief',
      stages: [
        { id: 'research', name: 'Research the topic', agentCapability: 'text-generation' },
        { id: 'translate', name: 'Translate findings', agentCapability: 'translation', dependencies: ['research'] },
        { id: 'summarize', name: 'Summarize findings', agentCapability: 'summarization', dependencies: ['research'] },
        {
          id: 'brief',
          name: 'Write the brief',
          agentCapability: 'text-generation',
          dependencies: ['translate', 'summarize'],
          input: { translated: '${translate.output.result}', summary: '${summarize.output.result}' },
        },
      ],
    },
    input: { topic: 'Serverless agent orchestration' },
  },
  {
    key: 'single',
    label: 'A single stage',
    workflow: { name: 'one-step', stages: [{ id: 'summarize', name: 'Summarize', agentCapability: 'summarization' }] },
    input: { text: 'Paste some text to summarize.' },
  },
];

const pretty = (value) => JSON.stringify(value, null, 2);
// The API's limits on a callback's secret (characters).
const SECRET_MIN = 16;
const SECRET_MAX = 1024;

/** A fresh Idempotency-Key (crypto.randomUUID needs a secure context; the fallback does not). */
function newIdempotencyKey() {
  if (typeof crypto.randomUUID === 'function') return crypto.randomUUID();
  return Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, '0')).join('');
}

function clearFieldError(el) {
  if (!el?.classList.contains('field--invalid')) return;
  el.classList.remove('field--invalid');
  el.querySelector('.field__error').textContent = '';
  el.querySelector('input, select')?.removeAttribute('aria-invalid');
}

function loadDraft() {
  return drafts.load() || { definition: pretty(TEMPLATES[0].workflow), input: pretty(TEMPLATES[0].input) };
}

export async function newWorkflowPage(ctx) {
  const draft = loadDraft();
  const definitionEditor = h('textarea', {
    class: 'input code-editor',
    id: 'workflow-definition',
    name: 'definition',
    rows: 20,
    wrap: 'off',
    spellcheck: 'false',
    autocapitalize: 'off',
    autocomplete: 'off',
    'data-testid': 'definition-editor',
    'aria-describedby': 'definition-help',
    value: draft.definition,
  });
  const inputEditor = h('textarea', {
    class: 'input code-editor',
    id: 'workflow-input',
    name: 'input',
    rows: 6,
    wrap: 'off',
    spellcheck: 'false',
    autocapitalize: 'off',
    autocomplete: 'off',
    'data-testid': 'input-editor',
    'aria-describedby': 'input-help',
    value: draft.input,
  });
  const messages = h('div', { class: 'checks', 'data-testid': 'workflow-messages', 'aria-live': 'polite' });
  const previewHost = h('div', { class: 'graph-host graph-host--preview' });
  const summaryHost = h('div', { class: 'preview-summary' });
  const capabilityHost = h('div', { class: 'capabilities' });
  const validateButton = h('button', { class: 'btn btn--secondary', type: 'button' }, icon('check'), 'Validate');
  const runButton = h('button', { class: 'btn btn--primary btn--large', type: 'submit' }, icon('play'), 'Run workflow');
  const templateSelect = h(
    'select',
    { class: 'input input--small', id: 'workflow-template', 'aria-label': 'Start from a template' },
    h('option', { value: '' }, 'Start from a template…'),
    TEMPLATES.map((t) => h('option', { value: t.key }, t.label)),
  );
  const formatButton = h('button', { class: 'btn btn--ghost btn--small', type: 'button' }, icon('wand', { size: 15 }), 'Format JSON');

  // Run options. Their names are the API's field paths, so its 400 details land on them.
  // The secret is never saved with the draft.
  const deadlineInput = h('input', {
    class: 'input input--deadline',
    id: 'field-workflow.timeoutMs',
    name: 'workflow.timeoutMs',
    type: 'number',
    min: '0',
    step: 'any',
    inputmode: 'decimal',
    placeholder: 'none',
    'aria-describedby': 'deadline-help',
  });
  const deadlineUnit = h(
    'select',
    { class: 'input input--small', id: 'deadline-unit', 'aria-label': 'Deadline unit' },
    h('option', { value: 's' }, 'seconds'),
    h('option', { value: 'ms' }, 'milliseconds'),
  );
  const deadlineField = h(
    'div',
    { class: 'field', 'data-field': 'workflow.timeoutMs' },
    h('label', { class: 'field__label', for: deadlineInput.id }, 'Deadline'),
    h('div', { class: 'input-group' }, deadlineInput, deadlineUnit),
    h('p', { class: 'field__hint', id: 'deadline-help' }, 'The run fails if it has not ended this long after it is submitted (or retried): 100 ms to 24 hours. Sent as workflow.timeoutMs, in place of one in the definition.'),
    h('p', { class: 'field__error', id: `${deadlineInput.id}-error`, 'aria-live': 'polite' }),
  );
  const callbackUrlField = field({
    label: 'Callback URL',
    name: 'callback.url',
    type: 'url',
    hint: "MAOF POSTs the run's outcome here when it ends, signed with the secret (HMAC-SHA256).",
    attrs: { placeholder: 'https://example.com/hooks/maof', autocomplete: 'off', spellcheck: 'false', inputmode: 'url' },
  });
  const callbackSecretField = field({
    label: 'Callback secret',
    name: 'callback.secret',
    type: 'password',
    hint: `${SECRET_MIN} to ${SECRET_MAX.toLocaleString('en')} characters; the API never shows it again. Give both the URL and the secret, or neither.`,
    attrs: { autocomplete: 'new-password', spellcheck: 'false' },
  });
  const callbackUrl = callbackUrlField.querySelector('input');
  const callbackSecret = callbackSecretField.querySelector('input');
  const options = h(
    'fieldset',
    { class: 'editor__options' },
    h('legend', { class: 'editor__legend' }, 'Run options ', h('span', { class: 'muted' }, '(optional)')),
    deadlineField,
    callbackUrlField,
    callbackSecretField,
  );

  const form = h(
    'form',
    { class: 'editor', novalidate: true, 'aria-label': 'Workflow editor' },
    h('div', { class: 'editor__toolbar' }, templateSelect, formatButton),
    h(
      'div',
      { class: 'field' },
      h('label', { class: 'field__label', for: 'workflow-definition' }, 'Workflow definition'),
      h('p', { class: 'field__hint', id: 'definition-help' }, 'JSON or YAML: {"name", "stages": [{"id", "name", "agentCapability", "dependencies"?, "input"?}]}. Pasting a whole request body {"workflow", "input"} works too.'),
      definitionEditor,
    ),
    h(
      'div',
      { class: 'field' },
      h('label', { class: 'field__label', for: 'workflow-input' }, 'Input'),
      h('p', { class: 'field__hint', id: 'input-help' }, 'JSON or YAML given to the first stages, and to ${workflow.input.…} references. Optional.'),
      inputEditor,
    ),
    options,
    messages,
    h('div', { class: 'editor__actions' }, validateButton, runButton),
  );

  ctx.root.append(
    pageHeader('New workflow', {
      subtitle: 'Paste or edit a definition, check it, then run it and watch it live.',
      crumbs: [h('a', { href: '#/workflows' }, 'Workflows'), h('span', { 'aria-hidden': 'true' }, ' / '), h('span', null, 'New')],
    }),
    h(
      'div',
      { class: 'new-grid' },
      card('Definition', form, { className: 'new-grid__editor' }),
      h('div', { class: 'new-grid__side' }, card('Preview', [summaryHost, previewHost, capabilityHost], { className: 'card--graph' })),
    ),
  );

  const capabilityCache = new Map();
  const saveDraft = () => drafts.save({ definition: definitionEditor.value, input: inputEditor.value });

  /** Parse both editors; returns {workflow, input, errors, stages}. */
  function read() {
    const errors = [];
    const parsedDefinition = parseJson(definitionEditor.value, 'workflow');
    const parsedInput = parseJson(inputEditor.value, 'input');
    if (parsedDefinition.error) errors.push({ ...parsedDefinition.error, field: 'workflow' });
    if (parsedInput.error) errors.push(parsedInput.error);
    let workflow = parsedDefinition.value;
    let input = parsedInput.value;
    if (parsedDefinition.empty) errors.push({ field: 'workflow', message: 'Paste or write a workflow definition' });
    // A whole request body pasted into the definition: split it into the two editors.
    if (workflow && typeof workflow === 'object' && 'workflow' in workflow && !('stages' in workflow)) {
      const body = workflow;
      workflow = body.workflow;
      definitionEditor.value = pretty(workflow);
      if ('input' in body) {
        input = body.input;
        inputEditor.value = pretty(input);
        errors.splice(0, errors.length, ...errors.filter((e) => e.field !== 'input'));
      }
      if (body.callback && typeof body.callback === 'object') {
        callbackUrl.value = typeof body.callback.url === 'string' ? body.callback.url : '';
        callbackSecret.value = typeof body.callback.secret === 'string' ? body.callback.secret : '';
      }
    }
    let stages = [];
    if (!parsedDefinition.error && !parsedDefinition.empty) {
      const checked = checkWorkflow(workflow);
      errors.push(...checked.errors);
      stages = checked.stages;
    }
    definitionEditor.toggleAttribute('aria-invalid', errors.some((e) => e.field.startsWith('workflow')));
    inputEditor.toggleAttribute('aria-invalid', errors.some((e) => e.field === 'input'));
    return { workflow, input, errors, stages };
  }

  /** The deadline (ms) and the callback from their fields; returns {timeoutMs, callback, errors}. */
  function readOptions() {
    const errors = [];
    const add = (fieldPath, message) => errors.push({ field: fieldPath, message });
    let timeoutMs;
    const raw = deadlineInput.value.trim();
    if (deadlineInput.validity.badInput) add('workflow.timeoutMs', 'must be a number');
    else if (raw) {
      const value = Number(raw);
      const ms = deadlineUnit.value === 's' ? Math.round(value * 1000) : value;
      if (!Number.isFinite(value) || value <= 0) add('workflow.timeoutMs', 'must be a positive number');
      else if (!Number.isInteger(ms)) add('workflow.timeoutMs', 'must be a whole number of milliseconds');
      else if (ms < DEADLINE_MIN_MS || ms > DEADLINE_MAX_MS) add('workflow.timeoutMs', 'must be from 100 ms to 24 hours');
      else timeoutMs = ms;
    }
    let callback;
    const url = callbackUrl.value.trim();
    const secret = callbackSecret.value;
    if (url || secret) {
      if (!url) add('callback.url', 'Give the URL to send the outcome to, or clear the secret');
      else {
        let parsed = null;
        try {
          parsed = new URL(url);
        } catch {
          /* reported below */
        }
        if (!parsed || !['http:', 'https:'].includes(parsed.protocol)) add('callback.url', 'must be an http:// or https:// URL');
      }
      const length = characterCount(secret);
      if (!secret) add('callback.secret', 'Give a secret to sign the callback with, or clear the URL');
      else if (length < SECRET_MIN || length > SECRET_MAX) {
        add('callback.secret', `must be ${SECRET_MIN} to ${SECRET_MAX.toLocaleString('en')} characters (this one has ${length})`);
      }
      if (!errors.some((e) => e.field.startsWith('callback.'))) callback = { url, secret };
    }
    return { timeoutMs, callback, errors };
  }

  function showErrors(title, errors, workflow) {
    replace(
      messages,
      alertBox('error', title, {
        details: errors.map((e) => ({ field: describeField(e.field, workflow), message: e.message })),
      }),
    );
  }

  async function showCapabilities(stages) {
    const wanted = [...new Set(stages.map((s) => s.agentCapability).filter(Boolean))];
    if (!wanted.length) {
      replace(capabilityHost);
      return;
    }
    const results = await Promise.all(
      wanted.map(async (capability) => {
        if (!capabilityCache.has(capability)) {
          capabilityCache.set(
            capability,
            ctx.api.get('/agents', { capability, limit: 1 }).then((d) => d.meta.total).catch(() => null),
          );
        }
        return [capability, await capabilityCache.get(capability)];
      }),
    );
    if (!ctx.active) return;
    replace(
      capabilityHost,
      h('h3', { class: 'capabilities__title' }, 'Agents for each capability'),
      h(
        'ul',
        { class: 'capabilities__list' },
        results.map(([capability, count]) =>
          h(
            'li',
            { class: ['capabilities__item', count === 0 && 'capabilities__item--missing'], 'data-capability': capability },
            icon(count === 0 ? 'alert' : 'check', { size: 15 }),
            h('code', { class: 'mono' }, capability),
            h(
              'span',
              { class: 'capabilities__count' },
              count === null ? 'unknown' : count === 0 ? 'no agent — stages needing it will fail' : `${count} agent${count === 1 ? '' : 's'}`,
            ),
          ),
        ),
      ),
    );
  }

  function preview() {
    const { errors, stages, workflow } = read();
    saveDraft();
    if (stages.length) {
      const narrow = previewHost.clientWidth && previewHost.clientWidth < 520;
      replace(previewHost, renderDag(stages.map((s) => ({ ...s, status: 'pending' })), { orientation: narrow ? 'tb' : 'lr', label: 'Preview of the stages' }).element);
    } else {
      replace(previewHost, h('div', { class: 'state state--empty' }, h('p', { class: 'state__text' }, 'The stage graph appears here.')));
    }
    replace(
      summaryHost,
      errors.length
        ? h('p', { class: 'preview-summary__text preview-summary__text--bad' }, icon('alert', { size: 15 }), `${errors.length} problem${errors.length === 1 ? '' : 's'} to fix`)
        : h('p', { class: 'preview-summary__text preview-summary__text--good' }, icon('check', { size: 15 }), `${workflow.name}: ${stages.length} stage${stages.length === 1 ? '' : 's'}, ready to run`),
    );
    showCapabilities(stages);
    return { errors, workflow };
  }

  const validate = () => {
    const { errors, workflow } = preview();
    const checked = readOptions();
    showFieldErrors(options, checked.errors);
    if (errors.length) {
      showErrors('Fix these before running:', errors, workflow);
      return false;
    }
    if (checked.errors.length) {
      replace(messages, alertBox('error', 'Fix the run options marked above.'));
      return false;
    }
    replace(messages, alertBox('success', 'The definition is valid.'));
    return true;
  };

  // Messages describe what was checked or sent; an edit makes them stale at once.
  const refreshPreview = debounce(preview, 250);
  for (const editor of [definitionEditor, inputEditor]) {
    editor.addEventListener('input', () => {
      messages.replaceChildren();
      refreshPreview();
    });
  }
  templateSelect.addEventListener('change', () => {
    const template = TEMPLATES.find((t) => t.key === templateSelect.value);
    if (!template) return;
    definitionEditor.value = pretty(template.workflow);
    inputEditor.value = pretty(template.input);
    templateSelect.value = '';
    messages.replaceChildren();
    preview();
  });
  formatButton.addEventListener('click', () => {
    const { errors } = read();
    for (const editor of [definitionEditor, inputEditor]) {
      const parsed = parseJson(editor.value, editor.name);
      if (!parsed.error && !parsed.empty) editor.value = pretty(parsed.value);
    }
    if (errors.some((e) => e.line)) validate();
    preview();
  });
  validateButton.addEventListener('click', validate);

  // One Idempotency-Key per submission: sending the same form again (a double click, a retry
  // after the answer was lost) gets the run the first request made, never a second one. Any
  // change to the form makes it a new submission.
  let submissionKey = null;
  let submitting = false;
  const newSubmission = () => {
    submissionKey = null;
  };
  form.addEventListener('input', newSubmission);
  form.addEventListener('change', newSubmission);
  options.addEventListener('input', (event) => clearFieldError(event.target.closest('.field')));

  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    if (submitting) return;
    const { errors, workflow, input } = read();
    const chosen = readOptions();
    showFieldErrors(options, chosen.errors);
    if (errors.length) {
      showErrors('Fix these before running:', errors, workflow);
      definitionEditor.focus();
      return;
    }
    if (chosen.errors.length) {
      replace(messages, alertBox('error', 'Fix the run options marked above.'));
      return;
    }
    messages.replaceChildren();
    submitting = true;
    setBusy(runButton, true, 'Submitting…');
    submissionKey ||= newIdempotencyKey();
    try {
      const body = { workflow: chosen.timeoutMs === undefined ? workflow : { ...workflow, timeoutMs: chosen.timeoutMs } };
      if (input !== undefined) body.input = input;
      if (chosen.callback) body.callback = chosen.callback;
      const accepted = await ctx.api.post('/workflows/execute', body, { headers: { 'Idempotency-Key': submissionKey } });
      toast('Workflow submitted — watch it run', 'success');
      ctx.navigate(`#/runs/${encodeURIComponent(accepted.workflowRunId)}`);
    } catch (error) {
      setBusy(runButton, false);
      if (error.code === 'SESSION_EXPIRED' || !ctx.active) return;
      showApiError(error, workflow);
    } finally {
      submitting = false;
    }
  });

  /** The API's refusal: details about the run options go under their fields (a timeoutMs
   * the deadline field did not set came from the definition), the rest to the messages. */
  function showApiError(error, workflow) {
    const details = error.details || [];
    const fromDefinition = (d) => d.field === 'workflow.timeoutMs' && !deadlineInput.value.trim();
    const unplaced = [
      ...details.filter(fromDefinition),
      ...showFieldErrors(options, details.filter((d) => !fromDefinition(d))),
    ];
    if (unplaced.length) showErrors(`The API refused this workflow: ${error.message}`, unplaced, workflow);
    else if (details.length) replace(messages, alertBox('error', `The API refused this workflow: ${error.message}`));
    else {
      const again = error.code === 'NETWORK_ERROR' || error.status >= 500 || error.status === 429;
      replace(
        messages,
        alertBox('error', again ? `${error.message} Sending it again is safe: it never makes a second run.` : error.message, { title: 'Could not submit' }),
      );
    }
  }

  preview();
}

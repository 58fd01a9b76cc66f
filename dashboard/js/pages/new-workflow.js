// New workflow: edit a JSON or YAML definition and input, check it here and with the API, run it.
import { h, replace, debounce } from '../dom.js';
import { icon } from '../icons.js';
import { alertBox, card, pageHeader, setBusy, toast } from '../components.js';
import { renderDag } from '../dag.js';
import { checkWorkflow, describeField, parseJson } from '../workflow-check.js';

const DRAFT_KEY = 'maof.draft';

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

function loadDraft() {
  try {
    const draft = JSON.parse(localStorage.getItem(DRAFT_KEY) || 'null');
    if (draft && typeof draft.definition === 'string' && typeof draft.input === 'string') return draft;
  } catch {
    /* a broken draft is no draft */
  }
  return { definition: pretty(TEMPLATES[0].workflow), input: pretty(TEMPLATES[0].input) };
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
  const saveDraft = () => localStorage.setItem(DRAFT_KEY, JSON.stringify({ definition: definitionEditor.value, input: inputEditor.value }));

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
    if (errors.length) {
      showErrors('Fix these before running:', errors, workflow);
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
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    const { errors, workflow, input } = read();
    if (errors.length) {
      showErrors('Fix these before running:', errors, workflow);
      definitionEditor.focus();
      return;
    }
    messages.replaceChildren();
    setBusy(runButton, true, 'Submitting…');
    try {
      const body = { workflow };
      if (input !== undefined) body.input = input;
      const accepted = await ctx.api.post('/workflows/execute', body);
      toast('Workflow submitted — watch it run', 'success');
      ctx.navigate(`#/runs/${encodeURIComponent(accepted.workflowRunId)}`);
    } catch (error) {
      setBusy(runButton, false);
      if (error.code === 'SESSION_EXPIRED' || !ctx.active) return;
      if (error.details?.length) showErrors(`The API refused this workflow: ${error.message}`, error.details, workflow);
      else replace(messages, alertBox('error', error.message, { title: 'Could not submit' }));
    }
  });

  preview();
}

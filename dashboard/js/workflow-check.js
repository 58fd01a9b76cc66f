// Client-side checks of a workflow definition: the API's own rules, reported the API's way
// ({field, message} with fields like `workflow.stages.1.dependencies`).
import { JSON_SCHEMA, load as loadYaml } from '../vendor/js-yaml.js';
import { characterCount } from './format.js';

const STAGE_ID = /^[A-Za-z0-9_-]+$/;
const CAPABILITY = /^[a-z0-9]+(?:[-.][a-z0-9]+)*$/;
const REFERENCE = /\$\{([^${}]+)\}/g;
const REFERENCE_FORMS = '${workflow.input.<path>} or ${<stageId>.output.<path>}';
const STAGE_FIELDS = new Set(['id', 'name', 'agentCapability', 'dependencies', 'input', 'config']);
const WORKFLOW_FIELDS = new Set(['name', 'stages', 'timeoutMs']);
// A run's deadline (workflow.timeoutMs): 100 ms to 24 hours, as the API allows.
export const DEADLINE_MIN_MS = 100;
export const DEADLINE_MAX_MS = 24 * 3600 * 1000;

/** Parse JSON or YAML text (YAML when it does not start like JSON); on failure say where
 * (line and column) in `label`. A number JSON cannot write (NaN, an infinity) is an error
 * too: the API refuses it, and JSON.stringify would send it as null. */
export function parseJson(text, label) {
  const parsed = parseText(text, label);
  const error = parsed.error ? null : nonFiniteNumber(parsed.value, label);
  return error ? { error } : parsed;
}

function parseText(text, label) {
  if (!text.trim()) return { value: undefined, empty: true };
  const trimmed = text.trim();
  if (!trimmed.startsWith('{') && !trimmed.startsWith('[') && !trimmed.startsWith('"')) {
    return parseYaml(text, label);
  }
  try {
    return { value: JSON.parse(text) };
  } catch (error) {
    const message = String(error.message || error);
    let line = null;
    let column = null;
    const lineMatch = message.match(/line (\d+) column (\d+)/);
    const position = message.match(/position (\d+)/);
    if (lineMatch) {
      line = Number(lineMatch[1]);
      column = Number(lineMatch[2]);
    } else if (position) {
      const before = text.slice(0, Number(position[1])).split('\n');
      line = before.length;
      column = before[before.length - 1].length + 1;
    }
    const where = line ? ` (line ${line}, column ${column})` : '';
    const reason = message.replace(/^JSON\.parse: /, '').replace(/ in JSON at position \d+.*$/, '');
    return { error: { field: label, message: `Not valid JSON${where}: ${reason}`, line, column } };
  }
}

function parseYaml(text, label) {
  try {
    // The JSON schema: no custom tags, no surprises (yes/no stay strings).
    return { value: loadYaml(text, { schema: JSON_SCHEMA }), yaml: true };
  } catch (error) {
    const mark = error.mark || {};
    const line = Number.isInteger(mark.line) ? mark.line + 1 : null;
    const column = Number.isInteger(mark.column) ? mark.column + 1 : null;
    const where = line ? ` (line ${line}, column ${column})` : '';
    const reason = String(error.reason || error.message || error);
    return { error: { field: label, message: `Not valid YAML${where}: ${reason}`, line, column } };
  }
}

/** An error naming the first number in `value` (in document order) that is NaN or
 * infinite, as JSON.parse reads 1e400 and YAML `.inf` and `.nan`; null when there is none.
 * Not recursive: as deep as the parsers go, with no stack to spare. */
function nonFiniteNumber(value, label) {
  const pending = [{ item: value, key: null, up: null }];
  while (pending.length) {
    const node = pending.pop();
    const { item } = node;
    if (typeof item === 'number' && !Number.isFinite(item)) {
      const path = [];
      for (let at = node; at.up; at = at.up) path.unshift(at.key);
      const number = Number.isNaN(item) ? 'NaN' : item > 0 ? 'Infinity' : '-Infinity';
      const where = path.length ? path.join('.') : 'the value';
      return { field: label, message: `${where} is ${number}, and JSON has no NaN or infinite numbers` };
    }
    if (item !== null && typeof item === 'object') {
      const entries = Object.entries(item); // arrays too, keyed by index
      // Pushed last first, so the first one in the document is the one named.
      for (let i = entries.length - 1; i >= 0; i -= 1) {
        pending.push({ item: entries[i][1], key: entries[i][0], up: node });
      }
    }
  }
  return null;
}

function isObject(value) {
  return value !== null && typeof value === 'object' && !Array.isArray(value);
}

/** Every `${...}` in a stage input as the API reads it (chalicelib/core/references.py):
 * {text, stageId} for a stage output; {text, path, malformed} for one of neither form, with
 * the keys and indexes down to its string (keys themselves are never references). */
function referencesIn(value, path = [], found = []) {
  if (typeof value === 'string') {
    for (const match of value.matchAll(REFERENCE)) {
      const parts = match[1].trim().split('.');
      if (parts.length >= 2 && parts[0] === 'workflow' && parts[1] === 'input') continue;
      if (parts.length >= 2 && parts[1] === 'output') found.push({ text: match[0], stageId: parts[0] });
      else found.push({ text: match[0], path, malformed: true });
    }
  } else if (Array.isArray(value)) {
    value.forEach((item, index) => referencesIn(item, [...path, String(index)], found));
  } else if (isObject(value)) {
    Object.entries(value).forEach(([key, item]) => referencesIn(item, [...path, key], found));
  }
  return found;
}

function findCycle(stages) {
  const deps = new Map(stages.map((stage) => [stage.id, stage.dependencies || []]));
  const state = new Map();
  const path = [];
  const visit = (node) => {
    state.set(node, 1);
    path.push(node);
    for (const dep of deps.get(node) || []) {
      if (!deps.has(dep)) continue;
      if (state.get(dep) === 1) return [...path.slice(path.indexOf(dep)), dep];
      if (!state.has(dep)) {
        const found = visit(dep);
        if (found) return found;
      }
    }
    path.pop();
    state.set(node, 2);
    return null;
  };
  for (const stage of stages) {
    if (!state.has(stage.id)) {
      const found = visit(stage.id);
      if (found) return found;
    }
  }
  return null;
}

function ancestorsOf(stages) {
  const deps = new Map(stages.map((stage) => [stage.id, stage.dependencies || []]));
  const memo = new Map();
  const of = (node, seen = new Set()) => {
    if (memo.has(node)) return memo.get(node);
    const found = new Set();
    seen.add(node);
    for (const dep of deps.get(node) || []) {
      if (seen.has(dep)) continue;
      found.add(dep);
      for (const more of of(dep, seen)) found.add(more);
    }
    memo.set(node, found);
    return found;
  };
  return new Map(stages.map((stage) => [stage.id, of(stage.id)]));
}

/**
 * Check a workflow definition ({name, stages}); returns {errors, stages} where `stages` is
 * what can be drawn even when some of it is wrong.
 */
export function checkWorkflow(workflow) {
  const errors = [];
  const add = (field, message) => errors.push({ field: `workflow${field ? `.${field}` : ''}`, message });
  if (!isObject(workflow)) {
    add('', 'must be a JSON object with "name" and "stages"');
    return { errors, stages: [] };
  }
  for (const key of Object.keys(workflow)) {
    if (!WORKFLOW_FIELDS.has(key)) add(key, 'unknown field');
  }
  if (typeof workflow.name !== 'string' || !workflow.name.trim()) add('name', 'is required');
  else if (characterCount(workflow.name) > 255) add('name', 'must be at most 255 characters');
  if (workflow.timeoutMs !== undefined && workflow.timeoutMs !== null) {
    const ms = workflow.timeoutMs;
    if (!Number.isInteger(ms) || ms < DEADLINE_MIN_MS || ms > DEADLINE_MAX_MS) {
      add('timeoutMs', `must be a whole number of milliseconds from ${DEADLINE_MIN_MS} to ${DEADLINE_MAX_MS} (24 hours)`);
    }
  }
  if (!Array.isArray(workflow.stages)) {
    add('stages', 'is required and must be a list of stages');
    return { errors, stages: [] };
  }
  if (workflow.stages.length < 1) add('stages', 'must have at least one stage');
  if (workflow.stages.length > 100) add('stages', 'must have at most 100 stages');

  const stages = [];
  workflow.stages.forEach((stage, index) => {
    const at = (field) => `stages.${index}${field ? `.${field}` : ''}`;
    if (!isObject(stage)) {
      add(at(''), 'must be an object');
      return;
    }
    for (const key of Object.keys(stage)) {
      if (!STAGE_FIELDS.has(key)) add(at(key), 'unknown field');
    }
    if (typeof stage.id !== 'string' || !stage.id) add(at('id'), 'is required');
    else if (stage.id.length > 100) add(at('id'), 'must be at most 100 characters');
    else if (!STAGE_ID.test(stage.id)) add(at('id'), `'${stage.id}' may only contain letters, digits, '-' and '_'`);
    if (typeof stage.name !== 'string' || !stage.name) add(at('name'), 'is required');
    else if (characterCount(stage.name) > 255) add(at('name'), 'must be at most 255 characters');
    if (typeof stage.agentCapability !== 'string' || !stage.agentCapability) add(at('agentCapability'), 'is required');
    else if (!CAPABILITY.test(stage.agentCapability) || stage.agentCapability.length > 100) {
      add(at('agentCapability'), "must be lowercase words joined by '-' or '.', e.g. 'code-audit.python'");
    }
    let dependencies = [];
    if (stage.dependencies !== undefined) {
      if (!Array.isArray(stage.dependencies) || stage.dependencies.some((dep) => typeof dep !== 'string')) {
        add(at('dependencies'), 'must be a list of stage ids');
      } else {
        dependencies = stage.dependencies;
      }
    }
    if (stage.config !== undefined && stage.config !== null && !isObject(stage.config)) {
      add(at('config'), 'must be an object');
    }
    if (typeof stage.id === 'string' && stage.id) {
      stages.push({
        id: stage.id,
        name: typeof stage.name === 'string' ? stage.name : stage.id,
        agentCapability: typeof stage.agentCapability === 'string' ? stage.agentCapability : '',
        dependencies,
        input: stage.input,
        index,
      });
    }
  });

  const seen = new Map();
  for (const stage of stages) {
    if (seen.has(stage.id)) add(`stages.${stage.index}.id`, `Stage '${stage.id}' is defined more than once`);
    else seen.set(stage.id, stage);
  }
  for (const stage of stages) {
    for (const dep of stage.dependencies) {
      if (dep === stage.id) add(`stages.${stage.index}.dependencies`, `Stage '${stage.id}' depends on itself`);
      else if (!seen.has(dep)) {
        add(`stages.${stage.index}.dependencies`, `Stage '${stage.id}' depends on unknown stage '${dep}'`);
      }
    }
    if (new Set(stage.dependencies).size !== stage.dependencies.length) {
      add(`stages.${stage.index}.dependencies`, `Stage '${stage.id}' lists a dependency twice`);
    }
  }
  const unique = [...seen.values()];
  for (const stage of unique) {
    for (const reference of referencesIn(stage.input).filter((found) => found.malformed)) {
      add(
        ['stages', stage.index, 'input', ...reference.path].join('.'),
        `Stage '${stage.id}': Malformed reference ${reference.text}: use ${REFERENCE_FORMS}. Every \${...} ` +
          'in a stage input is a reference, and there is no escape: text that must hold one can come from the ' +
          'workflow input, by reference',
      );
    }
  }
  const cycle = findCycle(unique.map((stage) => ({ ...stage, dependencies: stage.dependencies.filter((d) => d !== stage.id) })));
  if (cycle) add(`stages.${seen.get(cycle[0]).index}.dependencies`, `Stages form a cycle: ${cycle.join(' -> ')}`);
  else {
    const ancestors = ancestorsOf(unique);
    for (const stage of unique) {
      for (const reference of referencesIn(stage.input).filter((found) => !found.malformed)) {
        if (!ancestors.get(stage.id).has(reference.stageId)) {
          add(
            `stages.${stage.index}.input`,
            `Stage '${stage.id}' references '${reference.text}', but stage '${reference.stageId}' is not one of its dependencies`,
          );
        }
      }
    }
  }
  return { errors, stages: unique };
}

/** A readable place for an API field path: `workflow.stages.1.name` → `stage 2 (translate) › name`. */
export function describeField(field, workflow) {
  const parts = String(field || '').split('.');
  if (parts[0] === 'workflow' && parts[1] === 'stages' && /^\d+$/.test(parts[2] || '')) {
    const index = Number(parts[2]);
    const stage = workflow?.stages?.[index];
    const name = stage && typeof stage.id === 'string' ? ` (${stage.id})` : '';
    const rest = parts.slice(3).join('.');
    return `stage ${index + 1}${name}${rest ? ` › ${rest}` : ''}`;
  }
  return field || 'body';
}
